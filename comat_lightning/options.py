"""The module's option groups (typed dataclasses: LightningCLI reads them as the config schema) and their checks,
run before any model is loaded so that a bad config fails in seconds."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch

from comat_lightning.rollout import GradientStepPolicy

if TYPE_CHECKING:
    from comat_lightning.diffusion_model import DiffusionBackbone


@dataclass
class SamplerConfig:
    """The online model's rollout. Defaults are the published CoMat settings."""

    resolution: int = 512  # both SD1.5 and SDXL are fine-tuned at 512 px in the paper
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    scheduler: str = "DDPMScheduler"  # stochastic, as the paper; any diffusers scheduler class name works
    detach_unet_input: bool = False  # True = SDXL official (UNet input detached at gradient steps)


@dataclass
class LoraConfig:
    """LoRA on the online UNet. alpha = rank gives scale 1.0, as the paper."""

    rank: int = 128
    alpha: Optional[float] = None  # None: same as rank
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class OptimizerConfig:
    """Generator optimizer (AdamW). Published: lr 5e-5 (SD1.5) / 2e-5 (SDXL), constant LR."""

    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8
    grad_clip: Optional[float] = 0.1  # max gradient norm; None disables clipping
    warmup_steps: int = 0  # linear warm-up, then constant



def check_options(sampler: SamplerConfig, gradient_steps: GradientStepPolicy, lora: LoraConfig, optimizer: OptimizerConfig, finetune: str) -> None:
    """Refuse bad values before anything is loaded; each message names the option."""
    import diffusers

    problems = []
    if sampler.resolution <= 0 or sampler.resolution % 8:
        problems.append(f"model.sampler.resolution={sampler.resolution}: must be a positive multiple of 8 (the VAE factor)")
    if sampler.num_inference_steps < 1:
        problems.append(f"model.sampler.num_inference_steps={sampler.num_inference_steps}: must be >= 1")
    if sampler.num_inference_steps >= 1:
        try:  # e.g. K gradient steps > num_inference_steps
            gradient_steps.select(sampler.num_inference_steps, torch.Generator().manual_seed(0))
        except ValueError as err:
            problems.append(f"model.gradient_steps: {err}")
    if not math.isfinite(sampler.guidance_scale) or sampler.guidance_scale < 0:
        problems.append(f"model.sampler.guidance_scale={sampler.guidance_scale}: must be a finite number >= 0")
    scheduler_cls = getattr(diffusers, sampler.scheduler, None)
    if scheduler_cls is None or not hasattr(scheduler_cls, "set_timesteps"):
        problems.append(f"model.sampler.scheduler={sampler.scheduler!r}: not a diffusers scheduler class (e.g. DDPMScheduler)")
    if finetune == "lora" and lora.rank < 1:
        problems.append(f"model.lora.rank={lora.rank}: must be >= 1")
    if finetune == "lora" and not lora.target_modules:
        problems.append("model.lora.target_modules: empty; name at least one module (e.g. to_q)")
    if not optimizer.lr > 0:
        problems.append(f"model.optimizer.lr={optimizer.lr}: must be > 0")
    if optimizer.grad_clip is not None and not optimizer.grad_clip > 0:
        problems.append(f"model.optimizer.grad_clip={optimizer.grad_clip}: must be > 0 (or null to disable)")
    if optimizer.weight_decay < 0:
        problems.append(f"model.optimizer.weight_decay={optimizer.weight_decay}: must be >= 0")
    if problems:
        raise ValueError("invalid options:\n  " + "\n  ".join(problems))


def check_resolution(resolution: int, backbone: DiffusionBackbone) -> None:
    if resolution % backbone.vae_scale_factor:
        raise ValueError(f"model.sampler.resolution={resolution} is not divisible by this VAE's factor {backbone.vae_scale_factor}")
