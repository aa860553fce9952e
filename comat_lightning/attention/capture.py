"""Cross-attention capture: record the attention probabilities of chosen UNet cross-attention layers, with gradient.

Shared machinery of every loss or guidance method that reads cross-attention maps (CoMat's attribute
concentration, A-STAR, Attend-and-Excite, attention logging). PyTorch's SDPA never materialises the probabilities,
so the chosen layers get :class:`AttentionCaptureProcessor` (an explicit softmax); every other layer keeps its
SDPA processor. Cross-attention keys are only the 77 text tokens, so the explicit softmax there costs little.

Layers are chosen by block ("down", "mid", "up") and map resolution: a map's side in latent pixels at the
sampling resolution (SD1.5 at 512 px: mid 8, up 16/32/64; SDXL at 512 px: mid 16, up 16/32).

Recording is explicit: only inside ``store.recording(step)`` are maps kept, so a caller picks the steps. Calls
of the processor outside that window are ignored, and so are calls made while autograd runs a backward pass:
gradient checkpointing re-runs each block during backward, and those re-runs must not add maps. The processor
takes the same explicit path whether it records or not, so a checkpointed re-run saves the same tensors as the
original forward (non-reentrant checkpointing requires that).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Optional, Sequence

import torch
from torch import nn

from comat_lightning.errors import InputError

Block = Literal["down", "mid", "up", "joint"]  # "joint": an MMDiT's joint attention (attention/joint_capture.py)
BLOCKS: tuple[str, ...] = ("down", "mid", "up", "joint")
BatchPart = Literal["cond", "all"]


@dataclass(frozen=True)
class LayerSelection:
    """Which cross-attention layers to capture.

    blocks: UNet blocks to read ("down", "mid", "up"), or "joint" for an MMDiT's joint attention layers.
    resolutions: map sides (in latent pixels at the sampling resolution) to keep; None keeps every resolution.
    """

    blocks: tuple[Block, ...] = ("mid", "up")
    resolutions: Optional[tuple[int, ...]] = None

    def __post_init__(self):
        unknown = [b for b in self.blocks if b not in BLOCKS]
        if unknown or not self.blocks:
            raise InputError(f"attention layers: blocks must be a non-empty list of {list(BLOCKS)}, got {list(self.blocks)}")
        if self.resolutions is not None and (
            not self.resolutions or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in self.resolutions)
        ):
            raise InputError(f"attention layers: resolutions must be positive map sides (or null for all), got {self.resolutions}")

    def matches(self, layer: "CrossAttentionLayer") -> bool:
        return layer.block in self.blocks and (self.resolutions is None or layer.resolution in self.resolutions)


def layer_selection(owner: str, blocks: Sequence[str], resolutions: Optional[Sequence[int]]) -> LayerSelection:
    """A :class:`LayerSelection` built from options, with ``owner`` (e.g. "AttributeConcentrationLoss") named in the
    error when the options are wrong."""
    try:
        return LayerSelection(tuple(blocks), tuple(resolutions) if resolutions else None)
    except InputError as err:
        raise InputError(f"{owner}: {err}") from None


@dataclass(frozen=True)
class CaptureRequest:
    """What a consumer of maps asks the rollout for: which layers, and at how many of the gradient steps."""

    layers: LayerSelection = LayerSelection()
    num_steps: int = 2  # CoMat: maps from 2 of the K gradient steps
    with_replacement: bool = False  # draw the steps with replacement (the official code's random.choices)

    def __post_init__(self):
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise InputError(f"attention capture: num_capture_steps must be an integer >= 1, got {self.num_steps!r}")


@dataclass(frozen=True)
class CrossAttentionLayer:
    name: str  # module name in the UNet, e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    block: Block
    resolution: int  # map side at the latent size it was computed for
    heads: int


def is_transformer_denoiser(model: nn.Module) -> bool:
    """An MMDiT (SD3 / FLUX.1 transformer) rather than a UNet: its maps come from joint attention."""
    return hasattr(model, "transformer_blocks") and not hasattr(model, "down_blocks")


def cross_attention_layers(unet: nn.Module, latent_size: int) -> list[CrossAttentionLayer]:
    """Every cross-attention layer of a diffusers UNet2DConditionModel, with its block and map resolution for a
    square latent of side ``latent_size``. A down block works at the resolution left by the downsamplers before
    it; the mid block after all of them; each up block at the resolution its predecessors upsampled to. For an
    MMDiT: its joint attention layers (block "joint", attention/joint_capture.py)."""
    from diffusers.models.attention_processor import Attention

    if is_transformer_denoiser(unet):
        return joint_attention_layers(unet, latent_size)

    sizes: dict[str, int] = {}
    size = latent_size
    for i, block in enumerate(unet.down_blocks):
        sizes[f"down_blocks.{i}."] = size
        if getattr(block, "downsamplers", None):
            size = math.ceil(size / 2)  # stride-2 conv with padding 1
    sizes["mid_block."] = size
    for i, block in enumerate(unet.up_blocks):
        sizes[f"up_blocks.{i}."] = size
        if getattr(block, "upsamplers", None):
            size *= 2
    layers = []
    for name, module in unet.named_modules():
        if not (isinstance(module, Attention) and module.is_cross_attention):
            continue
        prefix = next((p for p in sizes if name.startswith(p)), None)
        if prefix is None:
            continue
        block: Block = "mid" if prefix == "mid_block." else prefix.split("_")[0]  # type: ignore[assignment]
        layers.append(CrossAttentionLayer(name=name, block=block, resolution=sizes[prefix], heads=module.heads))
    return layers


def joint_attention_layers(transformer: nn.Module, latent_size: int) -> list[CrossAttentionLayer]:
    """The joint attention layers of an SD3 or FLUX transformer (every block's ``attn``; FLUX: the double-stream
    blocks), block "joint", map side = latent side / 2 (SD3's 2x2 patches, FLUX's 2x2 packing)."""
    heads = transformer.config.num_attention_heads
    return [CrossAttentionLayer(name=f"transformer_blocks.{i}.attn", block="joint", resolution=latent_size // 2, heads=heads)
            for i in range(len(transformer.transformer_blocks))]  # fmt: skip


def unique_layers(unet: nn.Module, selections: Sequence[LayerSelection], latent_size: int) -> list[CrossAttentionLayer]:
    """The union of the layers several selections pick (each once, in the UNet's order)."""
    return list({layer.name: layer for selection in selections for layer in select_layers(unet, selection, latent_size)}.values())


def select_layers(unet: nn.Module, selection: LayerSelection, latent_size: int) -> list[CrossAttentionLayer]:
    chosen = [layer for layer in cross_attention_layers(unet, latent_size) if selection.matches(layer)]
    if not chosen:
        available = sorted({(layer.block, layer.resolution) for layer in cross_attention_layers(unet, latent_size)})
        raise InputError(
            f"no cross-attention layer matches blocks={list(selection.blocks)} resolutions={selection.resolutions} at "
            f"latent size {latent_size}; this UNet has (block, resolution): {available}"
        )
    return chosen


class AttentionStore:
    """Maps recorded during the current step: ``maps[step][layer name]`` = (B, heads, H*W, tokens), fp32.

    ``recording(step)`` opens a window for one UNet forward at denoising step ``step``; ``part="cond"`` keeps the
    second half of a classifier-free-guidance batch ([uncond, cond]), ``"all"`` keeps the whole batch. Opening a
    window for a step replaces what that step held (e.g. repeated refinement forwards at the same step).

    ``listening(fn)`` registers a consumer that sees every forward call's probabilities, window or not (monitoring
    and evaluation reduce them on the fly instead of keeping them)."""

    def __init__(self):
        self.layers: dict[str, CrossAttentionLayer] = {}
        self.maps: dict[int, dict[str, torch.Tensor]] = {}
        self.recorded_calls = 0  # processor calls kept
        self.ignored_calls = 0  # processor calls outside a window or during backward (checkpoint re-runs)
        self._step: Optional[int] = None
        self._part: BatchPart = "cond"
        self._listeners: list[Callable[[str, torch.Tensor], None]] = []

    def clear(self) -> None:
        self.maps = {}
        self.recorded_calls = self.ignored_calls = 0

    @contextlib.contextmanager
    def recording(self, step: int, part: BatchPart = "cond") -> Iterator[None]:
        if self._step is not None:
            raise RuntimeError(f"attention store: already recording step {self._step}; windows cannot nest")
        self.maps[step] = {}
        self._step, self._part = step, part
        try:
            yield
        finally:
            self._step = None

    @contextlib.contextmanager
    def listening(self, listener: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
        """Call ``listener(layer name, (B_total, heads, H*W, tokens) probabilities)`` on every forward call of a
        capture processor (not on backward re-runs) while the context is open."""
        self._listeners.append(listener)
        try:
            yield
        finally:
            self._listeners.remove(listener)

    @property
    def steps(self) -> list[int]:
        return sorted(self.maps)

    def offer(self, layer: str, probs: torch.Tensor, keep: bool = True) -> None:
        """Called by the processor with (B_total, heads, H*W, tokens) probabilities. ``keep=False`` (layers captured
        for listeners only, see :func:`temporary_capture`) never records into a window."""
        if self._listeners and not _inside_backward():
            for listener in self._listeners:
                listener(layer, probs)
        if not keep:
            return
        if self._step is None or _inside_backward():
            self.ignored_calls += 1
            return
        step_maps = self.maps[self._step]
        if layer in step_maps:
            raise RuntimeError(f"attention store: layer {layer} recorded twice at step {self._step}; run one UNet forward per window")
        if self._part == "cond":
            if probs.shape[0] % 2:
                raise RuntimeError(f"attention store: part='cond' needs an [uncond, cond] batch, got batch {probs.shape[0]}")
            probs = probs[probs.shape[0] // 2 :]
        step_maps[layer] = probs
        self.recorded_calls += 1

    def select(self, step: int, selection: Optional[LayerSelection] = None) -> dict[str, torch.Tensor]:
        """The maps of one recorded step, restricted to the layers ``selection`` matches."""
        maps = self.maps[step]
        if selection is None:
            return dict(maps)
        return {name: m for name, m in maps.items() if selection.matches(self.layers[name])}


def _inside_backward() -> bool:
    # -1 outside the autograd engine; a graph task id while backward() / autograd.grad() runs (which is when
    # non-reentrant checkpointing recomputes a block's forward).
    return torch._C._current_graph_task_id() != -1


class AttentionCaptureProcessor:
    """diffusers attention processor with an explicit softmax that offers its probabilities to a store.

    Same computation as diffusers' ``AttnProcessor`` except that the softmax runs in fp32 (the maps feed fp32
    losses) and is cast back to the value dtype for the weighted sum."""

    def __init__(self, store: AttentionStore, layer: str, keep: bool = True):
        self.store = store
        self.layer = layer
        self.keep = keep  # False: only the store's listeners see this layer (it is not one the losses read)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:  # (B, C, H, W) -> (B, H*W, C)
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, queries = hidden_states.shape[:2]
        attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B*heads, Q, d)
        key = attn.head_to_batch_dim(attn.to_k(context))  # (B*heads, T, d)
        value = attn.head_to_batch_dim(attn.to_v(context))
        scores = torch.bmm(query, key.transpose(1, 2)).float() * attn.scale  # (B*heads, Q, T)
        if attention_mask is not None:
            scores = scores + attention_mask.float()
        probs = scores.softmax(dim=-1)
        self.store.offer(self.layer, probs.view(batch, attn.heads, queries, -1), keep=self.keep)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs.to(value.dtype), value))

        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear, dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def capture_processor(model: nn.Module, store: AttentionStore, layer: str, keep: bool = True):
    """The capture processor for one layer of ``model``: explicit cross-attention softmax (UNet) or the joint
    attention's renormalised image x text block (SD3 / FLUX transformer)."""
    if is_transformer_denoiser(model):
        from comat_lightning.attention.joint_capture import joint_processor

        return joint_processor(model, store, layer, keep)
    return AttentionCaptureProcessor(store, layer, keep)


