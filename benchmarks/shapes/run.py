"""The shapes-world benchmark (v2), one command: base, Attend-and-Excite, A-STAR, CoMat (faithful: three loss sets;
plus: our options) and CoMat + A-STAR on held-out compositions, 3 seeds, judged exactly by pixels.

    .venv/bin/python benchmarks/shapes/run.py                 # test split: ~3 h on 2 cores, writes RESULTS.md
    .venv/bin/python benchmarks/shapes/run.py --split val     # the same on val (for choosing settings)
    .venv/bin/python benchmarks/shapes/run.py --prompts my_prompts.txt --methods base "base + A-STAR"

Stages, each resumable (finished fits, real latents and image folders are reused by a re-run):

1. models (``train_models.py``) if absent; the configs and prompt files are regenerated (identical bytes).
2. real latents of the frozen base for the training prompts (``comat_lightning.tools.real_latents``: fidelity
   preservation's "real" images, as the published recipes precompute them).
3. fine-tunes: every CoMat configuration x seed through ``train.py fit``, its LoRA exported every 80 generator steps
   (2,560 rollouts); 640 steps x batch 32 = 20,480 rollouts each.
4. learning curve (with every fit): binding accuracy on ``val`` of the faithful and plus fine-tunes' LoRAs at every
   export; the one with the better final val score is "CoMat (best)" (test is never looked at to choose).
5. sampling: every configuration x seed through ``train.py predict`` on the split, judged by ``judge.py``; FID in
   the world captioner's feature space against renders of the same prompts.

Seeds: seed ``s`` fine-tunes with ``seed_everything s`` and samples every configuration with noise seed set ``s``,
so differences to the base model are paired (same prompts, same initial noise).
"""

from __future__ import annotations

import argparse
import json
import os
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

import report  # noqa: E402
import world  # noqa: E402
from judge import judge_image, summarise  # noqa: E402
from make_configs import CHECKPOINT_EVERY, FIT_CONFIGS, ROLLOUTS_PER_STEP, write_configs  # noqa: E402

from comat_lightning.files.atomic import write_bytes_atomically  # noqa: E402

PYTHON = sys.executable
DATA = HERE / "data"
MODELS = HERE / "models"
ASTAR = "comat_lightning.AStarGuidance"
ATTEND_EXCITE = "comat_lightning.AttendAndExciteGuidance"
BEST = "best"  # stands for the CoMat configuration with the better final val score (faithful full or plus)
CURVE_FITS = ("comat_full", "comat_plus")


@dataclass(frozen=True)
class Method:
    name: str
    fit: Optional[str]  # CoMat config in configs/ (None: the base model; BEST: chosen on val)
    guidance: Optional[str]  # test-time guidance class (None: plain sampling)


METHODS = (
    Method("base", None, None),
    Method("base + Attend-and-Excite", None, ATTEND_EXCITE),
    Method("base + A-STAR", None, ASTAR),
    Method("CoMat faithful: concept matching", "comat_concept", None),
    Method("CoMat faithful: + attribute concentration", "comat_attribute", None),
    Method("CoMat faithful: + fidelity preservation", "comat_full", None),
    Method("CoMat plus: all three losses", "comat_plus", None),
    Method("CoMat (best) + A-STAR", BEST, ASTAR),
)


# ------------------------------------------------------------------------------------------------ prompt files


def training_records(copies: int = 8) -> list[dict]:
    """CoMat's fine-tuning prompts: the 144 ``train`` pairs in both word orders, each ``copies`` times (one real
    latent per record: fidelity preservation sees 8 base-model images per prompt). No masks: attribute
    concentration finds the objects in the generated images (shape_masks.ShapeMasks), as CoMat's detector does."""
    records = []
    for pair in world.composition_splits()["train"]:
        for order in (pair, pair[::-1]):
            things = [world.Thing(colour, shape, 0, 0, 1) for colour, shape in order]
            records += [world.prompt_record(things, layout=False) for _ in range(copies)]
    return records


def evaluation_records(split: str, seed_set: int, images_per_order: int = 4) -> list[dict]:
    """Each pair of the split in both word orders, ``images_per_order`` noise seeds each; the "objects" are what
    the judge checks, "concepts" what guidance strengthens (the nouns)."""
    return _both_orders(world.composition_splits()[split], seed_set, images_per_order)


def demo_validation_records() -> list[dict]:
    """configs/demo.yaml's validation prompts (data/shapes_demo_val_prompts.jsonl): every second ``train`` pair (72)
    in both word orders. The demo fine-tunes on these compositions and validates on noise that training never draws
    (the module's validation seeds), so its curves show the fine-tune taking hold within its 1,920 rollouts; held-out
    compositions move only after thousands of rollouts (RESULTS.md's learning curve), which is the benchmark's job."""
    return _both_orders(world.composition_splits()["train"][::2], seed_set=0, images_per_order=1)


