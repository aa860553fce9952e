"""The GPU check: full-size speed, memory, MFU and a CUDA correctness smoke in one command of at most ~8 minutes.

GPU time comes in short leases on a machine with no network, so everything is prepared here and runs as one
command (benchmarks/gpu_check.sh installs the carried wheels, then runs this). In order of priority, each
measurement one JSON line in ``OUT/gpu_check.jsonl`` (step rows also in ``OUT/scale.jsonl``, in
benchmarks/results/scale.jsonl's format, to append there):

1. ``matmul_peak``: an 8192^3 bf16 matmul, the chip's measured dense peak (MFU is against it and the data sheet);
2. ``comat_step``: CoMat SD1.5 512 px batch 4, SDXL 512 px batch 1 and 4, all three losses, 50 steps, K 5,
   bf16-mixed, gradient checkpointing: s/step (median of >= 3 after warm-up), images/s, peak allocated and
   reserved, TFLOP per step (FlopCounterMode) and MFU, beside the shape-only estimate of the same setting
   (``estimated_peak_allocated_gib`` from scale.jsonl, made by ``bench_scale.py --shape-only``);
3. ``guided_sampling``: seconds per SD1.5 512 px image at 50 steps: plain, A-STAR, our Attend-and-Excite,
   diffusers' Attend-and-Excite pipeline (interleaved rounds, paired ratios);
4. ``smoke``: a bf16 vs fp32 rollout on the same noise, the VAEs' bf16 decode, a checkpoint save/resume round trip;
5. ``comat_step`` variants: SD1.5 with 8-bit AdamW (its state on CUDA must be uint8), without checkpointing, and
   with the recipes' LoRA rank 128; ``--profile``: the top CUDA kernels of one SD1.5 step (``profile_sd15.txt``).

A global time budget (``--budget``, seconds from start, model building included) skips what no longer fits and
says so in a ``skipped`` row, so a lease is never lost to a timeout; a failing measurement writes an ``error`` row
and the check goes on. Models are the published architectures with random weights, made on the GPU
(benchmarks/full_size_models.py); speed and memory do not depend on the weights.

    bash benchmarks/gpu_check.sh                         # on the GPU machine ($OUT set by the device tool)
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check_dry   # here: the same path on CPU, tiny models
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

START = time.perf_counter()
COMMAND = "python " + " ".join(shlex.quote(a) for a in sys.argv)
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning.pytorch import Callback  # noqa: E402

from benchmarks.bench_scale import StepTimer, bench_config, library_versions, peak_tflops, run_fit  # noqa: E402
from benchmarks.cuda_smoke import optimizer_state_dtypes, predicted_images, resume_round_trip, vae_decode_finite  # noqa: E402

RESULTS_FILE = REPO / "benchmarks" / "results" / "scale.jsonl"
# data/demo_prompts.jsonl with its entity parse precomputed (python -m comat_lightning.tools.prepare_entities): spaCy
# is not on the GPU image, and the parse is the same text work on any machine
PROMPTS = REPO / "benchmarks" / "data" / "gpu_check_prompts.jsonl"
NO_CUDA = ("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False).\n"
           "  This check measures a GPU; on a CPU run it as: python benchmarks/gpu_check.py --dry-run")  # fmt: skip


@dataclass
class Plan:
    """Sizes of one check: the full-size one on a GPU, or tiny models on the CPU for ``--dry-run`` (same code)."""

    dry_run: bool
    sd15: str = "sd15"
    sdxl: str = "sdxl"
    names: dict = field(default_factory=lambda: {"sd15": "sd15", "sdxl": "sdxl"})  # in rows (bench_scale.py's --model)
    captioner: str = "blip-large"
    resolution: int = 512
    inference_steps: int = 50
    k: int = 5
    guidance_layers_res: int = 16  # SD1.5's 16x16 maps at 512 px, as A&E and A-STAR read them
    warmup: int = 1
    timed: int = 3
    batch_cap: int = 64  # the dry run caps batches at 2 (seconds on a CPU)
    rounds: int = 3
    matmul_side: int = 8192
    # seconds each measurement is expected to take on an H100 (model loading included); skipped if less is left
    expected: dict = field(default_factory=lambda: {"matmul_peak": 5, "sd15_b4": 75, "sdxl_b1": 75, "sdxl_b4": 80,
                                                    "guided_sampling": 60, "smoke": 45, "sd15_b4_adamw8bit": 45,
                                                    "sd15_b4_no_checkpointing": 50, "sd15_b4_rank128": 45})  # fmt: skip

    @classmethod
    def for_run(cls, dry_run: bool) -> "Plan":
        if not dry_run:
            return cls(dry_run=False)
        return cls(dry_run=True, sd15="tiny://sd", sdxl="tiny://sdxl", names={"sd15": "tiny", "sdxl": "tiny-sdxl"},
                   captioner="tiny://blip", resolution=64, inference_steps=2,
                   k=1, guidance_layers_res=8, warmup=0, timed=3, batch_cap=2, rounds=1, matmul_side=256,
                   expected={name: 0 for name in cls(dry_run=False).expected})  # fmt: skip


class Check:
    """Runs measurements under the budget and writes their rows."""

    def __init__(self, args, plan: Plan):
        import torch

        self.args, self.plan = args, plan
        self.cuda = not plan.dry_run
        self.device = torch.cuda.get_device_name() if self.cuda else f"cpu ({os.cpu_count()} cores, {platform.machine()}), dry run"
        self.deadline = START + args.budget
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self.models: dict[str, str] = {}
        self.matmul_tflops: Optional[float] = None
        self.estimates = shape_only_rows(RESULTS_FILE)

    # ---------------------------------------------------------------------------------------------- plumbing
    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def run(self, name: str, measurement: str, fn: Callable[[], dict]) -> Optional[dict]:
        """``fn()``'s figures as one row, or a ``skipped`` row if its expected time no longer fits the budget, or an
        ``error`` row (the check goes on)."""
        expected = self.plan.expected.get(name, 0)
        row = {"measurement": measurement, "name": name}
        if self.left() < expected:
            row.update(status="skipped", reason=f"time budget: {self.left():.0f} s left, about {expected} s needed")
            return self._write(row)
        start = time.perf_counter()
        try:
            row.update(fn())
            row["status"] = "ok"
        except Exception as err:  # noqa: BLE001 - a lease must not end on one failed measurement
            row.update(status="error", error=f"{type(err).__name__}: {err}"[:2000], traceback=traceback.format_exc()[-4000:])
        row["wall_seconds"] = time.perf_counter() - start
        self._free()
        return self._write(row)

    def _free(self) -> None:
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def _write(self, row: dict) -> dict:
        import torch

        row.update(device=self.device, dry_run=self.plan.dry_run, versions=library_versions(), date=time.strftime("%Y-%m-%d %H:%M:%S"),
                   command=COMMAND, elapsed_since_start=time.perf_counter() - START,
                   torch_threads=torch.get_num_threads())  # fmt: skip
        self.rows.append(row)
        with (self.out / "gpu_check.jsonl").open("a") as f:  # one complete line per measurement
            f.write(json.dumps(row) + "\n")
        if row["measurement"] == "comat_step" and row["status"] == "ok":
            with (self.out / "scale.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
        print(summary_line(row), flush=True)
        return row

    def model(self, name: str) -> str:
        """A model folder (full size: built on the GPU on first use) or a tiny:// name."""
        if self.plan.dry_run:
            return name
        if name not in self.models:
            from benchmarks.full_size_models import ensure

            self.models[name] = str(ensure(Path(self.args.models_dir), name, device="cuda"))
        return self.models[name]

    # ---------------------------------------------------------------------------------------------- measurements
    def matmul_peak(self) -> dict:
        import torch

        n, device = self.plan.matmul_side, "cuda" if self.cuda else "cpu"
        a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
        for _ in range(3):
            a @ b
        times = []
        for _ in range(10):
            sync(self.cuda)
            start = time.perf_counter()
            a @ b
            sync(self.cuda)
            times.append(time.perf_counter() - start)
        self.matmul_tflops = 2 * n**3 / statistics.median(times) / 1e12
        return {"side": n, "dtype": "bfloat16", "seconds_median": statistics.median(times), "tflops": self.matmul_tflops,
                "data_sheet_bf16_tflops": peak_tflops(self.device)}  # fmt: skip

    def comat_step(self, model: str, batch: int, checkpointing: bool = True, optimizer: str = "adamw",
                   lora_rank: Optional[int] = None, profile: bool = False) -> dict:
        plan = self.plan
        batch = min(batch, plan.batch_cap)
        pipeline = self.model(plan.sd15 if model == "sd15" else plan.sdxl)
        captioner = self.model(plan.captioner)
        steps = 1 + plan.warmup + plan.timed + (1 if profile else 0)  # FLOPs step, warm-up, timed, profiled
        config = bench_config(pipeline, captioner, accelerator="gpu" if self.cuda else "cpu", precision="bf16-mixed", max_steps=steps,
                              resolution=plan.resolution, batch=batch, inference_steps=plan.inference_steps, k=plan.k,
                              checkpointing=checkpointing, optimizer=optimizer, lora_rank=lora_rank, train_file=PROMPTS)  # fmt: skip
        timer = StepTimer(cuda=self.cuda, warmup=plan.warmup, deadline=self.deadline, timed=plan.timed)
        callbacks = [timer] + ([ProfileStep(steps - 1, self.out / "profile_sd15.txt", self.cuda)] if profile else [])
        module = run_fit(config, *callbacks)
        figures = timer.figures(batch, self.matmul_tflops)
        sheet = peak_tflops(self.device)
        figures["mfu_vs_data_sheet"] = figures["achieved_tflops_per_second"] / sheet if (sheet and figures["achieved_tflops_per_second"]) else None
        setting = {"model": plan.names[model], "resolution": plan.resolution, "batch_per_device": batch, "inference_steps": plan.inference_steps,
                   "K": plan.k, "precision": "bf16-mixed", "gradient_checkpointing": checkpointing, "optimizer": optimizer,
                   "lora_rank": lora_rank or 4, "losses": ["ConceptMatchingLoss", "AttributeConcentrationLoss", "FidelityPreservationLoss"]}  # fmt: skip
        estimate, why_none = self.estimate(setting)
        measured = figures["peak_cuda_allocated_gib"]
        row = {**setting, **figures, "estimated_peak_allocated_gib": estimate, "estimate_missing": why_none,
               "measured_over_estimated": measured / estimate if (measured and estimate) else None}  # fmt: skip
        if optimizer != "adamw":
            state = optimizer_state_dtypes(module.trainer.optimizers[0])
            row.update(optimizer_state=state, optimizer_state_uint8_on_cuda=state.get("cuda:uint8", 0) > 0)
        del module
        return row

    def estimate(self, setting: dict) -> tuple[Optional[float], Optional[str]]:
        """The shape-only estimate of this setting's peak allocated GiB from scale.jsonl, or None and why (a
        full-size shape-only run takes many minutes on a CPU: it is made beforehand, not during a lease)."""
        key = estimate_key(setting)
        if key in self.estimates:
            return self.estimates[key], None
        if setting["optimizer"] != "adamw":
            return None, "the shape-only estimator cannot run bitsandbytes' kernels on fake tensors"
        flags = (f"--model {setting['model']} --batch {setting['batch_per_device']} --resolution {setting['resolution']} "
                 f"--inference-steps {setting['inference_steps']} --K {setting['K']}"
                 + ("" if setting["gradient_checkpointing"] else " --no-checkpointing"))  # fmt: skip
        return None, f"no shape-only row in scale.jsonl for this setting: python benchmarks/bench_scale.py --shape-only {flags}"

    def guided_sampling(self) -> dict:
        from benchmarks.bench_guidance import guidance_samplers, summarise, time_round_robin

        plan = self.plan
        samplers = guidance_samplers(self.model(plan.sd15), plan.resolution, plan.inference_steps, plan.guidance_layers_res,
                                     "cuda" if self.cuda else "cpu", precision="bf16-mixed")  # fmt: skip
        times = time_round_robin(samplers, plan.rounds, self.cuda, deadline=self.deadline)
        return {"model": "sd15", "resolution": plan.resolution, "steps": plan.inference_steps, "precision": "bf16-mixed",
                "layers_res": plan.guidance_layers_res, **summarise(times)}  # fmt: skip

    def smoke(self) -> dict:
        import torch

        plan = self.plan
        sd15 = self.model(plan.sd15)
        bf16, fp32 = (predicted_images(sd15, plan.resolution, plan.inference_steps, precision, self.cuda) for precision in ("bf16-mixed", "32-true"))
        relative = ((bf16 - fp32).norm() / fp32.norm()).item()
        decodes = {name: vae_decode_finite(self.model(getattr(plan, name)), plan.resolution, self.cuda) for name in ("sd15", "sdxl")}
        resume = resume_round_trip(self.model(plan.sd15), self.model(plan.captioner), self.cuda, plan.resolution, plan.inference_steps, PROMPTS)
        checks = {"rollout_images_finite": bool(torch.isfinite(bf16).all() and torch.isfinite(fp32).all()),
                  "vae_bf16_decode_finite": all(decodes.values()), "resume_round_trip": resume["passed"]}  # fmt: skip
        return {"bf16_vs_fp32_rollout_relative_difference": relative, "vae_bf16_decode_finite_by_model": decodes,
                "resume": resume, "checks": checks, "all_passed": all(checks.values())}  # fmt: skip


