"""The flow-matching sampling loop of the MMDiT families (SD3 / SD3.5, FLUX.1): Euler steps of
``FlowMatchEulerDiscreteScheduler`` on the transformer's velocity, with the same gradient semantics as
:func:`comat_lightning.sampling.denoising.denoise` (steps before the first gradient step without a graph; at a
gradient step the transformer runs with grad on the live or detached latent; later steps are constants but the
Euler update is linear in the latent, so gradient flows back along the chain).

Guidance: SD3 uses classifier-free guidance on one batched [uncond, cond] pass; FLUX.1-dev is guidance-distilled
(the scale is an input of the transformer, one conditional pass, no negative prompt), as in diffusers' pipelines.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch

from comat_lightning.models.mmdit import FlowConditioning, MMDiTBackbone
from comat_lightning.sampling.denoising import LatentUpdate, StepHook


def flow_denoise(
    backbone: MMDiTBackbone,
    model: torch.nn.Module,
    scheduler,
    cond: FlowConditioning,
    uncond: Optional[FlowConditioning],
    latents: torch.Tensor,
    guidance_scale: float,
    gradient_steps: Iterable[int] = (),
    detach_model_input: bool = False,
    step_hook: Optional[StepHook] = None,
    latent_update: Optional[LatentUpdate] = None,
) -> torch.Tensor:
    """Run every step of ``scheduler`` (already set, see :meth:`MMDiTBackbone.make_scheduler`) from ``latents``
    (B, C, h, w; fp32 noise) with ``model`` (the online or frozen transformer) and return the final latent (fp32).
    ``uncond`` is ignored by guidance-distilled models. ``step_hook`` and ``latent_update`` as in ``denoise``."""
    gradient_steps = set(gradient_steps)
    first_grad = min(gradient_steps) if gradient_steps else None
    distilled = backbone.guidance_distilled
    both = cond if distilled else FlowConditioning.cat(uncond, cond)  # diffusers' order: [negative, positive]
    for i, t in enumerate(scheduler.timesteps):
        if latent_update is not None:
            latents = latent_update(i, t, latents)
        carries_grad = i in gradient_steps
        with torch.set_grad_enabled(first_grad is not None and i >= first_grad):  # the chain is part of the graph
            model_input = latents.detach() if (carries_grad and detach_model_input) else latents
            hook = step_hook(i, carries_grad) if step_hook is not None else contextlib.nullcontext()
            with torch.set_grad_enabled(carries_grad), hook:
                if distilled:
                    velocity = backbone.velocity(model, model_input, t, both, guidance=guidance_scale)
                else:
                    v_uncond, v_cond = backbone.velocity(model, torch.cat([model_input] * 2), t, both).chunk(2)
                    velocity = v_uncond + guidance_scale * (v_cond - v_uncond)
            latents = scheduler.step(velocity, t, latents, return_dict=False)[0].float()
    return latents


__all__ = ["flow_denoise"]