def _both_orders(pairs: list, seed_set: int, images_per_order: int) -> list[dict]:
    records = []
    for p, pair in enumerate(pairs):
        for order in (pair, pair[::-1]):
            things = [world.Thing(colour, shape, 0, 0, 1) for colour, shape in order]  # no layout at test time
            for j in range(images_per_order):
                records.append(world.prompt_record(things, seed=1_000_000 * seed_set + 1000 * p + 10 * (order is pair) + j, layout=False))
    return records


def file_records(path: Path, seed_set: int, images_per_prompt: int) -> list[dict]:
    """Records for ``--prompts``: a .txt file (one caption per line) or JSONL (``{"prompt": ...}`` per line), in the
    world's grammar; a line with an unknown word or a broken rule is refused with its file:line."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        text = json.loads(line)["prompt"] if path.suffix == ".jsonl" else line
        try:
            objects = world.parse_caption(text)
        except ValueError as err:
            raise SystemExit(f"{path}:{number}: {err}") from None
        things = [world.Thing(colour, shape, 0, 0, 1) for colour, shape in objects]
        for j in range(images_per_prompt):
            records.append(world.prompt_record(things, seed=1_000_000 * seed_set + 1000 * number + j, layout=False))
    if not records:
        raise SystemExit(f"{path}: no prompts")
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
    write_jsonl(REPO / "data" / "shapes_demo_val_prompts.jsonl", demo_validation_records())


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
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
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


def shown(path: Path) -> str:
    """A path as commands show it: relative to the repository root (where they run) when inside it."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def real_latents_command(work: Path) -> tuple[list[str], Path]:
    out = work / "real_latents"
    command = [PYTHON, "-m", "comat_lightning.tools.real_latents", "--config", shown(HERE / "configs" / "comat_full.yaml"),
               "--prompts", shown(DATA / "train_prompts.jsonl"), "--output", shown(out), "--batch-size", "64"]  # fmt: skip
    return command, out / "real_latents.jsonl"


def fit_command(config: str, seed: int, fits: Path, train_file: Path, overrides: list[str]) -> tuple[list[str], Path]:
    log_dir = fits / f"{config}-seed{seed}" / "version_0"
    command = [PYTHON, "train.py", "fit", "--config", shown(HERE / "configs" / f"{config}.yaml"),
               f"--seed_everything={seed}", f"--model.seed={seed}", f"--data.train_file={shown(train_file)}",
               f"--trainer.logger.init_args.save_dir={shown(fits)}", f"--trainer.logger.init_args.name={config}-seed{seed}",
               "--trainer.logger.init_args.version=0", *overrides]  # fmt: skip
    if (log_dir / "checkpoints" / "last.ckpt").exists():
        command.append("--ckpt_path=last")  # an interrupted fine-tune resumes
    return command, log_dir


def predict_command(job_dir: Path, prompts: Path, method: Method, lora: Optional[Path]) -> list[str]:
    """sample.yaml with this job's prompts, output folder, guidance and LoRA, written next to the images."""
    config = yaml.safe_load((HERE / "configs" / "sample.yaml").read_text())
    config["trainer"]["default_root_dir"] = str(job_dir)
    config["trainer"]["callbacks"][0]["init_args"]["output_dir"] = str(job_dir / "images")
    config["data"]["train_file"] = str(prompts)
    if method.guidance:
        settings = yaml.safe_load((HERE / "guidance_settings.yaml").read_text())[method.guidance.rsplit(".", 1)[1]]
        config["model"]["guidance"] = {"class_path": method.guidance, "init_args": settings["init_args"]}
        config["model"]["guidance_resolution"] = settings["resolution"]
    if lora is not None:
        config["model"]["lora_weights"] = str(lora)
    job_dir.mkdir(parents=True, exist_ok=True)
    path = job_dir / "sample.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return [PYTHON, "train.py", "predict", "--config", shown(path), "--return_predictions", "false"]


def finished(job_dir: Path, count: int) -> bool:
    manifest = job_dir / "images" / "manifest.jsonl"
    return manifest.exists() and len(manifest.read_text().splitlines()) == count


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


