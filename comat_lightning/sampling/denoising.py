"""The denoising loop: one classifier-free-guided sampling loop that serves the training rollout (gradient through
a few chosen steps) and test-time guidance (the latent nudged before each step).

Memory model of :func:`denoise` (B = batch, steps indexed 0..N-1 from noise to image):

- steps before the first gradient step run under ``torch.no_grad`` (no graph at all);
- at a gradient step the UNet runs with grad (its input is the live latent, or a detached copy when
  ``detach_unet_input``: SDXL's official setting, which keeps one UNet graph per step instead of a chain);
- the other steps after it are constants: the UNet runs without grad, but the scheduler update is linear in the
  latent, so the gradient still flows along the chain to earlier gradient steps;
- the latent chain and scheduler arithmetic stay fp32; the UNet runs in the autocast dtype.

Which steps carry gradient is a :class:`~comat_lightning.sampling.step_policies.GradientStepPolicy`'s choice.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Iterable, Optional

import torch

from comat_lightning.models.backbone import Conditioning

StepHook = Callable[[int, bool], contextlib.AbstractContextManager]
# (step index, timestep, latent (B, C, h, w)) -> the latent the step continues from (test-time guidance)
LatentUpdate = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def denoise(
    unet: torch.nn.Module,
    scheduler,
    cond: Conditioning,
    uncond: Conditioning,
    latents: torch.Tensor,
    guidance_scale: float,
    generator: Optional[torch.Generator] = None,
    gradient_steps: Iterable[int] = (),
    detach_unet_input: bool = False,
    step_hook: Optional[StepHook] = None,
    latent_update: Optional[LatentUpdate] = None,
) -> torch.Tensor:
    """Run the full classifier-free-guided sampling loop of ``scheduler`` (already ``set_timesteps``) from
    ``latents`` (B, C, h, w; fp32, already scaled by ``init_noise_sigma``) and return the final latent.

    ``step_hook(step_index, carries_grad)`` may return a context manager wrapped around each UNet call (the
    attention-capture machinery uses it). ``latent_update(step_index, t, latents)`` runs before each step and
    returns the latent to continue from (A-STAR and Attend-and-Excite move it against their loss's gradient). With
    no gradient steps the whole loop is gradient-free and matches diffusers' pipelines step for step
    (tests/test_parity.py)."""
    gradient_steps = set(gradient_steps)
    first_grad = min(gradient_steps) if gradient_steps else None
    both = Conditioning.cat(uncond, cond)  # diffusers' order: [negative, positive]
    step_kwargs = scheduler_step_kwargs(scheduler, generator)
    for i, t in enumerate(scheduler.timesteps):
        if latent_update is not None:
            latents = latent_update(i, t, latents)
        carries_grad = i in gradient_steps
        chain_grad = first_grad is not None and i >= first_grad  # the latent chain is part of the graph
        with torch.set_grad_enabled(chain_grad):
            unet_input = latents.detach() if (carries_grad and detach_unet_input) else latents
            model_input = scheduler.scale_model_input(torch.cat([unet_input] * 2), t)
            hook = step_hook(i, carries_grad) if step_hook is not None else contextlib.nullcontext()
            with torch.set_grad_enabled(carries_grad), hook:
                guided = cfg_noise(unet, model_input, t, both, guidance_scale)
            latents = scheduler.step(guided, t, latents, **step_kwargs, return_dict=False)[0]
    return latents


def scheduler_step_kwargs(scheduler, generator) -> dict:
    """Only stochastic schedulers take a generator (diffusers' pipelines filter step kwargs the same way)."""
    return {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}


def cfg_noise(unet: torch.nn.Module, model_input: torch.Tensor, t, both: Conditioning, guidance_scale: float) -> torch.Tensor:
    """Classifier-free-guided noise (fp32) from one UNet pass on ``model_input`` = [uncond batch, cond batch]."""
    noise = unet(model_input, t, encoder_hidden_states=both.embeds, added_cond_kwargs=both.added_cond_kwargs()).sample
    noise_uncond, noise_cond = noise.float().chunk(2)
    return noise_uncond + guidance_scale * (noise_cond - noise_uncond)


def initial_noise(
    batch_size: int, channels: int, latent_size: int, generator: torch.Generator, device, init_noise_sigma: float
) -> torch.Tensor:
    """Gaussian start latent drawn on the generator's device (CPU by default, so the same seed gives the same
    noise on any accelerator), then moved. Matches diffusers' ``prepare_latents``."""
    from diffusers.utils.torch_utils import randn_tensor

    shape = (batch_size, channels, latent_size, latent_size)
    return randn_tensor(shape, generator=generator, device=torch.device(device), dtype=torch.float32) * init_noise_sigma


__all__ = ["LatentUpdate", "StepHook", "cfg_noise", "denoise", "initial_noise", "scheduler_step_kwargs"]
