"""Sampling with test-time attention guidance (A-STAR, Attend-and-Excite).

At each guided denoising step the conditional denoiser pass (UNet, or SD3 / FLUX.1 transformer) runs on the latent with gradient, the capture processors
record the read layers' cross-attention, the guidance turns the concept maps into one loss per sample, and the
latent moves against its gradient, ``z <- z - alpha_i * grad`` with ``alpha_i = 20 sqrt(linspace(1, 0.5)[i])``;
then the normal classifier-free-guided step runs without gradient. The whole batch is guided in one backward (the
UNet normalises per sample, so each sample's gradient is its own). Only the read layers leave SDPA.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from comat_lightning.attention.capture import AttentionStore, LayerSelection, is_transformer_denoiser
from comat_lightning.attention.concept_maps import (
    ThresholdRule,
    attend_and_excite_loss,
    average_maps,
    binarize,
    concept_maps,
    retention_loss,
    segregation_loss,
    step_sizes,
)
from comat_lightning.errors import InputError
from comat_lightning.sampling.denoising import denoise

DEFAULT_GUIDANCE_BLOCKS = ("down", "mid", "up")  # A&E / A-STAR read every UNet block at one resolution


def guidance_layers(selection: LayerSelection, latent_size: int, joint: bool) -> LayerSelection:
    """The layers guidance reads for ``model.guidance_blocks / guidance_resolution``: without a resolution, the
    latent size / 4 (16x16 for SD1.5 at 512 px, as A&E and A-STAR); on an MMDiT (``joint``) the default blocks mean
    its joint attention layers (one map size: latent size / 2)."""
    if joint:  # one map size: no default resolution needed
        return LayerSelection(("joint",), selection.resolutions) if selection.blocks == DEFAULT_GUIDANCE_BLOCKS else selection
    return selection if selection.resolutions else LayerSelection(selection.blocks, (max(latent_size // 4, 1),))


class AttentionGuidance(ABC):
    """One guidance method: per-sample losses on concept maps, and which steps it alters."""

    def __init__(self, max_iter_to_alter: Optional[int] = None, scale: float = 20.0):
        owner = f"model.guidance ({type(self).__name__})"
        if max_iter_to_alter is not None and max_iter_to_alter < 0:
            raise InputError(f"{owner}: max_iter_to_alter must be >= 0 (or null for every step), got {max_iter_to_alter}")
        if not (math.isfinite(scale) and scale >= 0):
            raise InputError(f"{owner}: scale must be a finite number >= 0, got {scale}")
        self.max_iter_to_alter = max_iter_to_alter
        self.scale = scale

    def guides(self, step: int) -> bool:
        return self.max_iter_to_alter is None or step < self.max_iter_to_alter

    def reset(self, layout_masks: Optional[list[Optional[torch.Tensor]]] = None) -> None:
        """Called before each sampling run."""

    @abstractmethod
    def losses(self, step: int, maps: list[torch.Tensor]) -> torch.Tensor:
        """maps[b]: (C_b, r, r) concept maps of sample b -> (B,) losses."""

    def after_step(self, step: int, maps: list[torch.Tensor]) -> None:
        """Called with the maps of the final forward of a guided step."""

    def refinement_threshold(self, step: int) -> Optional[float]:
        return None

    max_refinement_steps = 0


class AStarGuidance(AttentionGuidance):
    """A-STAR: segregation (concept maps should not overlap) + retention (each concept keeps the region it held at
    the previous step). Layout mode: user masks replace the retention targets from the first step on.

    Args:
        segregation_weight / retention_weight: weights of the two terms.
        threshold_rule: "minmax" (min-max normalise, > 0.5) or "otsu" for the retention targets.
        max_iter_to_alter: guide only the first N steps (None: every step).
        scale: step-size scale (alpha_i = scale * sqrt(linspace(1, 0.5)[i])).
    """

    def __init__(
        self,
        segregation_weight: float = 1.0,
        retention_weight: float = 1.0,
        threshold_rule: ThresholdRule = "minmax",
        max_iter_to_alter: Optional[int] = None,
        scale: float = 20.0,
    ):
        super().__init__(max_iter_to_alter, scale)
        if threshold_rule not in ("minmax", "otsu"):
            raise InputError(f"model.guidance (AStarGuidance): threshold_rule must be 'minmax' or 'otsu', got {threshold_rule!r}")
        for option, value in (("segregation_weight", segregation_weight), ("retention_weight", retention_weight)):
            if not (math.isfinite(value) and value >= 0):
                raise InputError(f"model.guidance (AStarGuidance): {option} must be a finite number >= 0, got {value}")
        self.segregation_weight, self.retention_weight, self.threshold_rule = segregation_weight, retention_weight, threshold_rule
        self._previous: list[Optional[torch.Tensor]] = []
        self._layout: list[Optional[torch.Tensor]] = []

    def reset(self, layout_masks=None) -> None:
        self._previous = []
        self._layout = list(layout_masks) if layout_masks is not None else []

    def losses(self, step, maps):
        out = []
        for b, sample in enumerate(maps):
            loss = self.segregation_weight * segregation_loss(sample)
            target = self._target(b, sample)
            if target is not None:  # retention is undefined at the first step (no previous map)
                loss = loss + self.retention_weight * retention_loss(sample, target)
            out.append(loss)
        return torch.stack(out)

    def _target(self, b: int, sample: torch.Tensor) -> Optional[torch.Tensor]:
        if b < len(self._layout) and self._layout[b] is not None:
            layout = self._layout[b].to(sample)
            return F.interpolate(layout[:, None], size=sample.shape[-2:], mode="nearest")[:, 0] if layout.shape[-2:] != sample.shape[-2:] else layout
        return self._previous[b] if b < len(self._previous) else None

    def after_step(self, step, maps):
        self._previous = [binarize(sample, self.threshold_rule) for sample in maps]


class AttendAndExciteGuidance(AttentionGuidance):
    """Attend-and-Excite (the baseline): the most neglected concept's peak attention should be high. Iterative
    refinement at some steps until every concept's peak reaches a threshold (default steps 0/10/20 to
    0.05/0.5/0.8, at most 20 iterations); guided for the first 25 steps."""

    def __init__(
        self,
        thresholds: Optional[dict[int, float]] = None,
        max_iter_to_alter: Optional[int] = 25,
        max_refinement_steps: int = 20,
        scale: float = 20.0,
    ):
        super().__init__(max_iter_to_alter, scale)
        self.thresholds = {0: 0.05, 10: 0.5, 20: 0.8} if thresholds is None else {int(k): float(v) for k, v in thresholds.items()}
        bad = {step: value for step, value in self.thresholds.items() if step < 0 or not 0.0 <= value <= 1.0}
        if bad:
            raise InputError(f"model.guidance (AttendAndExciteGuidance): thresholds maps steps >= 0 to peak attentions in [0, 1], got {bad}")
        if max_refinement_steps < 0:
            raise InputError(f"model.guidance (AttendAndExciteGuidance): max_refinement_steps must be >= 0, got {max_refinement_steps}")
        self.max_refinement_steps = max_refinement_steps

    def losses(self, step, maps):
        return torch.stack([attend_and_excite_loss(sample) for sample in maps])

    def refinement_threshold(self, step):
        return self.thresholds.get(step)


def guided_sample(
    backbone,
    model: torch.nn.Module,
    scheduler,
    cond,
    uncond,
    latents: torch.Tensor,
    guidance_scale: float,
    guidance: AttentionGuidance,
    token_indices: Sequence[Sequence[int]],
    store: AttentionStore,
    read_layers: Sequence[str],
    generator: Optional[torch.Generator] = None,
    layout_masks: Optional[list[Optional[torch.Tensor]]] = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the sampling loop of ``scheduler`` (already set) with ``guidance``, with ``model`` the denoiser (UNet or
    MMDiT transformer) of ``backbone``; returns the final latents and the last guided step's concept maps (per
    sample (C_b, r, r)). ``read_layers`` must carry capture processors recording into ``store``; ``token_indices``
    are key positions of ``backbone.text_keys``. On SD3 / FLUX.1 the guided pass is the conditional transformer
    call (FLUX-dev with its guidance embedding) and the loop is :func:`flow_denoise`'s Euler steps."""
    from comat_lightning.models.mmdit import MMDiTBackbone

    flow = isinstance(backbone, MMDiTBackbone)
    keys = backbone.text_keys
    alphas = step_sizes(len(scheduler.timesteps), guidance.scale)
    guidance.reset(layout_masks)
    last_maps: list[torch.Tensor] = []

    def maps_of(z: torch.Tensor, step: int, t) -> list[torch.Tensor]:
        with store.recording(step, part="all"):
            if flow:
                backbone.velocity(model, z, t, cond, guidance=guidance_scale)
            else:
                model(scheduler.scale_model_input(z, t), t, encoder_hidden_states=cond.embeds, added_cond_kwargs=cond.added_cond_kwargs())
        recorded = store.maps.pop(step)
        return concept_maps(average_maps([recorded[name] for name in read_layers]), token_indices, first=keys.first, end=keys.end)

    def nudge(i: int, t, latents: torch.Tensor) -> torch.Tensor:
        """Before step i: the conditional pass with gradient on the latent, the guidance loss, one step against it."""
        nonlocal last_maps
        if not (guidance.guides(i) or guidance.refinement_threshold(i) is not None):
            return latents
        with torch.enable_grad():
            latents = latents.detach().requires_grad_(True)
            maps = maps_of(latents, i, t)
            losses = guidance.losses(i, maps)
            threshold = guidance.refinement_threshold(i)
            if threshold is not None:
                latents, losses, maps = _refine(latents, losses, 1.0 - threshold, guidance, lambda z, s: maps_of(z, s, t), i, alphas[i])
            if guidance.guides(i) and bool((losses != 0).any()):
                (grad,) = torch.autograd.grad(losses.sum(), latents)
                latents = latents - alphas[i] * grad
            guidance.after_step(i, [m.detach() for m in maps])
            last_maps = [m.detach() for m in maps]
        return latents.detach()

    if flow:
        from comat_lightning.sampling.flow_matching import flow_denoise

        latents = flow_denoise(backbone, model, scheduler, cond, uncond, latents, guidance_scale, latent_update=nudge)
    else:
        latents = denoise(model, scheduler, cond, uncond, latents, guidance_scale, generator=generator, latent_update=nudge)
    return latents, last_maps


def _refine(latents, losses, target, guidance, maps_of, step, alpha):
    """Attend-and-Excite's iterative refinement, per sample: while a sample's loss exceeds ``target``, recompute
    and step (at most ``max_refinement_steps`` times); then recompute the maps and losses once more."""
    active = losses.detach() > target
    iteration = 0
    while bool(active.any()):
        iteration += 1
        latents = latents.detach().requires_grad_(True)
        losses = guidance.losses(step, maps_of(latents, step))
        masked = losses * active
        if bool((masked != 0).any()):
            (grad,) = torch.autograd.grad(masked.sum(), latents)
            latents = latents - alpha * grad
        if iteration >= guidance.max_refinement_steps:
            break
        active = active & (losses.detach() > target)
    latents = latents.detach().requires_grad_(True)
    maps = maps_of(latents, step)
    return latents, guidance.losses(step, maps), maps


__all__ = ["AStarGuidance", "AttendAndExciteGuidance", "AttentionGuidance", "guidance_layers", "guided_sample", "is_transformer_denoiser"]
