"""The shapes-world benchmark, one command: base vs Attend-and-Excite vs A-STAR vs CoMat (three loss sets) vs
CoMat + A-STAR on held-out compositions, several seeds, judged exactly by pixels; writes RESULTS.md.

    .venv/bin/python benchmarks/shapes/run.py                 # ~27 min on 2 CPU cores with the committed models
    .venv/bin/python benchmarks/shapes/run.py --split val     # the same on the val prompts (for choosing settings)

Every model run goes through the framework's own entry point: ``train.py fit --config
benchmarks/shapes/configs/comat_*.yaml`` (one fine-tune per variant and seed) and ``train.py predict`` with a job
config derived from ``configs/sample.yaml`` (written next to its images, so each command can be re-run as is).
Finished fits and images are skipped on re-runs, so an interrupted benchmark continues where it stopped.

Seeds: seed ``s`` fine-tunes CoMat with ``seed_everything s`` and samples every configuration with noise seed set
``s``, so differences to the base model are paired (same prompts, same initial noise).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import world  # noqa: E402
from comat_lightning.atomic_files import write_bytes_atomically  # noqa: E402
from judge import judge_image, summarise  # noqa: E402

PYTHON = sys.executable
DATA = HERE / "data"
MODELS = HERE / "models"
ASTAR = "comat_lightning.guided_sampling.AStarGuidance"
ATTEND_EXCITE = "comat_lightning.guided_sampling.AttendAndExciteGuidance"


@dataclass(frozen=True)
class Method:
    name: str
    fit: Optional[str]  # CoMat config in configs/ (None: the base model)
    guidance: Optional[str]  # test-time guidance class (None: plain sampling)


METHODS = (
    Method("base", None, None),
    Method("base + Attend-and-Excite", None, ATTEND_EXCITE),
    Method("base + A-STAR", None, ASTAR),
    Method("CoMat: concept matching", "comat_concept", None),
    Method("CoMat: + attribute concentration", "comat_attribute", None),
    Method("CoMat: + fidelity preservation (full)", "comat_full", None),
    Method("CoMat (full) + A-STAR", "comat_full", ASTAR),
)

# 95% two-sided Student t quantiles by degrees of freedom (no scipy here).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


# ------------------------------------------------------------------------------------------------ prompt files


def training_records(seed: int = 0, layouts_per_pair: int = 8) -> list[dict]:
    """CoMat's fine-tuning prompts: the ``train`` pairs, each in several layouts (word order and the layout masks
    that attribute concentration reads come from a rendered scene)."""
    rng = np.random.default_rng(seed)
    return [world.prompt_record(world.scene(rng, pair)) for pair in world.composition_splits()["train"] for _ in range(layouts_per_pair)]


def evaluation_records(split: str, seed_set: int, images_per_order: int = 2) -> list[dict]:
    """Each pair of the split in both word orders, ``images_per_order`` noise seeds each; the "objects" are what
    the judge checks, "concepts" what guidance strengthens (the nouns)."""
    records = []
    for p, pair in enumerate(world.composition_splits()[split]):
        for order in (pair, pair[::-1]):
            things = [world.Thing(colour, shape, 0, 0, 1) for colour, shape in order]  # no layout at test time
            for j in range(images_per_order):
                records.append(world.prompt_record(things, seed=1_000_000 * seed_set + 1000 * p + 10 * (order is pair) + j, layout=False))
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records).encode()
    if not path.exists() or path.read_bytes() != text:
        write_bytes_atomically(path, text)
    return path


def write_prompt_files() -> None:
    """The committed prompt files (regenerated identically): what the shipped configs name."""
    write_jsonl(DATA / "train_prompts.jsonl", training_records())
    for split in ("val", "test"):
        write_jsonl(DATA / f"{split}_prompts.jsonl", evaluation_records(split, 0))


# ------------------------------------------------------------------------------------------------ jobs


class Jobs:
    """Runs commands (at most ``workers`` at a time, one torch thread each), logs each to a file, records wall
    times, and fails with the log's tail."""

    def __init__(self, work: Path, workers: int):
        self.work, self.pool = work, ThreadPoolExecutor(workers)
        self.times_file = work / "times.json"
        self.times = json.loads(self.times_file.read_text()) if self.times_file.exists() else {}
        self.lock = threading.Lock()

    def run(self, name: str, command: list[str]) -> float:
        log = self.work / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"[run] {name}: {shlex.join(command)}", flush=True)
        start = time.time()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(log, "w") as out:
            code = subprocess.call(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
        seconds = time.time() - start
        if code != 0:
            tail = log.read_text().splitlines()[-30:]
            raise RuntimeError(f"{name} failed with exit status {code} (log: {log}):\n" + "\n".join(tail))
        with self.lock:  # atomically: a benchmark killed mid-write must still resume
            self.times[name] = seconds
            write_bytes_atomically(self.times_file, json.dumps(self.times, indent=2).encode())
        print(f"[done] {name} in {seconds:.0f} s", flush=True)
        return seconds


def fit_job(config: str, seed: int) -> str:
    return f"fit-{config}-seed{seed}"


def sample_job(tag: str, method: Method, seed: int) -> str:
    return f"sample-{tag}-{slug(method.name)}-seed{seed}"


def shown(path: Path) -> str:
    """A path as commands show it: relative to the repository root (where they run) when inside it."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def fit_command(config: str, seed: int, fits: Path, overrides: list[str], configs: Path) -> tuple[list[str], Path]:
    log_dir = fits / f"{config}-seed{seed}" / "version_0"
    command = [PYTHON, "train.py", "fit", "--config", shown(configs / f"{config}.yaml"),
               f"--seed_everything={seed}", f"--model.seed={seed}", f"--trainer.logger.init_args.save_dir={shown(fits)}",
               f"--trainer.logger.init_args.name={config}-seed{seed}", "--trainer.logger.init_args.version=0", *overrides]  # fmt: skip
    if (log_dir / "checkpoints" / "last.ckpt").exists():
        command.append("--ckpt_path=last")  # an interrupted fine-tune resumes
    return command, log_dir / "lora"


def predict_config(job_dir: Path, prompts: Path, method: Method, lora: Optional[Path]) -> Path:
    """sample.yaml with this job's prompts, output folder, guidance and LoRA; written next to the images."""
    config = yaml.safe_load((HERE / "configs" / "sample.yaml").read_text())
    config["trainer"]["default_root_dir"] = str(job_dir)
    config["trainer"]["callbacks"][0]["init_args"]["output_dir"] = str(job_dir / "images")
    config["data"]["train_file"] = str(prompts)
    if method.guidance:
        config["model"]["guidance"] = {"class_path": method.guidance}
    if lora is not None:
        config["model"]["lora_weights"] = str(lora)
    job_dir.mkdir(parents=True, exist_ok=True)
    path = job_dir / "sample.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


# ------------------------------------------------------------------------------------------------ scoring


def judge_folder(images: Path, records: list[dict]) -> dict:
    by_prompt_seed = {(r["prompt"], r["seed"]): r for r in records}
    results = []
    for line in (images / "manifest.jsonl").read_text().splitlines():
        entry = json.loads(line)
        record = by_prompt_seed[(entry["prompt"], entry["seed"])]
        results.append(judge_image(images / entry["file"], [tuple(o) for o in record["objects"]]))
    if len(results) != len(records):
        raise RuntimeError(f"{images}: {len(results)} images judged, {len(records)} expected")
    return summarise(results)


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t interval over seeds."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), float(T_975[len(values) - 1] * values.std(ddof=1) / np.sqrt(len(values)))


METRICS = (("binding_accuracy", "binding accuracy"), ("all_correct_rate", "all objects right, nothing extra"), ("missing_rate", "neglect"),
           ("leakage_rate", "colour leakage"), ("extra_per_image", "extra objects / image"), ("clean_rate", "clean images"))  # fmt: skip


def fmt(mean: float, half: float, percent: bool = True) -> str:
    if percent:
        return f"{100 * mean:.1f} ± {100 * half:.1f}"
    return f"{mean:.2f} ± {half:.2f}"


def write_results(path: Path, table: dict, args, commands: list[str], elapsed: float, training: dict) -> None:
    seeds = args.seeds
    lines = [
        "# Shapes world: CoMat and A-STAR on held-out compositions",
        "",
        f"Written by `benchmarks/shapes/run.py --split {args.split} --seeds {' '.join(map(str, seeds))} --images-per-order "
        f"{args.images_per_order}` on "
        f"{time.strftime('%Y-%m-%d')} ({platform.machine()}, {os.cpu_count()} cores, {args.workers} jobs at a time); "
        f"the model runs took {table['job_minutes']:.1f} min of wall time in all (each job's own time, summed over jobs "
        f"that ran in parallel; fine-tunes {table['fit_minutes']:.1f} min), this invocation {elapsed / 60:.1f} min, "
        f"running {table['fits_run']} of the {table['fits']} fine-tunes (an interrupted or repeated benchmark reuses "
        f"finished fine-tunes and images). Prompts: the {len(world.composition_splits()[args.split])} "
        f"`{args.split}` pairs, both word orders, {args.images_per_order} noise seeds each = "
        f"{table['base']['images_per_seed']} images per configuration and seed; {len(seeds)} seeds. Figures: mean over "
        "seeds ± the half-width of the 95% Student-t interval over seeds (percent unless marked). Wall times are per "
        "seed and process, start-up (~10 s) included, with the jobs sharing the machine.",
        "",
        "| configuration | " + " | ".join(label for _, label in METRICS) + " | fine-tune (min/seed) | sampling (s/seed) |",
        "|---|" + "---|" * (len(METRICS) + 2),
    ]
    for method in METHODS:
        row = table[method.name]
        cells = [fmt(*row[key], percent=key != "extra_per_image") for key, _ in METRICS]
        fit = f"{row['fit_minutes']:.1f}" if row["fit_minutes"] is not None else "-"
        lines.append(f"| {method.name} | " + " | ".join(cells) + f" | {fit} | {row['sampling_seconds']:.0f} |")
    lines += ["", "## Against the goals", ""]
    for goal in table["goals"]:
        lines.append(f"- {goal}")
    lines += ["", "## The models (benchmarks/shapes/train_models.py)", ""]
    for stage, figures in training.items():
        lines.append(f"- `{stage}`: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()))
    lines += ["", "## Commands", "", "Every model run, as run (job configs are `configs/sample.yaml` with the job's prompts, output, guidance and LoRA):", "", "```"]
    lines += commands + ["```", ""]
    write_bytes_atomically(path, "\n".join(lines).encode())


def paired_goal(table, a: str, b: str, key: str, points: float, label: str) -> str:
    diffs = [x - y for x, y in zip(table[a]["per_seed"][key], table[b]["per_seed"][key])]
    mean, half = mean_ci(diffs)
    verdict = "met" if mean >= points / 100 else "NOT met"
    return f"{label}: {a} − {b} = {100 * mean:+.1f} ± {100 * half:.1f} points (goal ≥ +{points:.0f}): **{verdict}**"


def goals(table) -> list[str]:
    out = [
        paired_goal(table, "CoMat: + fidelity preservation (full)", "base", "binding_accuracy", 15, "CoMat binding accuracy"),
        paired_goal(table, "base + A-STAR", "base", "binding_accuracy", 5, "A-STAR binding accuracy"),
    ]
    base_clean = table["base"]["clean_rate"][0]
    for name in ("CoMat: + fidelity preservation (full)", "CoMat: concept matching"):
        clean = table[name]["clean_rate"][0]
        ratio = clean / base_clean if base_clean else float("nan")
        verdict = "met" if ratio >= 0.95 else "NOT met"
        out.append(f"Fidelity ({name}): clean-image rate {100 * clean:.1f}% vs base {100 * base_clean:.1f}% = {ratio:.3f} of the base (goal ≥ 0.95): **{verdict}**")
    return out


# ------------------------------------------------------------------------------------------------ main


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=["test", "val"], default="test", help="test: the held-out benchmark; val: for choosing settings")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--images-per-order", type=int, default=6, help="noise seeds per prompt and word order")
    parser.add_argument("--workers", type=int, default=2, help="jobs at a time (one torch thread each)")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "shapes", help="fits, images, logs (resumable)")
    parser.add_argument("--methods", nargs="*", default=None, help="subset of method names (default: all)")
    parser.add_argument("--fit-override", action="append", default=[], metavar="ARG",
                        help="an extra train.py fit argument for every fine-tune (repeatable), e.g. --fit-override=--model.optimizer.lr=3e-3 "
                        "(try settings on --split val with their own --work folder)")  # fmt: skip
    parser.add_argument("--configs", type=Path, default=HERE / "configs", help="folder of comat_{concept,attribute,full}.yaml "
                        "(a copy with other loss weights, to try on --split val)")  # fmt: skip
    parser.add_argument("--results", type=Path, default=None, help="default: benchmarks/shapes/RESULTS.md (test) or <work>/<split>/RESULTS.md")
    args = parser.parse_args(argv)
    start = time.time()
    if not (MODELS / "sd").exists() or not (MODELS / "blip").exists():
        subprocess.check_call([PYTHON, str(HERE / "train_models.py")], cwd=REPO)
    write_prompt_files()
    tag = f"{args.split}-{args.images_per_order}x"  # another prompt set is another folder: images never mix
    work = args.work.resolve() / tag
    jobs = Jobs(args.work.resolve(), args.workers)  # logs and wall times of fits (shared by splits) and samples
    methods = [m for m in METHODS if args.methods is None or m.name in args.methods]
    records = {s: evaluation_records(args.split, s, args.images_per_order) for s in args.seeds}
    prompts = {s: write_jsonl(work / "prompts" / f"seed{s}.jsonl", records[s]) for s in args.seeds}
    commands, fits, samples = [], {}, {}
    for config in sorted({m.fit for m in methods if m.fit}):
        for seed in args.seeds:
            command, lora = fit_command(config, seed, args.work.resolve() / "fits", args.fit_override, args.configs.resolve())  # fine-tunes do not depend on the split
            commands.append(shlex.join(command[1:]))
            fits[config, seed] = (lora, None if lora.exists() else jobs.pool.submit(jobs.run, fit_job(config, seed), command))
    for method in sorted(methods, key=lambda m: m.fit is not None):  # sampling that needs no fine-tune first
        for seed in args.seeds:
            lora, fit = fits.get((method.fit, seed), (None, None))
            job_dir = work / "samples" / f"{slug(method.name)}-seed{seed}"
            config = predict_config(job_dir, prompts[seed], method, lora)
            command = [PYTHON, "train.py", "predict", "--config", shown(config), "--return_predictions", "false"]
            commands.append(shlex.join(command[1:]))

            def sample(fit=fit, name=sample_job(tag, method, seed), command=command, job_dir=job_dir, seed=seed):
                if fit is not None:
                    fit.result()  # its LoRA must exist
                manifest = job_dir / "images" / "manifest.jsonl"
                if manifest.exists() and len(manifest.read_text().splitlines()) == len(records[seed]):
                    return None  # finished by an earlier run (its wall time is in times.json)
                return jobs.run(name, command)

            samples[method.name, seed] = (job_dir, jobs.pool.submit(sample))
    table = {}
    for method in methods:
        per_seed: dict[str, list[float]] = {key: [] for key, _ in METRICS}
        sampling_seconds = 0.0
        for seed in args.seeds:
            job_dir, future = samples[method.name, seed]
            future.result()
            summary = judge_folder(job_dir / "images", records[seed])
            for key, _ in METRICS:
                per_seed[key].append(summary[key])
            sampling_seconds += jobs.times.get(sample_job(tag, method, seed), float("nan"))
        fit_seconds = [jobs.times.get(fit_job(method.fit, s), float("nan")) for s in args.seeds] if method.fit else None
        table[method.name] = {
            **{key: mean_ci(values) for key, values in per_seed.items()},
            "per_seed": per_seed,
            "images_per_seed": len(records[args.seeds[0]]),
            "sampling_seconds": sampling_seconds / len(args.seeds),
            "fit_minutes": float(np.mean(fit_seconds)) / 60 if fit_seconds else None,
        }
        print(f"{method.name}: " + ", ".join(f"{key} {fmt(*table[method.name][key], percent=key != 'extra_per_image')}" for key, _ in METRICS), flush=True)
    jobs.pool.shutdown()
    if len(methods) == len(METHODS):
        table["goals"] = goals(table)
        table["fits"], table["fits_run"] = len(fits), sum(future is not None for _, future in fits.values())
        fit_names = {fit_job(config, seed) for config, seed in fits}
        sample_names = {sample_job(tag, m, s) for m in methods for s in args.seeds}
        table["fit_minutes"] = sum(jobs.times.get(n, 0.0) for n in fit_names) / 60
        table["job_minutes"] = table["fit_minutes"] + sum(jobs.times.get(n, 0.0) for n in sample_names) / 60
        training = json.loads((MODELS / "training.json").read_text()) if (MODELS / "training.json").exists() else {}
        results = args.results or (HERE / "RESULTS.md" if args.split == "test" else work / "RESULTS.md")
        write_results(results, table, args, commands, time.time() - start, training)
        (work / "results.json").write_text(json.dumps(table, indent=2))
        print("\n".join(table["goals"]))
        print(f"wrote {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