# ------------------------------------------------------------------------------------------------ main


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=["test", "val"], default="test", help="test: the held-out benchmark; val: for choosing settings")
    parser.add_argument("--prompts", type=Path, default=None, help="judge this prompt file (.txt or .jsonl, the world's grammar) instead of a split")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--images-per-order", type=int, default=4, help="noise seeds per prompt and word order (per prompt with --prompts)")
    parser.add_argument("--workers", type=int, default=2, help="jobs at a time (one torch thread each)")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "shapes", help="fits, images, logs (resumable)")
    parser.add_argument("--methods", nargs="*", default=None, help="subset of method names (default: all)")
    parser.add_argument("--no-curve", action="store_true", help="skip the learning curve (then CoMat (best) is the faithful full)")
    parser.add_argument("--max-steps", type=int, default=FIT_CONFIGS["max_steps"], help="generator steps per fine-tune (a short smoke run)")
    parser.add_argument("--fit-override", action="append", default=[], metavar="ARG",
                        help="an extra train.py fit argument for every fine-tune (repeatable; use a --work folder of its own)")  # fmt: skip
    parser.add_argument("--results", type=Path, default=None, help="default: benchmarks/shapes/RESULTS.md (test) or <work>/<tag>/RESULTS.md")
    args = parser.parse_args(argv)
    names = {m.name for m in METHODS}
    unknown = sorted(set(args.methods or []) - names)
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {sorted(names)}")
    start = time.time()
    if not (MODELS / "sd").exists() or not (MODELS / "blip").exists():
        subprocess.check_call([PYTHON, str(HERE / "train_models.py")], cwd=REPO)
    write_configs()
    write_prompt_files()
    tag = f"{slug(args.prompts.stem)}-{args.images_per_order}x" if args.prompts else f"{args.split}-{args.images_per_order}x"
    work_root = args.work.resolve()
    work = work_root / tag  # another prompt set is another folder: images never mix
    jobs = Jobs(work_root, args.workers)
    methods = [m for m in METHODS if args.methods is None or m.name in args.methods]
    if args.prompts:
        records = {s: file_records(args.prompts, s, args.images_per_order) for s in args.seeds}
    else:
        records = {s: evaluation_records(args.split, s, args.images_per_order) for s in args.seeds}
    prompts = {s: write_jsonl(work / "prompts" / f"seed{s}.jsonl", records[s]) for s in args.seeds}
    commands: list[str] = []

    # 2-3. Real latents, then the fine-tunes (they do not depend on the split).
    fit_names = sorted({m.fit for m in methods if m.fit and m.fit != BEST} | (set(CURVE_FITS) if any(m.fit == BEST for m in methods) else set()))
    need_curve = not args.no_curve and bool(set(fit_names) & set(CURVE_FITS))
    train_file = DATA / "train_prompts.jsonl"
    if fit_names:
        command, train_file = real_latents_command(work_root)
        commands.append(shlex.join(command[1:]))
        if not train_file.exists():
            jobs.run("real-latents", command)
    fits = {}
    for config in fit_names:
        for seed in args.seeds:
            overrides = [f"--trainer.max_steps={args.max_steps}"] * (args.max_steps != FIT_CONFIGS["max_steps"]) + args.fit_override
            command, log_dir = fit_command(config, seed, work_root / "fits", train_file, overrides)
            commands.append(shlex.join(command[1:]))
            done = (log_dir / "lora").exists()
            fits[config, seed] = (log_dir, None if done else jobs.pool.submit(jobs.run, f"fit-{config}-seed{seed}", command))

    # 4. Learning curve on val (also chooses CoMat (best)).
    curve, best = {}, "comat_full"
    if need_curve:
        curve = learning_curve(jobs, fits, work_root, args.seeds, commands, args.max_steps)
        finals = {config: np.mean([points[-1][1] for points in curve[config].values()]) for config in CURVE_FITS if config in curve}
        best = max(finals, key=finals.get) if finals else best

    # 5. Sampling on the split (or the prompt file), judged.
    samples = {}
    for method in sorted(methods, key=lambda m: m.fit is not None):  # sampling that needs no fine-tune first
        config = best if method.fit == BEST else method.fit
        for seed in args.seeds:
            log_dir, fit = fits.get((config, seed), (None, None))
            job_dir = work / "samples" / f"{slug(method.name)}-seed{seed}"
            command = predict_command(job_dir, prompts[seed], method, log_dir / "lora" if log_dir else None)
            commands.append(shlex.join(command[1:]))

            def sample(fit=fit, name=f"sample-{tag}-{slug(method.name)}-seed{seed}", command=command, job_dir=job_dir, seed=seed):
                if fit is not None:
                    fit.result()  # its LoRA must exist
                return None if finished(job_dir, len(records[seed])) else jobs.run(name, command)

            samples[method.name, seed] = (job_dir, jobs.pool.submit(sample))
    table = {}
    for method in methods:
        per_seed: dict[str, list[float]] = {key: [] for key, _ in report.METRICS}
        for seed in args.seeds:
            job_dir, future = samples[method.name, seed]
            future.result()
            summary = judge_folder(job_dir / "images", records[seed])
            for key, _ in report.METRICS:
                per_seed[key].append(summary[key])
        config = best if method.fit == BEST else method.fit
        table[method.name] = {
            **{key: report.mean_ci(values) for key, values in per_seed.items()},
            "per_seed": per_seed,
            "images_per_seed": len(records[args.seeds[0]]),
            "sampling_seconds": np.nanmean([jobs.times.get(f"sample-{tag}-{slug(method.name)}-seed{s}", float("nan")) for s in args.seeds]),
            "fit_minutes": np.mean([jobs.times.get(f"fit-{config}-seed{s}", float("nan")) for s in args.seeds]) / 60 if config else None,
            "fid": report.world_fid([work / "samples" / f"{slug(method.name)}-seed{s}" / "images" for s in args.seeds], MODELS / "blip"),
        }
        print(f"{method.name}: " + report.row_summary(table[method.name]), flush=True)
    jobs.pool.shutdown()
    fit_times = {name: seconds for name, seconds in jobs.times.items() if name.startswith("fit-")}
    summary = {
        "table": table, "curve": curve, "best": best, "commands": commands, "elapsed": time.time() - start,
        "fit_seconds": fit_times, "rollouts_per_fit": ROLLOUTS_PER_STEP * args.max_steps,
        "job_seconds": sum(jobs.times.values()), "fits_run": sum(f is not None for _, f in fits.values()), "fits": len(fits),
        "training": json.loads((MODELS / "training.json").read_text()) if (MODELS / "training.json").exists() else {},
    }  # fmt: skip
    (work / "results.json").write_text(json.dumps(summary, indent=2, default=float))
    if args.prompts is None and len(methods) == len(METHODS):
        results = args.results or (HERE / "RESULTS.md" if args.split == "test" else work / "RESULTS.md")
        report.write_results(results, summary, args, curve_png=results.parent / ("learning_curve.png" if args.split == "test" else f"learning_curve_{tag}.png"))
        print(f"wrote {results}")
    return 0


