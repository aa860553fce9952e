"""Step-by-step summaries of cross-attention during a gradient-free rollout, for monitoring and evaluation.

Training losses keep a few full maps with their graph (:class:`~comat_lightning.attention.capture.AttentionStore`
windows). Monitoring and evaluation want something else: at every denoising step, the conditional half's maps of
some layers, averaged over layers and heads, at one map size, without keeping any per-layer tensor. A
:class:`StepAveragedMaps` listens to the store and reduces each layer's probabilities as they are computed:

    per layer (B_total, heads, side_l^2, T) -> cond half, head mean -> (B, side_l, side_l, T)
    -> bilinear resize to ``side`` if side_l differs -> summed over the step's layers, divided by their count

giving ``steps[i]`` = (B, side, side, T) fp32 for denoising step ``i`` (or only the running sum over steps when
``keep_steps`` is False). :func:`summarizing_attention` wires it to a module's rollout: it captures the layers
for the duration of the context only (:func:`~comat_lightning.attention.capture.temporary_capture`), so the
training steps in between run at SDPA speed.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from comat_lightning.attention.capture import CrossAttentionLayer, LayerSelection, select_layers, temporary_capture


class StepAveragedMaps:
    """Listener for :meth:`AttentionStore.listening`; ``step_hook`` marks the step boundaries of a rollout."""

    def __init__(self, layers: list[CrossAttentionLayer], side: Optional[int] = None, keep_steps: bool = True, cfg_batch: bool = True):
        if not layers:
            raise ValueError("StepAveragedMaps needs at least one layer")
        self.layers = {layer.name: layer for layer in layers}
        self.side = side or max(layer.resolution for layer in layers)  # default: the finest selected map
        self.keep_steps = keep_steps
        self.cfg_batch = cfg_batch  # the rollout runs [uncond, cond]: keep the second half
        self.steps: list[torch.Tensor] = []
        self.total: Optional[torch.Tensor] = None  # sum over finished steps, (B, side, side, T)
        self.num_steps = 0
        self._current: Optional[torch.Tensor] = None
        self._current_layers = 0

    def __call__(self, layer: str, probs: torch.Tensor) -> None:
        if layer not in self.layers:
            return
        probs = probs.detach()
        if self.cfg_batch:
            probs = probs[probs.shape[0] // 2 :]
        batch, _, queries, tokens = probs.shape
        side = round(queries**0.5)
        maps = probs.float().mean(dim=1).reshape(batch, side, side, tokens)
        if side != self.side:
            maps = F.interpolate(maps.permute(0, 3, 1, 2), size=(self.side, self.side), mode="bilinear", align_corners=False)
            maps = maps.permute(0, 2, 3, 1)
        self._current = maps if self._current is None else self._current + maps
        self._current_layers += 1

    @contextlib.contextmanager
    def step_hook(self, step: int, carries_grad: bool = False) -> Iterator[None]:
        """A ``denoise`` step hook: everything heard inside is one denoising step."""
        self._current, self._current_layers = None, 0
        yield
        if self._current is None:
            return
        mean = self._current / self._current_layers
        self.total = mean if self.total is None else self.total + mean
        self.num_steps += 1
        if self.keep_steps:
            self.steps.append(mean)
        self._current = None

    def mean(self) -> torch.Tensor:
        """(B, side, side, T): the maps averaged over every recorded step."""
        if self.total is None:
            raise RuntimeError("no attention was recorded: was step_hook passed to the rollout?")
        return self.total / self.num_steps

    def stacked(self) -> torch.Tensor:
        """(S, B, side, side, T): every recorded step (``keep_steps`` must be True)."""
        if not self.steps:
            raise RuntimeError("no per-step maps were kept (keep_steps=False, or nothing was recorded)")
        return torch.stack(self.steps)


@contextlib.contextmanager
def summarizing_attention(module, selection: LayerSelection, side: Optional[int] = None, keep_steps: bool = True) -> Iterator[StepAveragedMaps]:
    """Inside the context, rollouts of ``module`` (a CoMatModule) that pass ``summary.step_hook`` fill ``summary``
    with the step-averaged maps of the layers ``selection`` picks."""
    unet = module.backbone.unet
    latent_size = module.sampler.resolution // module.backbone.vae_scale_factor
    layers = select_layers(unet, selection, latent_size)
    summary = StepAveragedMaps(layers, side=side, keep_steps=keep_steps, cfg_batch=module.rollout.cfg_batch)
    store = module.attention_store
    with temporary_capture(unet, layers, store), store.listening(summary):
        yield summary


__all__ = ["StepAveragedMaps", "summarizing_attention"]
