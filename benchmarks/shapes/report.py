"""The shapes benchmark's figures: intervals over seeds, the goals, FID in the world captioner's feature space, the
learning-curve PNG and RESULTS.md."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np

from comat_lightning.files.atomic import write_bytes_atomically

# 95% two-sided Student t quantiles by degrees of freedom (no scipy here).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
METRICS = (("binding_accuracy", "binding accuracy"), ("all_correct_rate", "all objects right, nothing extra"), ("missing_rate", "neglect"),
           ("leakage_rate", "colour leakage"), ("extra_per_image", "extra objects / image"), ("clean_rate", "clean images"))  # fmt: skip
GOAL_COMAT, GOAL_ASTAR, GOAL_FIDELITY = 15, 5, 0.95


def mean_ci(values) -> tuple[float, float]:
    """Mean and the half-width of its 95% t interval over seeds."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), float(T_975[len(values) - 1] * values.std(ddof=1) / np.sqrt(len(values)))


def fmt(mean: float, half: float, percent: bool = True) -> str:
    return f"{100 * mean:.1f} ± {100 * half:.1f}" if percent else f"{mean:.2f} ± {half:.2f}"


def row_summary(row: dict) -> str:
    return ", ".join(f"{key} {fmt(*row[key], percent=key != 'extra_per_image')}" for key, _ in METRICS) + f", FID {row['fid']:.2f}"


# ------------------------------------------------------------------------------------------------ FID


def world_fid(image_folders: list[Path], captioner: Path) -> float:
    """Fréchet distance between the images in ``image_folders`` (their manifests' prompts) and exact renders of the
    same prompts (random layouts), in the feature space of the world's BLIP vision tower (pooled, 64-d): torchmetrics'
    FrechetInceptionDistance with that network in place of Inception (no Inception weights can be downloaded here,
    and Inception knows nothing of 32 px shapes). Lower is closer to the world's image distribution."""
    import json

    import torch
    import world
    from PIL import Image
    from torchmetrics.image.fid import FrechetInceptionDistance
    from transformers import BlipForConditionalGeneration, BlipImageProcessor

    processor = BlipImageProcessor.from_pretrained(captioner)
    vision = BlipForConditionalGeneration.from_pretrained(captioner).vision_model.eval()
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)

    class Features(torch.nn.Module):
        num_features = vision.config.hidden_size

        def forward(self, images: torch.Tensor) -> torch.Tensor:  # (N, 3, 32, 32) in [0, 1]
            return vision(pixel_values=(images.float() - mean) / std).pooler_output.double()

    fid = FrechetInceptionDistance(feature=Features(), normalize=True, input_img_size=(3, world.IMAGE_SIZE, world.IMAGE_SIZE))
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for folder in image_folders:
            entries = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
            fake = np.stack([np.asarray(Image.open(folder / e["file"]).convert("RGB")) for e in entries])
            real = np.stack([world.render(world.scene(rng, tuple(world.parse_caption(e["prompt"])))) for e in entries])
            for images, is_real in ((real, True), (fake, False)):
                fid.update(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, real=is_real)
        return float(fid.compute())


# ------------------------------------------------------------------------------------------------ goals


def paired_difference(table: dict, a: str, b: str, key: str = "binding_accuracy") -> tuple[float, float]:
    return mean_ci([x - y for x, y in zip(table[a]["per_seed"][key], table[b]["per_seed"][key])])


def goals(table: dict, best_name: str) -> list[str]:
    out = []
    for a, b, points, label in ((best_name, "base", GOAL_COMAT, "CoMat (best) binding accuracy"),
                                ("base + A-STAR", "base", GOAL_ASTAR, "A-STAR binding accuracy")):  # fmt: skip
        mean, half = paired_difference(table, a, b)
        verdict = "met" if mean >= points / 100 else "NOT met"
        out.append(f"{label}: {a} − {b} = {100 * mean:+.1f} ± {100 * half:.1f} points (goal ≥ +{points}): **{verdict}**")
    base_clean = table["base"]["clean_rate"][0]
    for name in (best_name, "CoMat faithful: concept matching"):
        clean = table[name]["clean_rate"][0]
        ratio = clean / base_clean if base_clean else float("nan")
        verdict = "met" if ratio >= GOAL_FIDELITY else "NOT met"
        out.append(f"Fidelity ({name}): clean-image rate {100 * clean:.1f}% vs base {100 * base_clean:.1f}% = {ratio:.3f} of the base "
                   f"(goal ≥ {GOAL_FIDELITY}); FID {table[name]['fid']:.2f} vs base {table['base']['fid']:.2f}: **{verdict}**")  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------------ learning curve