def learning_curve(jobs: Jobs, fits: dict, work_root: Path, seeds: list[int], commands: list[str], max_steps: int) -> dict:
    """{config: {seed: [(rollouts, val binding accuracy), ...]}} for the curve fits: the base model (0 rollouts)
    and every exported LoRA, judged on the val prompts of the seed's noise set."""
    base = Method("base", None, None)
    curve: dict = {}
    futures = {}
    for seed in seeds:
        val = evaluation_records("val", seed, 4)
        prompts = write_jsonl(work_root / "curve" / "prompts" / f"seed{seed}.jsonl", val)
        job_dir = work_root / "curve" / f"base-seed{seed}"
        command = predict_command(job_dir, prompts, base, None)
        commands.append(shlex.join(command[1:]))
        futures["base", seed, 0] = (job_dir, val, jobs.pool.submit(lambda c=command, d=job_dir, n=len(val), s=seed: None if finished(d, n) else jobs.run(f"curve-base-seed{s}", c)))
        for config in CURVE_FITS:
            log_dir, fit = fits.get((config, seed), (None, None))
            if log_dir is None:
                continue
            for step in range(CHECKPOINT_EVERY, max_steps + 1, CHECKPOINT_EVERY):
                job_dir = work_root / "curve" / f"{config}-seed{seed}-step{step}"
                command = predict_command(job_dir, prompts, base, log_dir / "lora_checkpoints" / f"step_{step}")
                commands.append(shlex.join(command[1:]))

                def evaluate(fit=fit, command=command, job_dir=job_dir, n=len(val), name=f"curve-{config}-seed{seed}-step{step}"):
                    if fit is not None:
                        fit.result()
                    return None if finished(job_dir, n) else jobs.run(name, command)

                futures[config, seed, step] = (job_dir, val, jobs.pool.submit(evaluate))
    scores = {}
    for key, (job_dir, val, future) in futures.items():
        future.result()
        scores[key] = judge_folder(job_dir / "images", val)["binding_accuracy"]
    for (config, seed, step), value in scores.items():
        if config == "base":
            continue
        points = curve.setdefault(config, {}).setdefault(seed, [(0, scores["base", seed, 0])])
        points.append((step * ROLLOUTS_PER_STEP, value))
    for config in curve:
        for seed in curve[config]:
            curve[config][seed].sort()
    return curve


if __name__ == "__main__":
    sys.exit(main())
