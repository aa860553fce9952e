"""Speed, memory and model FLOPs utilisation of one CoMat training configuration. Not a test: it prints figures and
appends one JSON line per run (machine, versions, command, figures) to benchmarks/results/scale.jsonl.

All three CoMat losses (concept matching, attribute concentration, fidelity preservation with on-the-fly real
latents) run through the real module and Trainer. ``--model tiny`` is the CPU demo's models (``tiny-sd3`` /
``tiny-flux``: the tiny MMDiT ones); ``sd15`` / ``sdxl`` are the published architectures with random weights
(benchmarks/full_size_models.py) and the BLIP-large judge; ``sd35-medium`` / ``flux-dev`` (SD3.5-Medium,
FLUX.1-dev) are configs only, too large to hold here: ``--shape-only`` only, their models load as fake tensors.
On these MMDiT families attribute concentration reads the joint attention (``blocks: [joint]``); a loss that the
start-up checks refuse on a model is left out of the run and named in the row (``losses_refused``).

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
    python benchmarks/bench_scale.py --model flux-dev --resolution 1024 --lora-rank 128 --shape-only \
        --optimizer adamw adamw8bit --fsdp2-ranks 1 8      # one fake fit, a row per (optimizer, ranks): 4 rows

Knobs that the one-CPU-process fake run cannot execute are estimated from its figures (``knob_estimates``), as
docs/multi_gpu.md states them for SDXL: ``--optimizer adamw8bit`` (bitsandbytes' kernels do not run on fake
tensors): the fit runs with AdamW and its measured optimizer state is replaced by bitsandbytes' 8-bit state for the
same parameters (1 byte per element and state, an fp32 absmax per 256; tensors under 4096 elements keep 32-bit
state); ``--fsdp2-ranks N`` (FSDP2, one unit per denoiser block, over N GPUs): the denoiser's parameters and the
optimizer state are divided by N, plus the unsharded parameters FSDP2 holds at a time (the root unit, the running
block, the prefetched block and its all-gather buffer: three blocks); the LoRA gradients are left unsharded (an
upper bound: at most the trainable bytes); activations, text encoders, VAE and captioner are per rank, unchanged;
NCCL's own buffers are not counted. Under ``--shape-only`` both options
take several values: the fake fit runs once and one row is appended per combination.
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
from typing import Optional, Sequence

from lightning.pytorch import Callback

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results_file import RESULTS  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.2, "A10G": 70.0}
_LOSSES = ("ConceptMatchingLoss", "AttributeConcentrationLoss", "FidelityPreservationLoss")
# "Fits" (knob_estimates): the estimate plus the CUDA context and kernel workspaces that it leaves out, within 95 %
# of the card's memory (a margin for the caching allocator's fragmentation, which the estimate does not see either).
FIT_RULE = {"gpus_gib": {"80GB": 79.6, "24GB": 23.99}, "context_gib": 0.5, "usable_fraction": 0.95}  # H100/A100 80GB; RTX 3090/4090
TINY_MODELS = {"tiny": "tiny://sd", "tiny-sd3": "tiny://sd3", "tiny-flux": "tiny://flux"}
MMDIT_MODELS = ("tiny-sd3", "tiny-flux", "sd35-medium", "flux-dev")  # attention losses read blocks [joint]
DEFAULT_BATCH = {"tiny": 2, "tiny-sd3": 2, "tiny-flux": 2, "sd15": 4, "sdxl": 1, "sd35-medium": 1, "flux-dev": 1}


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
    parser.add_argument("--model", choices=list(DEFAULT_BATCH), default="tiny")
    parser.add_argument("--models-dir", default="/tmp/comat_full_size", help="where full-size random models are built")
    parser.add_argument("--resolution", type=int, default=None, help="default: 64 (tiny*), 512 (the full-size models)")
    parser.add_argument("--batch", type=int, default=None, help="per device; default: 2 (tiny*), 4 (sd15), 1 (sdxl, sd35-medium, flux-dev)")
    parser.add_argument("--inference-steps", type=int, default=None, help="default: 10 (tiny), 50")
    parser.add_argument("--K", type=int, default=None, help="gradient steps; default: 2 (tiny), 5")
    parser.add_argument("--precision", default=None, help="default: 32-true on CPU, bf16-mixed on GPU")
    parser.add_argument("--no-checkpointing", action="store_true", help="turn gradient checkpointing off")
    parser.add_argument("--optimizer", choices=["adamw", "adamw8bit", "paged_adamw8bit"], nargs="+", default=["adamw"],
                        help="both optimizers (--shape-only: adamw8bit is estimated from an AdamW run; several: a row each)")
    parser.add_argument("--frozen-dtype", choices=["auto", "float32", "bfloat16"], default=None,
                        help="model.frozen_dtype (default: the config's, auto = bf16 under bf16-mixed)")
    parser.add_argument("--lora-rank", type=int, default=None, help="generator and discriminator LoRA rank (default: the demo's 4)")
    parser.add_argument("--fsdp2-ranks", type=int, nargs="+", default=[1], help="--shape-only: estimate FSDP2 over N GPUs (several: a row each)")
    parser.add_argument("--losses", nargs="+", choices=_LOSSES, default=list(_LOSSES), help="the CoMat losses (default: all three)")
    parser.add_argument("--steps", type=int, default=6, help="generator steps timed (after warm-up)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting step")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--shape-only", action="store_true", help="fake tensors: FLOPs and estimated GPU memory, no timing")
    parser.add_argument("--target-gpu", default="H100", help="--shape-only: the GPU whose bf16 peak the MFU goal refers to")
    parser.add_argument("--out", default=str(RESULTS / "scale.jsonl"))
    args = parser.parse_args()
    full = args.model not in TINY_MODELS
    if args.shape_only and "paged_adamw8bit" in args.optimizer:
        parser.error("--shape-only estimates adamw8bit; paged state lives outside the CUDA allocator's count")
    if not args.shape_only and (len(args.optimizer) > 1 or args.fsdp2_ranks != [1]):
        parser.error("several --optimizer values and --fsdp2-ranks are --shape-only estimates; on GPUs set trainer.strategy (docs/multi_gpu.md)")
    resolution = args.resolution or (512 if full else 64)
    batch = args.batch or DEFAULT_BATCH[args.model]
    inference_steps = args.inference_steps or (50 if full else 10)
    k = args.K or (5 if full else 2)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    cuda = torch.cuda.is_available() and not args.shape_only
    precision = args.precision or ("bf16-mixed" if cuda or args.shape_only else "32-true")
    if full:
        from benchmarks.full_size_models import configs_only, ensure

        pipeline = str(ensure(Path(args.models_dir), args.model))
        captioner = str(ensure(Path(args.models_dir), "blip-large"))
        if configs_only(pipeline) and not args.shape_only:
            parser.error(f"--model {args.model} is built from configs only (no weights): use --shape-only")
    else:
        pipeline, captioner = TINY_MODELS[args.model], "tiny://blip"

    fit_optimizer = "adamw" if args.shape_only else args.optimizer[0]  # shape-only: 8-bit state is estimated
    settings = dict(
        accelerator="gpu" if cuda else "cpu", precision=precision,
        max_steps=2 if args.shape_only else 1 + args.warmup + args.steps,  # shape-only: a FLOPs step, a memory step
        resolution=resolution, batch=batch, inference_steps=inference_steps, k=k,
        checkpointing=not args.no_checkpointing, optimizer=fit_optimizer, lora_rank=args.lora_rank,
        frozen_dtype=args.frozen_dtype, attention_blocks=["joint"] if args.model in MMDIT_MODELS else None,
    )  # fmt: skip

    if args.shape_only:
        measure, module, losses, refused = shape_only_fit(pipeline, captioner, settings, args.losses)
    else:
        measure = StepTimer(cuda=cuda, warmup=args.warmup, count_flops=not args.no_flops)
        module, losses, refused = run_fit_accepted(pipeline, captioner, settings, measure, losses=args.losses)

    device = torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    versions = library_versions()
    setting = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "model": args.model, "resolution": resolution, "batch_per_device": batch, "inference_steps": inference_steps, "K": k,
        "precision": precision, "gradient_checkpointing": not args.no_checkpointing, "optimizer": fit_optimizer,
        "frozen_dtype": module.frozen_dtype, "lora_rank": args.lora_rank or 4, "losses": losses,
        **({"losses_refused": refused} if refused else {}),
    }  # fmt: skip
    if args.shape_only:
        figures = shape_only_figures(measure.result, args.peak_tflops or peak_tflops(args.target_gpu), args.target_gpu)
        parameters = parameter_counts(module)
        for optimizer in dict.fromkeys(args.optimizer):
            for ranks in dict.fromkeys(args.fsdp2_ranks):
                knobs = knob_estimates(module, measure.result, optimizer, ranks)
                result = {**setting, "optimizer": optimizer, "fsdp2_ranks": ranks, "parameters": parameters, **figures, **knobs,
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
                 lora_rank: Optional[int] = None, train_file: Optional[Path] = None, losses: Sequence[str] = _LOSSES,
                 frozen_dtype: Optional[str] = None, attention_blocks: Optional[list] = None) -> dict:
    """The demo's fit config with the CoMat ``losses`` (default all three; no logging, validation or checkpoints) on
    the given models and sizes; ``lora_rank`` sets the generator's and the discriminator's LoRA rank (default: the
    demo's 4; the published recipes use 128); ``train_file`` replaces the demo's prompts (e.g. one with precomputed
    entities, so that spaCy never loads); ``frozen_dtype`` sets ``model.frozen_dtype`` (default: the config's);
    ``attention_blocks`` the blocks attribute concentration reads (``["joint"]`` on an MMDiT)."""
    import yaml

    config = yaml.safe_load((REPO / "configs" / "tiny_demo.yaml").read_text())
    trainer = config["trainer"]
    trainer["callbacks"] = [cb for cb in trainer["callbacks"] if cb["class_path"].split(".")[-1] in losses]
    for cb in trainer["callbacks"]:
        if cb["class_path"].endswith("ConceptMatchingLoss"):
            cb["init_args"]["captioner"] = captioner
        if cb["class_path"].endswith("AttributeConcentrationLoss") and attention_blocks is not None:
            cb["init_args"]["blocks"] = list(attention_blocks)
        if cb["class_path"].endswith("FidelityPreservationLoss"):
            if optimizer != "adamw":
                cb["init_args"]["optimizer"] = optimizer
            if lora_rank is not None:
                cb["init_args"]["lora_rank"] = lora_rank
    trainer.update(accelerator=accelerator, precision=precision, max_steps=max_steps,
                   limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False)  # fmt: skip
    model = config["model"]
    model.update(pretrained_model=pipeline, gradient_checkpointing=checkpointing)
    if frozen_dtype is not None:
        model["frozen_dtype"] = frozen_dtype
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


def run_fit_accepted(pipeline: str, captioner: str, settings: dict, *callbacks, losses: Sequence[str] = _LOSSES):
    """``run_fit`` of ``bench_config(pipeline, captioner, losses=..., **settings)``; a loss that the start-up checks
    refuse (an ``InputError`` naming it, raised before any weight loads) is left out and the fit is retried.
    Returns (module, losses run, {refused loss: the check's message})."""
    from comat_lightning.errors import InputError

    losses, refused = list(losses), {}
    while True:
        try:
            return run_fit(bench_config(pipeline, captioner, losses=losses, **settings), *callbacks), losses, refused
        except InputError as err:
            named = [loss for loss in losses if loss in str(err) and loss != "ConceptMatchingLoss"]
            if not named:
                raise
            refused[named[0]] = str(err)
            losses.remove(named[0])
            print(f"{named[0]} refused by the start-up checks, estimating without it: {err}", file=sys.stderr)


def shape_only_fit(pipeline: str, captioner: str, settings: dict, losses: Sequence[str] = _LOSSES):
    """The shape-only fit (:class:`ShapeOnlyFit`) of ``run_fit_accepted``; a configs-only pipeline (SD3.5-Medium,
    FLUX.1-dev) loads as fake tensors of the fit's own fake mode. Returns (measure, module, losses, refused)."""
    import contextlib

    from torch._subclasses.fake_tensor import FakeTensorMode

    from benchmarks.full_size_models import configs_only, fake_loading
    from benchmarks.shape_only import ShapeOnlyFit

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    loading = fake_loading(fake_mode) if configs_only(pipeline) else contextlib.nullcontext()
    measure = ShapeOnlyFit(fake_mode=fake_mode)
    with loading:
        module, losses, refused = run_fit_accepted(pipeline, captioner, settings, measure, losses=losses)
    return measure, module, losses, refused


def parameter_counts(module) -> dict:
    """Parameters by model (each once; a loss helper that reuses the denoiser counts only its own), the total, the
    trainable ones (generator LoRA, discriminator LoRA and head) and the denoiser's buffers (SD3's positional
    table)."""
    from benchmarks.shape_only import labelled_models

    seen, by_model, trainable = set(), {}, 0
    for name, model in labelled_models(module).items():
        count = 0
        for param in model.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                count += param.numel()
                trainable += param.numel() if param.requires_grad else 0
        by_model[name] = count
    denoiser = module.backbone.unet
    return {"by_model": by_model, "total": sum(by_model.values()), "trainable": trainable,
            "denoiser_trainable": sum(p.numel() for p in denoiser.parameters() if p.requires_grad),
            "denoiser_buffers": sum(b.numel() for b in denoiser.buffers())}  # fmt: skip


def knob_estimates(module, measured: dict, optimizer: str, fsdp2_ranks: int) -> dict:
    """``estimated_peak_allocated_gib`` of the measured one-device AdamW run (``measured``: ShapeOnlyFit's result)
    with the 8-bit optimizer and FSDP2 over ``fsdp2_ranks`` GPUs applied as the module docstring says; the measured
    figure is kept as ``shape_only_peak_allocated_gib_one_device_adamw``. Byte counts round each tensor up to 512.
    ``fits``: whether the estimate leaves room on an 80 GB and a 24 GB GPU (:data:`FIT_RULE`)."""
    from benchmarks.shape_only import adamw8bit_state_bytes, allocated_bytes
    from comat_lightning.models.sharding import denoiser_blocks

    gib = 2**30
    weights, dynamic = sum(measured["weights"].values()), measured["peak_dynamic_bytes"]
    adamw_state = measured["optimizer_state_bytes"]
    state = adamw_state if optimizer == "adamw" else sum(adamw8bit_state_bytes(params) for params in measured["optimizer_params"])
    out = {"shape_only_peak_allocated_gib_one_device_adamw": (weights + dynamic) / gib, "optimizer_state_gib": state / gib,
           "optimizer_state_gib_adamw_shape_only": adamw_state / gib}  # fmt: skip
    peak = weights + dynamic - adamw_state + state
    if fsdp2_ranks > 1:
        n = fsdp2_ranks

        def nbytes(params) -> int:
            return sum(allocated_bytes(p.untyped_storage()) for p in params)

        denoiser = module.backbone.unet
        blocks = [nbytes(block.parameters()) for block in denoiser_blocks(denoiser)]
        sharded = nbytes(denoiser.parameters())
        in_denoiser = {id(p) for p in denoiser.parameters()}
        helper_trainable = nbytes({id(p): p for m in module.loss_modules.values() for p in m.parameters()
                                   if p.requires_grad and id(p) not in in_denoiser}.values())  # fmt: skip
        root = sharded - sum(blocks)
        # unsharded at a time: the root unit (kept from forward to backward) and up to three blocks' worth: the running
        # block, the prefetched one, and the prefetched one's all-gather buffer while it is copied out
        gathered = root + 3 * max(blocks)
        trainable = nbytes(p for p in module.parameters() if p.requires_grad)
        saved = (sharded + helper_trainable + state) * (1 - 1 / n)
        peak += gathered * (1 - 1 / n) - saved
        out["fsdp2"] = {
            "ranks": n, "sharded_weights_gib_per_rank": (sharded + helper_trainable) / n / gib,
            "replicated_weights_gib": (weights - sharded - helper_trainable) / gib,
            "unsharded_at_a_time_gib": gathered / gib, "largest_block_gib": max(blocks) / gib, "root_unit_gib": root / gib,
            "optimizer_state_gib_per_rank": state / n / gib, "lora_gradients_unsharded_upper_bound_gib": trainable / gib,
        }  # fmt: skip
    out["estimated_peak_allocated_gib"] = peak / gib
    out["fits"] = {name: peak / gib + FIT_RULE["context_gib"] <= FIT_RULE["usable_fraction"] * total for name, total in FIT_RULE["gpus_gib"].items()}
    out["estimate_method"] = ("shape-only run (one device, AdamW)" + (" + bitsandbytes 8-bit AdamW state" if optimizer != "adamw" else "")
                              + (f" + FSDP2 over {fsdp2_ranks} ranks (analytic)" if fsdp2_ranks > 1 else ""))  # fmt: skip
    return out


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
