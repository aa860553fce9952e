"""Test-time attention guidance: concept maps from cross-attention, and the A-STAR and Attend-and-Excite losses.

Concept maps (as Attend-and-Excite): the cross-attention probabilities of the read layers (one resolution),
averaged over layers and heads -> (r, r, T); the start token and the last position are dropped (CLIP keys: the
remaining 75; FLUX's T5 keys have no start token, see ``TextKeys``), the remaining logits scaled by 100 and
soft-maxed over tokens; each concept token's map is smoothed with a 3x3 Gaussian (reflect padding). Token indices
are key positions (0 = the start token on CLIP) and shift by the dropped keys.

The smoothing kernel is Attend-and-Excite's: ``exp(-((d - 1) / (2 * sigma))^2)`` per axis (note 2*sigma, not
sqrt(2)*sigma), normalised; with sigma 0.5 the 3x3 weights are proportional to ``exp(-(dx^2 + dy^2))``:
centre 1, edges e^-1, corners e^-2, divided by (1 + 4/e + 4/e^2).

Losses (all fp32; per sample):

- ``overlap(a, b) = sum(min(a, b)) / (sum(a + b) + eps)``, in [0, 0.5];
- A-STAR segregation: ``sum over concept pairs m > n of overlap(A^m, A^n)``;
- A-STAR retention: ``sum over m of (1 - overlap(A^m, B^m))`` with B the previous step's binarised, detached map
  of concept m (min-max normalised, threshold 0.5, or Otsu); in [0.5 |C|, |C|];
- Attend-and-Excite: ``max over concepts of max(0, 1 - max pixel of A^m)``.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from comat_lightning.models.backbone import describe_key_range

ThresholdRule = Literal["minmax", "otsu"]


def gaussian_kernel(size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """(size, size) smoothing kernel of Attend-and-Excite (see the module docstring for the exact formula)."""
    centre = (size - 1) / 2
    axis = torch.arange(size, dtype=torch.float32)
    one_d = torch.exp(-(((axis - centre) / (2 * sigma)) ** 2)) / (sigma * math.sqrt(2 * math.pi))
    kernel = one_d[:, None] * one_d[None, :]
    return kernel / kernel.sum()


def smooth(maps: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """(..., r, r) -> (..., r, r), each map convolved with ``kernel`` after reflect padding."""
    shape = maps.shape
    flat = maps.reshape(-1, 1, *shape[-2:])
    pad = kernel.shape[-1] // 2
    out = F.conv2d(F.pad(flat, (pad, pad, pad, pad), mode="reflect"), kernel[None, None].to(flat))
    return out.reshape(shape)


def average_maps(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Layers of one resolution, each (B, heads, r*r, T) -> (B, r, r, T): mean over layers and heads."""
    stacked = torch.stack([m.float() for m in maps])  # (L, B, heads, r*r, T)
    mean = stacked.mean(dim=(0, 2))
    side = math.isqrt(mean.shape[1])
    if side * side != mean.shape[1]:
        raise ValueError(f"attention maps of {mean.shape[1]} queries are not square")
    return mean.reshape(mean.shape[0], side, side, mean.shape[-1])


def concept_maps(averaged: torch.Tensor, token_indices: Sequence[Sequence[int]], kernel: torch.Tensor | None = None,
                 first: int = 1, end: int = -1) -> list[torch.Tensor]:  # fmt: skip
    """(B, r, r, T) averaged maps -> per sample a (C_b, r, r) stack of smoothed concept maps.

    token_indices[b]: key positions of sample b's concept tokens. The softmax covers keys ``first .. end - 1``
    (default 1..T-2: a CLIP start token and the last slot dropped; ``TextKeys`` gives them per model family)."""
    end = end if end >= 0 else averaged.shape[-1] + end
    text = torch.softmax(averaged[..., first:end] * 100, dim=-1)
    kernel = gaussian_kernel() if kernel is None else kernel
    out = []
    for b, indices in enumerate(token_indices):
        if any(i < first or i >= end for i in indices):
            raise ValueError(f"token indices {list(indices)} out of range {describe_key_range(first, end)}")
        stack = torch.stack([text[b, :, :, i - first] for i in indices])  # shifted: keys before ``first`` were dropped
        out.append(smooth(stack, kernel))
    return out


def overlap(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """sum(min(a, b)) / (sum(a + b) + eps) over the last two dims; in [0, 0.5] for non-negative maps."""
    return torch.minimum(a, b).sum(dim=(-2, -1)) / ((a + b).sum(dim=(-2, -1)) + eps)


def segregation_loss(maps: torch.Tensor) -> torch.Tensor:
    """(C, r, r) -> scalar: sum of overlaps over concept pairs m > n."""
    total = maps.new_zeros(())
    for m in range(maps.shape[0]):
        for n in range(m):
            total = total + overlap(maps[m], maps[n])
    return total


def binarize(maps: torch.Tensor, rule: ThresholdRule = "minmax") -> torch.Tensor:
    """(C, r, r) -> {0, 1} masks, detached: min-max normalise then > 0.5, or Otsu's threshold per map."""
    maps = maps.detach()
    low = maps.amin(dim=(-2, -1), keepdim=True)
    high = maps.amax(dim=(-2, -1), keepdim=True)
    normalised = (maps - low) / (high - low).clamp_min(1e-8)
    if rule == "minmax":
        return (normalised > 0.5).float()
    if rule == "otsu":
        return torch.stack([(m > _otsu_threshold(m)).float() for m in normalised])
    raise ValueError(f"threshold rule must be 'minmax' or 'otsu', got {rule!r}")


def _otsu_threshold(values: torch.Tensor, bins: int = 64) -> float:
    """Otsu's threshold of values in [0, 1]: the cut maximising the between-class variance."""
    hist = torch.histc(values.flatten(), bins=bins, min=0.0, max=1.0)
    prob = hist / hist.sum().clamp_min(1)
    centres = (torch.arange(bins, dtype=torch.float32, device=values.device) + 0.5) / bins
    weight_low = prob.cumsum(0)
    mean_low = (prob * centres).cumsum(0)
    total_mean = mean_low[-1]
    between = (total_mean * weight_low - mean_low) ** 2 / (weight_low * (1 - weight_low)).clamp_min(1e-12)
    return float(centres[int(between.argmax())] + 0.5 / bins)


def retention_loss(maps: torch.Tensor, previous_masks: torch.Tensor) -> torch.Tensor:
    """(C, r, r) maps and (C, r, r) binary masks of the previous step -> sum over m of (1 - overlap)."""
    return (1.0 - overlap(maps, previous_masks)).sum()


def attend_and_excite_loss(maps: torch.Tensor) -> torch.Tensor:
    """(C, r, r) -> max over concepts of max(0, 1 - max pixel)."""
    return (1.0 - maps.amax(dim=(-2, -1))).clamp_min(0.0).max()


def step_sizes(num_steps: int, scale: float = 20.0) -> list[float]:
    """alpha_i = scale * sqrt(linspace(1.0, 0.5, num_steps)[i]) (A-STAR and Attend-and-Excite)."""
    return [scale * math.sqrt(v) for v in torch.linspace(1.0, 0.5, num_steps, dtype=torch.float64).tolist()]


__all__ = [
    "attend_and_excite_loss",
    "average_maps",
    "binarize",
    "concept_maps",
    "gaussian_kernel",
    "overlap",
    "retention_loss",
    "segregation_loss",
    "smooth",
    "step_sizes",
]
