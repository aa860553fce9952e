"""Compare configs in one run: seconds per generator step and peak memory of each, and the ratios to the first.

Each config runs in its own fresh process (so peak memory is that config's own), alternating between configs for
``--rounds`` rounds so that slow drift of the machine affects all of them alike. Not a test: prints figures and
writes them to benchmarks/results/<name>.json.

    python benchmarks/bench_compare.py --name attribute_concentration_cost \\
        configs/tiny_demo_no_attribute.yaml configs/tiny_demo.yaml
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results_file import RESULTS, save_results  # noqa: E402


def compare(configs: list[str], rounds: int, steps: int, warmup: int, step_args: tuple[str, ...] = ()) -> dict:
    """Run every config ``rounds`` times (alternating), each in a fresh bench_demo_step.py process; returns the
    per-config medians, the ratios to the first config, and the machine."""
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(rounds):
            for config in configs:
                out = Path(tmp) / f"{round_index}-{Path(config).stem}.json"
                cmd = [sys.executable, str(REPO / "benchmarks" / "bench_demo_step.py"), "--config", str(Path(config).resolve()),
                       "--steps", str(steps), "--warmup", str(warmup), "--out", str(out), *step_args]  # fmt: skip
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                runs[config].append(json.loads(out.read_text()))

    summary = {}
    for config, results in runs.items():
        per_step = [r["seconds_per_generator_step_median"] for r in results]
        summary[config] = {
            "seconds_per_generator_step_median": statistics.median(per_step),
            "seconds_per_generator_step_per_process": per_step,
            "peak_rss_mib_max": max(r["peak_rss_mib"] for r in results),
            "peak_cuda_allocated_mib_max": max((r["peak_cuda_allocated_mib"] or 0) for r in results) or None,
        }
    base = summary[configs[0]]
    for config in configs[1:]:
        entry = summary[config]
        entry["time_ratio_to_first"] = entry["seconds_per_generator_step_median"] / base["seconds_per_generator_step_median"]
        entry["peak_rss_ratio_to_first"] = entry["peak_rss_mib_max"] / base["peak_rss_mib_max"]
    first = runs[configs[0]][0]
    return {
        "configs": summary,
        "rounds": rounds,
        "steps_per_process": steps,
        "warmup_steps": warmup,
        "device": first["device"],
        "torch": first["torch"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="config files; ratios are relative to the first")
    parser.add_argument("--name", required=True, help="results file name (benchmarks/results/<name>.json)")
    parser.add_argument("--rounds", type=int, default=2, help="processes per config, alternating")
    parser.add_argument("--steps", type=int, default=25, help="generator steps per process")
    parser.add_argument("--warmup", type=int, default=5, help="first steps of each process left out")
    args = parser.parse_args()
    result = compare(args.configs, args.rounds, args.steps, args.warmup)
    result["command"] = "python benchmarks/bench_compare.py --name " + args.name + " " + " ".join(args.configs)
    save_results(result, RESULTS / f"{args.name}.json")


if __name__ == "__main__":
    main()