def install_capture(unet: nn.Module, layers: Sequence[CrossAttentionLayer], store: AttentionStore) -> None:
    """Give exactly ``layers`` a capture processor; every other layer keeps the processor it has (SDPA).
    Call again after anything that resets processors (``set_default_attn_processor``, xformers)."""
    modules = dict(unet.named_modules())
    for layer in layers:
        modules[layer.name].set_processor(capture_processor(unet, store, layer.name))
        store.layers[layer.name] = layer


@contextlib.contextmanager
def temporary_capture(unet: nn.Module, layers: Sequence[CrossAttentionLayer], store: AttentionStore) -> Iterator[None]:
    """Let ``store``'s listeners see ``layers`` for the duration of the context only, then give every layer back the
    processor it had: monitoring pays for the explicit softmax on the steps it logs, not on every training step.
    Layers that already capture into ``store`` are left as they are; the others are not recorded into windows (the
    losses never see layers they did not ask for)."""
    modules = dict(unet.named_modules())
    replaced = {}
    for layer in layers:
        module = modules[layer.name]
        current = module.processor
        if getattr(current, "store", None) is store:  # already captures into this store
            continue
        replaced[layer.name] = current
        module.set_processor(capture_processor(unet, store, layer.name, keep=False))
    try:
        yield
    finally:
        for name, processor in replaced.items():
            modules[name].set_processor(processor)


def choose_capture_steps(gradient_steps: Sequence[int], num_steps: int, with_replacement: bool, generator: torch.Generator) -> list[int]:
    """Which of the gradient steps record maps (CoMat: 2 of the K). With replacement a step can be drawn twice,
    so fewer distinct steps may be recorded (as the official code's ``random.choices``)."""
    steps = sorted(set(gradient_steps))
    if not steps or num_steps < 1:
        return []
    if with_replacement:
        picks = torch.randint(len(steps), (num_steps,), generator=generator).tolist()
    else:
        picks = torch.randperm(len(steps), generator=generator)[:num_steps].tolist()
    return sorted({steps[i] for i in picks})


__all__ = [
    "AttentionCaptureProcessor",
    "AttentionStore",
    "CaptureRequest",
    "CrossAttentionLayer",
    "LayerSelection",
    "choose_capture_steps",
    "cross_attention_layers",
    "install_capture",
    "select_layers",
    "unique_layers",
    "temporary_capture",
]
