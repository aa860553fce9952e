"""The module's option groups (typed dataclasses: LightningCLI reads them as the config schema) and their checks,
run before any model is loaded so that a bad config fails in seconds."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, get_args

import torch

from comat_lightning.errors import InputError, raise_problems
from comat_lightning.models.adapters import LoraConfig  # the online LoRA's options, beside the other groups
from comat_lightning.sampling.step_policies import GradientStepPolicy


@dataclass
class SamplerConfig:
    """The online model's rollout. Defaults are the published CoMat settings. Checks itself when made."""

    resolution: int = 512  # both SD1.5 and SDXL are fine-tuned at 512 px in the paper
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    scheduler: str = "DDPMScheduler"  # stochastic, as the paper; any diffusers scheduler class name works
    detach_unet_input: bool = False  # True = SDXL official (UNet input detached at gradient steps)

    def __post_init__(self) -> None:
        import diffusers

        problems = []
        if self.resolution <= 0 or self.resolution % 8:
            problems.append(("resolution", str(self.resolution), "must be a positive multiple of 8 (the VAE factor)"))
        if self.num_inference_steps < 1:
            problems.append(("num_inference_steps", str(self.num_inference_steps), "must be >= 1"))
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            problems.append(("guidance_scale", str(self.guidance_scale), "must be a finite number >= 0"))
        scheduler_cls = getattr(diffusers, self.scheduler, None)
        if scheduler_cls is None or not hasattr(scheduler_cls, "set_timesteps"):
            problems.append(("scheduler", repr(self.scheduler), "not a diffusers scheduler class (e.g. DDPMScheduler)"))
        raise_problems(problems, "model.sampler")


OptimizerName = Literal["adamw", "adamw8bit", "paged_adamw8bit"]
OPTIMIZER_NAMES: tuple[str, ...] = get_args(OptimizerName)


@dataclass
class OptimizerConfig:
    """An AdamW (the generator's: ``model.optimizer``; the discriminator's reuses it). Published: lr 5e-5 (SD1.5) /
    2e-5 (SDXL), constant LR. Checks itself when made."""

    name: OptimizerName = "adamw"  # adamw8bit / paged_adamw8bit: bitsandbytes, 8-bit state for tensors >= 4096 elements
    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8
    grad_clip: Optional[float] = 0.1  # max gradient norm; None disables clipping
    warmup_steps: int = 0  # linear warm-up, then constant

    def __post_init__(self) -> None:
        problems = []
        if not self.lr > 0:
            problems.append(("lr", str(self.lr), "must be > 0"))
        if self.grad_clip is not None and not self.grad_clip > 0:
            problems.append(("grad_clip", str(self.grad_clip), "must be > 0 (or null to disable)"))
        if self.weight_decay < 0:
            problems.append(("weight_decay", str(self.weight_decay), "must be >= 0"))
        if len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas):
            problems.append(("betas", str(list(self.betas)), "must be two numbers in [0, 1)"))
        if self.warmup_steps < 0:
            problems.append(("warmup_steps", str(self.warmup_steps), "must be >= 0"))
        if self.name not in OPTIMIZER_NAMES:
            problems.append(("name", repr(self.name), f"expected one of {', '.join(OPTIMIZER_NAMES)}"))
        raise_problems(problems, "model.optimizer")

    def build(self, params) -> torch.optim.Optimizer:
        return build_optimizer(self.name, params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay, eps=self.eps)


