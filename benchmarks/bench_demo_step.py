"""Seconds per generator step and peak memory of a config (default: the CPU demo). Not a test: prints figures
and writes them to benchmarks/results/<config>_step.json.

    python benchmarks/bench_demo_step.py                     # configs/tiny_demo.yaml, 25 steps, 5 warm-up
    python benchmarks/bench_demo_step.py --config configs/demo_sdxl.yaml --steps 25
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results_file import RESULTS, save_results  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny_demo.yaml"))
    parser.add_argument("--steps", type=int, default=25, help="generator steps to run")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the statistics")
    parser.add_argument("--out", default=None, help="results file (default: benchmarks/results/<config>_step.json)")
    parser.add_argument("--keep-logger", action="store_true", help="keep the config's logger (writes to a temp folder)")
    args = parser.parse_args()
    args.config = str(Path(args.config).resolve())  # the run happens in a temporary folder
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from lightning.pytorch import Callback

    from comat_lightning.cli import main as cli_main

    class StepTimer(Callback):
        def __init__(self):
            self.durations: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.durations.append(time.perf_counter() - self._start)

    with tempfile.TemporaryDirectory() as workdir:
        os.symlink(REPO / "data", Path(workdir) / "data")
        os.chdir(workdir)
        cli = cli_main(
            args=["--config", args.config, f"--trainer.max_steps={args.steps}", "--trainer.limit_val_batches=0",
                  "--trainer.enable_progress_bar=false", *([] if args.keep_logger else ["--trainer.logger=false"])],
            run=False,
        )
        # Measure training alone: no checkpoint or LoRA writes, no logger-bound monitors.
        skipped = ("ModelCheckpoint", "ExportLoRA", "LearningRateMonitor")
        cli.trainer.callbacks[:] = [cb for cb in cli.trainer.callbacks if type(cb).__name__ not in skipped]
        timer = StepTimer()
        cli.trainer.callbacks.append(timer)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        cli.trainer.fit(cli.model, cli.datamodule)

    measured = timer.durations[args.warmup :]
    batch = cli.datamodule.batch_size
    result = {
        "config": str(Path(args.config).relative_to(REPO) if Path(args.config).is_relative_to(REPO) else args.config),
        "steps_measured": len(measured),
        "warmup_steps": args.warmup,
        "batch_size": batch,
        "seconds_per_generator_step_median": statistics.median(measured),
        "seconds_per_generator_step_p10": sorted(measured)[len(measured) // 10],
        "seconds_per_generator_step_p90": sorted(measured)[(len(measured) * 9) // 10],
        "images_per_second": batch / statistics.median(measured),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux reports KiB
        "peak_cuda_allocated_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    save_results(result, Path(args.out) if args.out else RESULTS / f"{Path(args.config).stem}_step.json")


if __name__ == "__main__":
    main()