def plot_curve(curve: dict, path: Path, size=(720, 420)) -> None:
    """Binding accuracy on val against rollouts seen, one line per configuration (mean over seeds, seeds' range
    as a band), drawn with PIL (matplotlib is not a dependency)."""
    from PIL import Image, ImageDraw

    colours = {"comat_full": (200, 60, 40), "comat_plus": (40, 90, 200)}
    labels = {"comat_full": "CoMat faithful (all three)", "comat_plus": "CoMat plus (all three)"}
    width, height = size
    left, right, top, bottom = 60, 20, 20, 50
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    xs = sorted({x for seeds in curve.values() for points in seeds.values() for x, _ in points})
    values = [y for seeds in curve.values() for points in seeds.values() for _, y in points]
    y_low, y_high = np.floor(min(values) * 10) / 10, np.ceil(max(values) * 10) / 10
    y_high = max(y_high, y_low + 0.1)

    def at(x, y):
        return (left + (width - left - right) * x / max(xs[-1], 1), height - bottom - (height - top - bottom) * (y - y_low) / (y_high - y_low))

    draw.line([at(0, y_low), at(xs[-1], y_low)], fill=(0, 0, 0))
    draw.line([at(0, y_low), at(0, y_high)], fill=(0, 0, 0))
    for tick in np.arange(y_low, y_high + 1e-9, 0.1):
        draw.text((8, at(0, tick)[1] - 6), f"{100 * tick:.0f}%", fill=(0, 0, 0))
        draw.line([at(0, tick), at(xs[-1], tick)], fill=(225, 225, 225))
    for x in xs[:: max(1, len(xs) // 8)]:
        draw.text((at(x, y_low)[0] - 14, height - bottom + 6), f"{x // 1000}k" if x else "0", fill=(0, 0, 0))
    draw.text((width // 2 - 120, height - 22), "val binding accuracy  vs  rollouts seen", fill=(0, 0, 0))
    for row, (config, seeds) in enumerate(sorted(curve.items())):
        colour = colours.get(config, (80, 80, 80))
        by_x = {x: [dict(points)[x] for points in seeds.values() if x in dict(points)] for x in xs}
        low = [at(x, min(v)) for x, v in by_x.items() if v]
        high = [at(x, max(v)) for x, v in by_x.items() if v]
        band = tuple(int(c + (255 - c) * 0.8) for c in colour)
        draw.polygon(low + high[::-1], fill=band)
        line = [at(x, float(np.mean(v))) for x, v in by_x.items() if v]
        draw.line(line, fill=colour, width=3)
        for point in line:
            draw.ellipse([point[0] - 3, point[1] - 3, point[0] + 3, point[1] + 3], fill=colour)
        draw.text((left + 12, top + 6 + 16 * row), labels.get(config, config), fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    image.save(tmp)
    os.replace(tmp, path)


def curve_lines(curve: dict) -> list[str]:
    lines = ["| rollouts | " + " | ".join(sorted(curve)) + " |", "|---|" + "---|" * len(curve)]
    xs = sorted({x for seeds in curve.values() for points in seeds.values() for x, _ in points})
    for x in xs:
        cells = [fmt(*mean_ci([dict(points)[x] for points in seeds.values() if x in dict(points)])) for _, seeds in sorted(curve.items())]
        lines.append(f"| {x} | " + " | ".join(cells) + " |")
    return lines


# ------------------------------------------------------------------------------------------------ RESULTS.md


def write_results(path: Path, summary: dict, args, curve_png: Path) -> None:
    table, curve = summary["table"], summary["curve"]
    best_config = summary["best"]
    best_name = {"comat_full": "CoMat faithful: + fidelity preservation", "comat_plus": "CoMat plus: all three losses"}[best_config]
    fit_seconds = list(summary["fit_seconds"].values())
    rollouts = summary["rollouts_per_fit"]
    lines = [
        "# Shapes world v2: CoMat and A-STAR on held-out compositions",
        "",
        f"Written by `benchmarks/shapes/run.py --split {args.split} --seeds {' '.join(map(str, args.seeds))} --images-per-order "
        f"{args.images_per_order}` on {time.strftime('%Y-%m-%d')} ({platform.machine()}, {os.cpu_count()} cores, {args.workers} jobs "
        f"at a time). Model runs: {summary['job_seconds'] / 3600:.2f} h of job time in all (jobs in parallel counted each), this "
        f"invocation {summary['elapsed'] / 3600:.2f} h, running {summary['fits_run']} of the {summary['fits']} fine-tunes (a re-run "
        "reuses finished fine-tunes and images). Each fine-tune: "
        f"{rollouts:,} rollouts, {np.mean(fit_seconds) / 60 if fit_seconds else float('nan'):.1f} min on average = "
        f"{rollouts / np.mean(fit_seconds) if fit_seconds else float('nan'):.1f} rollouts/s per job (one core, the other job beside it). "
        f"Prompts: the {table['base']['images_per_seed'] // (2 * args.images_per_order)} `{args.split}` pairs, both word orders, "
        f"{args.images_per_order} noise seeds each = {table['base']['images_per_seed']} images per configuration and seed. Figures: "
        "mean over seeds ± the half-width of the 95% Student-t interval over seeds (percent unless marked); FID pools the "
        "seeds' images against renders of the same prompts, in the world captioner's feature space (lower is better).",
        "",
        "| configuration | " + " | ".join(label for _, label in METRICS) + " | FID | fine-tune (min/seed) | sampling (s/seed) |",
        "|---|" + "---|" * (len(METRICS) + 3),
    ]
    for name, row in table.items():
        cells = [fmt(*row[key], percent=key != "extra_per_image") for key, _ in METRICS]
        fit = f"{row['fit_minutes']:.1f}" if row["fit_minutes"] is not None else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['fid']:.2f} | {fit} | {row['sampling_seconds']:.0f} |")
    lines += ["", f"CoMat (best) = `{best_config}`: the better final val binding accuracy on the learning curve.", ""]
    lines += ["## Against the goals", ""] + [f"- {goal}" for goal in goals(table, best_name)]
    lines += ["", "Paired differences against the base (binding accuracy, points):", ""]
    for name in table:
        if name != "base":
            mean, half = paired_difference(table, name, "base")
            lines.append(f"- {name}: {100 * mean:+.1f} ± {100 * half:.1f}")
    if curve:
        plot_curve(curve, curve_png)
        lines += ["", "## Learning curve (val)", "", f"![learning curve]({curve_png.name})", ""] + curve_lines(curve)
    lines += ["", "## The models (benchmarks/shapes/train_models.py)", ""]
    for stage, figures in summary["training"].items():
        lines.append(f"- `{stage}`: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()))
    lines += ["", "## Commands", "", "Every model run, as run:", "", "```"] + summary["commands"] + ["```", ""]
    write_bytes_atomically(path, "\n".join(lines).encode())
