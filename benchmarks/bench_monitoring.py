"""Overhead of the image loggers: seconds per generator step of the demo with AttentionMapLogger and
SampleImageLogger logging every step, every 100 steps, and removed, measured in the same run (fresh process per
config, alternating rounds, medians after warm-up; TensorBoard logger on, validation off). Not a test: prints the
figures and writes benchmarks/results/monitoring_overhead.json.

    python benchmarks/bench_monitoring.py [--rounds 2 --steps 25 --warmup 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_compare import compare  # noqa: E402
from benchmarks.results_file import RESULTS, save_results  # noqa: E402

LOGGERS = ("callbacks.AttentionMapLogger", "callbacks.SampleImageLogger")


def variant(every_n_steps: int | None) -> dict:
    """configs/tiny_demo.yaml with both loggers every ``every_n_steps`` steps (None: without them)."""
    cfg = yaml.safe_load((REPO / "configs" / "tiny_demo.yaml").read_text())
    callbacks = []
    for callback in cfg["trainer"]["callbacks"]:
        if callback["class_path"] in LOGGERS:
            if every_n_steps is None:
                continue
            callback["init_args"]["every_n_steps"] = every_n_steps
        callbacks.append(callback)
    cfg["trainer"]["callbacks"] = callbacks
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        configs = {}
        for label, every in (("off", None), ("every_100_steps", 100), ("every_step", 1)):
            path = Path(tmp) / f"monitoring_{label}.yaml"
            path.write_text(yaml.safe_dump(variant(every)))
            configs[label] = str(path)
        result = compare(list(configs.values()), args.rounds, args.steps, args.warmup, step_args=("--keep-logger",))
    # Name the entries by variant instead of the temporary paths.
    result["configs"] = {label: result["configs"][path] for label, path in configs.items()}
    result["note"] = (
        "loggers sample 2 (attention) and 4 (samples, base cached) monitor prompts per logging step; every_100_steps "
        "logs only before the first step, which falls in the warm-up"
    )
    result["command"] = f"python benchmarks/bench_monitoring.py --rounds {args.rounds} --steps {args.steps} --warmup {args.warmup}"
    save_results(result, RESULTS / "monitoring_overhead.json")


if __name__ == "__main__":
    main()