# -------------------------------------------------------------------------------------------------- helpers
def sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def estimate_key(setting: dict) -> tuple:
    return tuple(setting.get(k) for k in ("model", "resolution", "batch_per_device", "inference_steps", "K", "precision",
                                          "gradient_checkpointing", "optimizer")) + (
        setting.get("lora_rank") or 4, setting.get("frozen_dtype") or "auto", setting.get("fsdp2_ranks") or 1)  # fmt: skip


def shape_only_rows(path: Path) -> dict[tuple, float]:
    """Estimated peak allocated GiB by setting, from the shape-only rows of ``path`` (the latest row wins)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return {estimate_key(r): r["estimated_peak_allocated_gib"] for r in rows if "estimated_peak_allocated_gib" in r and "shape-only" in r.get("device", "")}


class ProfileStep(Callback):
    """Profiles generator step ``step`` with torch.profiler and writes the top kernels by time as a text table."""

    def __init__(self, step: int, path: Path, cuda: bool):
        self.step, self.path, self.cuda, self.profiler = step, path, cuda, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.generator_step == self.step:
            from torch.profiler import ProfilerActivity, profile

            self.profiler = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else []))
            self.profiler.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.profiler is not None:
            sync(self.cuda)
            self.profiler.__exit__(None, None, None)
            sort = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
            table = self.profiler.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70)
            self.path.write_text(f"One SD1.5 CoMat step (generator step {self.step}), top operators and kernels by {sort}\n{table}\n")
            self.profiler = None


def summary_line(row: dict) -> str:
    """One human line per row (the JSON line holds everything)."""
    head = f"[{row['elapsed_since_start']:6.0f} s] {row['name']:<26} {row['status']}"
    if row["status"] != "ok":
        return f"{head}: {row.get('reason') or row.get('error')}"
    if row["measurement"] == "matmul_peak":
        return f"{head}: {row['tflops']:.0f} TFLOP/s bf16 ({row['side']}^3)"
    if row["measurement"] == "comat_step":
        gib, estimate, mfu = row["peak_cuda_allocated_gib"], row["estimated_peak_allocated_gib"], row["mfu"]
        return (f"{head}: {row['seconds_per_generator_step_median']:.3f} s/step, {row['images_per_second']:.2f} img/s, "
                f"peak {'-' if gib is None else f'{gib:.2f}'} GiB (estimated {'-' if estimate is None else f'{estimate:.2f}'}), "
                f"{row['model_tflops_per_step'] or 0:.1f} TFLOP/step, MFU {'-' if mfu is None else f'{mfu:.1%}'}")  # fmt: skip
    if row["measurement"] == "guided_sampling":
        ratios = ", ".join(f"{k} x{v:.2f}" for k, v in row["ratio_to_plain"].items() if k != "plain")
        return f"{head}: plain {row['seconds_per_image_median']['plain']:.2f} s/image; {ratios}"
    if row["measurement"] == "smoke":
        return f"{head}: {'passed' if row['all_passed'] else 'FAILED'} {row['checks']}, bf16 vs fp32 {row['bf16_vs_fp32_rollout_relative_difference']:.3g}"
    return head


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny models, same code path (what the tests run)")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "runs" / "gpu_check"), help="folder for the rows (default $OUT)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds from start; what no longer fits is skipped")
    parser.add_argument("--models-dir", default=str(Path(tempfile.gettempdir()) / "comat_full_size"))
    parser.add_argument("--parts", nargs="+", default=["core", "adamw8bit", "extra"], choices=["core", "adamw8bit", "extra"],
                        help="core: peak, steps, sampling, smoke; adamw8bit: needs the bitsandbytes wheel (43 MB; a second "
                             "command if the wheels do not fit one tree); extra: no checkpointing, LoRA rank 128")  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="torch.profiler table of one SD1.5 step (profile_sd15.txt)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.argv = sys.argv[:1]  # the fits below parse their own arguments (LightningCLI warns about ours otherwise)

    import logging

    import torch

    from comat_lightning.cli import quiet_startup

    quiet_startup()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # one summary line per measurement instead

    if not args.dry_run and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    plan = Plan.for_run(args.dry_run)
    check = Check(args, plan)
    print(f"gpu_check on {check.device}: budget {args.budget:.0f} s, rows -> {check.out / 'gpu_check.jsonl'}", flush=True)
    if "core" in args.parts:
        check.run("matmul_peak", "matmul_peak", check.matmul_peak)
        check.run("sd15_b4", "comat_step", lambda: check.comat_step("sd15", 4, profile=args.profile))
        check.run("sdxl_b1", "comat_step", lambda: check.comat_step("sdxl", 1))
        check.run("sdxl_b4", "comat_step", lambda: check.comat_step("sdxl", 4))
        check.run("guided_sampling", "guided_sampling", check.guided_sampling)
        check.run("smoke", "smoke", check.smoke)
    if "adamw8bit" in args.parts:
        check.run("sd15_b4_adamw8bit", "comat_step", lambda: check.comat_step("sd15", 4, optimizer="adamw8bit"))
    if "extra" in args.parts:
        check.run("sd15_b4_no_checkpointing", "comat_step", lambda: check.comat_step("sd15", 4, checkpointing=False))
        check.run("sd15_b4_rank128", "comat_step", lambda: check.comat_step("sd15", 4, lora_rank=128))
    failed = [r["name"] for r in check.rows if r["status"] == "error"]
    print(f"gpu_check done in {time.perf_counter() - START:.0f} s: {len(check.rows)} rows"
          + (f", errors: {', '.join(failed)}" if failed else ""), flush=True)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