def build_optimizer(name: OptimizerName, params, lr: float, betas, weight_decay: float, eps: float = 1e-8) -> torch.optim.Optimizer:
    """torch's AdamW, or bitsandbytes' 8-bit AdamW (optionally paged: state in unified memory that is evicted to
    the CPU under GPU memory pressure). 8-bit state quarters the optimizer memory of large tensors; smaller ones
    (< 4096 elements, bitsandbytes' default) keep 32-bit state."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps)
    if name in ("adamw8bit", "paged_adamw8bit"):
        try:
            import bitsandbytes.optim as bnb_optim
        except ImportError as err:  # also raised by a bitsandbytes build that does not match the machine
            raise ImportError(f"optimizer {name!r} needs bitsandbytes (pip install 'bitsandbytes>=0.45'): {err}") from err
        cls = bnb_optim.PagedAdamW8bit if name == "paged_adamw8bit" else bnb_optim.AdamW8bit
        return cls(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps)
    raise InputError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZER_NAMES)}")


def check_trainer(trainer, optimizers: dict[str, str], adversarial: bool) -> None:
    """Refuse trainer settings this module cannot run, before any model loads; each message names the setting
    and what to use instead. ``optimizers`` maps option name -> optimizer name (generator and discriminator)."""
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    strategy, problems = trainer.strategy, []
    if isinstance(strategy, DeepSpeedStrategy):
        problems.append("trainer.strategy=deepspeed: DeepSpeed supports one optimizer and automatic optimization; this "
                        "module steps a generator and a discriminator optimizer by hand. Use ddp (several GPUs) or "
                        "bf16-mixed with model.gradient_checkpointing and adamw8bit to save memory")  # fmt: skip
    if isinstance(strategy, FSDPStrategy):
        problems.append("trainer.strategy=fsdp: Lightning's FSDPStrategy (FSDP1) cannot run manual optimization with two "
                        "optimizers. For FSDP2 use strategy: {class_path: lightning.pytorch.strategies.ModelParallelStrategy, "
                        "init_args: {save_distributed_checkpoint: false}} (the module shards its UNet in configure_model), "
                        "or ddp_find_unused_parameters_true")  # fmt: skip
    if isinstance(strategy, ModelParallelStrategy):
        if strategy._save_distributed_checkpoint:
            problems.append("ModelParallelStrategy(save_distributed_checkpoint=True): checkpoints hold only the trainable "
                            "weights (the frozen models are reloaded from their source), which a sharded checkpoint cannot "
                            "restore; set save_distributed_checkpoint: false (the LoRA is small enough to gather on rank 0)")  # fmt: skip
        if strategy._tensor_parallel_size != 1:  # Lightning's "auto" means every device of a node
            problems.append(f"ModelParallelStrategy(tensor_parallel_size={strategy._tensor_parallel_size}): only data-parallel "
                            "sharding (FSDP2) is implemented; set tensor_parallel_size: 1 and data_parallel_size: "
                            "<nodes x devices>")  # fmt: skip
    sharded = isinstance(strategy, (FSDPStrategy, ModelParallelStrategy))
    for option, name in optimizers.items():
        if name != "adamw" and sharded:
            problems.append(f"{option}={name} with a sharded strategy ({type(strategy).__name__}): bitsandbytes' 8-bit "
                            "state does not work on sharded (DTensor) parameters; use adamw")  # fmt: skip
    if adversarial and isinstance(strategy, DDPStrategy) and strategy.world_size > 1 and not strategy._ddp_kwargs.get("find_unused_parameters"):
        problems.append("trainer.strategy=ddp with an adversarial loss: each phase leaves the other's parameters "
                        "without gradient, which DDP rejects; use strategy: ddp_find_unused_parameters_true")  # fmt: skip
    if trainer.gradient_clip_val is not None:
        problems.append(f"trainer.gradient_clip_val={trainer.gradient_clip_val}: the module clips by hand (manual "
                        "optimization); set model.optimizer.grad_clip (and the adversarial loss's grad_clip) instead")  # fmt: skip
    precision = str(trainer.precision)
    if precision.startswith("16") and strategy.root_device.type == "cpu":
        problems.append(f"trainer.precision={precision} on CPU: fp16 autocast is not supported there; use bf16-mixed or 32-true")
    if problems:
        raise InputError("unsupported trainer settings:\n  " + "\n  ".join(problems))


def check_options(sampler: SamplerConfig, gradient_steps: GradientStepPolicy) -> None:
    """What no option group can check alone (each checks itself when made): the gradient-step policy against the
    number of denoising steps."""
    try:  # e.g. K gradient steps > num_inference_steps
        gradient_steps.select(sampler.num_inference_steps, torch.Generator().manual_seed(0))
    except ValueError as err:
        raise InputError(
            f"invalid options:\n  model.gradient_steps: {err}; its gradient steps must be among the model.sampler.num_inference_steps denoising steps"
        ) from None


__all__ = ["LoraConfig", "OPTIMIZER_NAMES", "OptimizerConfig", "OptimizerName", "SamplerConfig", "build_optimizer", "check_options", "check_trainer"]
