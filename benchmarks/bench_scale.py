"""Speed, memory and model FLOPs utilisation of one CoMat training configuration. Not a test: it prints figures and
appends one JSON line per run (machine, versions, command, figures) to benchmarks/results/scale.jsonl.

All three CoMat losses (concept matching, attribute concentration, fidelity preservation with on-the-fly real
latents) run through the real module and Trainer. ``--model tiny`` is the CPU demo's models; ``sd15`` / ``sdxl``
are the published architectures with random weights (benchmarks/full_size_models.py) and the BLIP-large judge.

    python benchmarks/bench_scale.py --model tiny                                  # CPU, seconds
    python benchmarks/bench_scale.py --model sd15 --batch 4                        # GPU: 512 px, 50 steps, K=5, bf16
    python benchmarks/bench_scale.py --model sdxl --batch 1 --no-checkpointing
    python benchmarks/bench_scale.py --model sdxl --batch 1 --optimizer adamw8bit

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (benchmarks/flop_counting.py: plus CPU
attention) over one whole generator step (rollout, decode, losses, backward, discriminator step) in a separate,
unmeasured step; MFU = counted FLOPs / median step time / the device's dense bf16 peak (``--peak-tflops`` to
override).

Without the GPU, ``--shape-only`` runs the same fit with fake tensors (benchmarks/shape_only.py): no timing, but
the step's FLOPs, an estimate of its peak GPU memory (weights + the tensors the step creates, by model and pass)
and the step time that a given MFU would need on ``--target-gpu``; bf16-mixed by default, as on a GPU:

    python benchmarks/bench_scale.py --model sdxl --batch 1 --shape-only           # minutes, any machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from lightning.pytorch import Callback

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results_file import RESULTS  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.2, "A10G": 70.0}
_LOSSES = ("ConceptMatchingLoss", "AttributeConcentrationLoss", "FidelityPreservationLoss")


def library_versions() -> dict:
    """The versions a benchmark row records."""
    import diffusers
    import lightning
    import torch
    import transformers

    return {"torch": torch.__version__, "cuda": torch.version.cuda, "lightning": lightning.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}  # fmt: skip


def peak_tflops(device_name: str):
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "sd15", "sdxl"], default="tiny")
    parser.add_argument("--models-dir", default="/tmp/comat_full_size", help="where full-size random models are built")
    parser.add_argument("--resolution", type=int, default=None, help="default: 64 (tiny), 512 (sd15, sdxl)")
    parser.add_argument("--batch", type=int, default=None, help="per device; default: 2 (tiny), 4 (sd15), 1 (sdxl)")
    parser.add_argument("--inference-steps", type=int, default=None, help="default: 10 (tiny), 50")
    parser.add_argument("--K", type=int, default=None, help="gradient steps; default: 2 (tiny), 5")
    parser.add_argument("--precision", default=None, help="default: 32-true on CPU, bf16-mixed on GPU")
    parser.add_argument("--no-checkpointing", action="store_true", help="turn gradient checkpointing off")
    parser.add_argument("--optimizer", choices=["adamw", "adamw8bit", "paged_adamw8bit"], default="adamw", help="both optimizers")
    parser.add_argument("--steps", type=int, default=6, help="generator steps timed (after warm-up)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting step")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--shape-only", action="store_true", help="fake tensors: FLOPs and estimated GPU memory, no timing")
    parser.add_argument("--target-gpu", default="H100", help="--shape-only: the GPU whose bf16 peak the MFU goal refers to")
    parser.add_argument("--out", default=str(RESULTS / "scale.jsonl"))
    args = parser.parse_args()
    full = args.model != "tiny"
    resolution = args.resolution or (512 if full else 64)
    batch = args.batch or {"tiny": 2, "sd15": 4, "sdxl": 1}[args.model]
    inference_steps = args.inference_steps or (50 if full else 10)
    k = args.K or (5 if full else 2)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from benchmarks.shape_only import ShapeOnlyFit

    cuda = torch.cuda.is_available() and not args.shape_only
    precision = args.precision or ("bf16-mixed" if cuda or args.shape_only else "32-true")
    if full:
        from benchmarks.full_size_models import ensure

        pipeline = str(ensure(Path(args.models_dir), args.model))
        captioner = str(ensure(Path(args.models_dir), "blip-large"))
    else:
        pipeline, captioner = "tiny://sd", "tiny://blip"

    config = bench_config(
        pipeline, captioner, accelerator="gpu" if cuda else "cpu", precision=precision,
        max_steps=2 if args.shape_only else 1 + args.warmup + args.steps,  # shape-only: a FLOPs step, a memory step
        resolution=resolution, batch=batch, inference_steps=inference_steps, k=k,
        checkpointing=not args.no_checkpointing, optimizer=args.optimizer,
    )  # fmt: skip

    measure = ShapeOnlyFit() if args.shape_only else StepTimer(cuda=cuda, warmup=args.warmup, count_flops=not args.no_flops)
    run_fit(config, measure)

    device = torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    versions = library_versions()
    setting = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "model": args.model, "resolution": resolution, "batch_per_device": batch, "inference_steps": inference_steps, "K": k,
        "precision": precision, "gradient_checkpointing": not args.no_checkpointing, "optimizer": args.optimizer,
        "losses": list(_LOSSES),
    }  # fmt: skip
    if args.shape_only:
        result = {**setting, **shape_only_figures(measure.result, args.peak_tflops or peak_tflops(args.target_gpu), args.target_gpu),
                  "device": device + ", shape-only (fake tensors)", "versions": versions, "date": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
        write_result(result, Path(args.out))
        return
    peak = args.peak_tflops or (peak_tflops(device) if cuda else None)
    result = {**setting, **measure.figures(batch, peak), "device": device, "torch_threads": torch.get_num_threads(),
              "versions": versions, "date": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    write_result(result, Path(args.out))


class StepTimer(Callback):
    """Times generator steps of a fit: step 0 counts FLOPs (counting slows it, so it is not timed), then ``warmup``
    steps, then every step is timed (the first ``timed`` of them, if given); peak CUDA memory is reset when timing
    starts. With ``deadline`` (a ``time.perf_counter()`` value) the fit stops once ``min_timed`` steps are timed and
    the deadline has passed."""

    def __init__(self, cuda: bool, warmup: int, count_flops: bool = True, deadline: Optional[float] = None, min_timed: int = 3,
                 timed: Optional[int] = None):
        self.cuda, self.warmup, self.count_flops, self.deadline, self.min_timed = cuda, warmup, count_flops, deadline, min_timed
        self.timed = timed
        self.durations: list[float] = []
        self.flops: Optional[int] = None
        self._counter = None

    def _first_timed(self) -> int:
        return (1 if self.count_flops else 0) + self.warmup

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        import torch

        from benchmarks.flop_counting import flop_counter

        if pl_module.generator_step == 0 and self.count_flops:
            self._counter = flop_counter()
            self._counter.__enter__()
        if self.cuda:
            torch.cuda.synchronize()
            if pl_module.generator_step == self._first_timed():
                torch.cuda.reset_peak_memory_stats()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - self._start
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops, self._counter = self._counter.get_total_flops(), None
        elif pl_module.generator_step > self._first_timed():  # generator_step counts the step just finished
            if self.timed is None or len(self.durations) < self.timed:
                self.durations.append(seconds)
        if self.deadline is not None and len(self.durations) >= self.min_timed and time.perf_counter() > self.deadline:
            trainer.should_stop = True

    def figures(self, batch: int, peak_bf16_tflops: Optional[float]) -> dict:
        """Median/min/max seconds per step, images/s, peak memory, TFLOP per step and MFU against ``peak_bf16_tflops``."""
        import torch

        median = statistics.median(self.durations)
        achieved = self.flops / median if self.flops else None
        return {
            "steps_timed": len(self.durations), "seconds_per_generator_step_median": median,
            "seconds_per_generator_step_min": min(self.durations), "seconds_per_generator_step_max": max(self.durations),
            "images_per_second": batch / median,
            "peak_cuda_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None,
            "peak_cuda_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if self.cuda else None,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "model_tflops_per_step": self.flops / 1e12 if self.flops else None,
            "achieved_tflops_per_second": achieved / 1e12 if achieved else None,
            "device_peak_bf16_tflops": peak_bf16_tflops,
            "mfu": achieved / (peak_bf16_tflops * 1e12) if (achieved and peak_bf16_tflops) else None,
        }  # fmt: skip


def bench_config(pipeline: str, captioner: str, *, accelerator: str, precision: str, max_steps: int, resolution: int,
                 batch: int, inference_steps: int, k: int, checkpointing: bool = True, optimizer: str = "adamw",
                 lora_rank: Optional[int] = None, train_file: Optional[Path] = None) -> dict:
    """The demo's fit config with all three CoMat losses (and no logging, validation or checkpoints) on the given
    models and sizes; ``lora_rank`` sets the generator's and the discriminator's LoRA rank (default: the demo's 4;
    the published recipes use 128); ``train_file`` replaces the demo's prompts (e.g. one with precomputed entities,
    so that spaCy never loads)."""
    import yaml

    config = yaml.safe_load((REPO / "configs" / "tiny_demo.yaml").read_text())
    trainer = config["trainer"]
    trainer["callbacks"] = [cb for cb in trainer["callbacks"] if cb["class_path"].split(".")[-1] in _LOSSES]
    for cb in trainer["callbacks"]:
        if cb["class_path"].endswith("ConceptMatchingLoss"):
            cb["init_args"]["captioner"] = captioner
        if cb["class_path"].endswith("FidelityPreservationLoss"):
            if optimizer != "adamw":
                cb["init_args"]["optimizer"] = optimizer
            if lora_rank is not None:
                cb["init_args"]["lora_rank"] = lora_rank
    trainer.update(accelerator=accelerator, precision=precision, max_steps=max_steps,
                   limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False)  # fmt: skip
    model = config["model"]
    model.update(pretrained_model=pipeline, gradient_checkpointing=checkpointing)
    model["sampler"].update(resolution=resolution, num_inference_steps=inference_steps)
    model["gradient_steps"]["init_args"]["num_gradient_steps"] = k
    model["optimizer"]["name"] = optimizer
    if lora_rank is not None:
        model["lora"]["rank"] = lora_rank
    config["data"].update(batch_size=batch, train_file=str(train_file or REPO / "data" / "demo_prompts.jsonl"), val_file=None)
    return config


def run_fit(config: dict, *callbacks, ckpt_path: Optional[str] = None):
    """``train.py fit`` of ``config`` with ``callbacks`` added (resuming from ``ckpt_path`` if given), in a scratch
    folder (the working directory is restored); returns the trained module (its ``trainer`` stays attached)."""
    import yaml

    from comat_lightning.cli import main as cli_main

    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir) / "bench.yaml"
        path.write_text(yaml.safe_dump(config))
        os.chdir(workdir)
        try:
            cli = cli_main(args=["--config", str(path)], run=False)
            cli.trainer.callbacks.extend(callbacks)
            cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=ckpt_path)
        finally:
            os.chdir(cwd)
    return cli.model


def shape_only_figures(measured: dict, peak_bf16_tflops: float, target_gpu: str, mfu_goal: float = 0.35) -> dict:
    """GiB figures of a shape-only run: weights by model, the step's own tensors at their peak by (model, pass),
    their sum (the estimated peak allocated), the step's TFLOP (by (model, pass) down to 0.1 % of the total) and the
    step time ``mfu_goal`` would need on ``target_gpu``."""
    gib = 2**30
    weights = {name: nbytes / gib for name, nbytes in measured["weights"].items() if nbytes}
    at_peak = sorted(measured["at_peak"].items(), key=lambda item: -item[1])
    dynamic = measured["peak_dynamic_bytes"] / gib
    flops = measured["flops"]
    flops_by = sorted(measured["flops_by"].items(), key=lambda item: -item[1])
    return {
        "weights_gib": weights, "weights_total_gib": sum(weights.values()),
        "step_tensors_at_peak_gib": dynamic,
        "step_tensors_at_peak_by_model_gib": {f"{model} {direction}": nbytes / gib for (model, direction), nbytes in at_peak if nbytes >= gib / 100},
        "estimated_peak_allocated_gib": sum(weights.values()) + dynamic,
        "model_tflops_per_step": flops / 1e12,
        "tflops_by_model": {f"{model} {direction}": n / 1e12 for (model, direction), n in flops_by if n >= flops / 1000},
        "target_gpu": target_gpu, "target_peak_bf16_tflops": peak_bf16_tflops,
        f"seconds_per_step_for_mfu_{mfu_goal:g}": flops / (mfu_goal * peak_bf16_tflops * 1e12),
        "nominal_scalar_reads": measured["nominal_reads"],
    }  # fmt: skip


def write_result(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:  # one complete line per run: a crash mid-run appends nothing
        f.write(json.dumps(result) + "\n")
    print(json.dumps(result, indent=2))
    print(f"appended to {out}")


if __name__ == "__main__":
    main()
