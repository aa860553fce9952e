"""Switching PEFT adapters on one UNet, safely under gradient checkpointing.

The generator's LoRA ("default") and the discriminator's LoRA ("discriminator") live on the same frozen base UNet,
so no second UNet is held. Two pitfalls shape this module:

- PEFT's ``set_adapter`` / ``enable_adapters`` also flip ``requires_grad`` of the adapters' weights. Training
  decides what is trainable (Lightning's ``toggle_optimizer``), so switching here only changes which adapter a
  forward uses: it sets each LoRA layer's active-adapter and disabled flags and nothing else.
- Gradient checkpointing re-runs a block's forward during backward, with whatever adapter is active *then*. One
  backward can cross forwards made with different adapters (the generator loss flows through the discriminator's
  UNet pass into the generator's rollout), so :func:`checkpoint_keeping_adapters` records the adapter state each
  checkpointed block ran with and re-applies it inside the re-run.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Literal, Optional, Sequence

import torch
from torch import nn

from comat_lightning.errors import raise_problems

# (active adapter names, adapters disabled?) as seen by every LoRA layer of a module
AdapterState = tuple[tuple[str, ...], bool]


LoraInit = Literal["gaussian", "kaiming"]  # A ~ N(0, 1/rank) (the official code's LoRALinearLayer) or kaiming-uniform (PEFT)


@dataclass
class LoraConfig:
    """A LoRA adapter on a UNet (the online model's: ``model.lora``; the discriminator's reuses it). alpha = rank
    gives scale 1.0, as the paper. Checks itself when made."""

    rank: int = 128
    alpha: Optional[float] = None  # None: same as rank
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    # B = 0 either way (training starts at the base model); A ~ N(0, 1/rank) as the official code's diffusers
    # LoRALinearLayer ("gaussian"), or kaiming-uniform as PEFT's default and the LoRA paper's code ("kaiming").
    init: LoraInit = "gaussian"

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            problems.append(("rank", str(self.rank), "must be >= 1"))
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            problems.append(("alpha", str(self.alpha), "must be a finite number > 0 (or null: the rank)"))
        if not self.target_modules:
            problems.append(("target_modules", "[]", "empty; name at least one module (e.g. to_q)"))
        if self.init not in ("gaussian", "kaiming"):
            problems.append(("init", repr(self.init), "expected 'gaussian' (official) or 'kaiming'"))
        raise_problems(problems, "model.lora")

    def peft_config(self):
        """The PEFT ``LoraConfig`` of this adapter."""
        from peft import LoraConfig as PeftLoraConfig

        return PeftLoraConfig(r=self.rank, lora_alpha=self.alpha or self.rank, target_modules=list(self.target_modules), init_lora_weights=peft_init(self.init))


def peft_init(init: LoraInit):
    """PEFT's ``init_lora_weights`` value for a LoRA ``init`` option (B = 0 either way)."""
    return "gaussian" if init == "gaussian" else True


def lora_layers(module: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def adapter_state(module: nn.Module) -> Optional[AdapterState]:
    """The adapter state of ``module``'s LoRA layers (None if it has none)."""
    layers = lora_layers(module)
    if not layers:
        return None
    first = layers[0]
    return tuple(first.active_adapters), bool(first.disable_adapters)


def apply_adapter_state(module: nn.Module, state: Optional[AdapterState], layers: Optional[Sequence[nn.Module]] = None) -> None:
    if state is None:
        return
    names, disabled = state
    for layer in lora_layers(module) if layers is None else layers:
        # PEFT's public setters would also change requires_grad (see the module docstring).
        layer._active_adapter = list(names)
        layer._disable_adapters = disabled


@contextlib.contextmanager
def using_adapter(module: nn.Module, name: Optional[str]) -> Iterator[None]:
    """Run ``module`` with only adapter ``name`` active (None: adapters disabled = the frozen base), then restore."""
    layers = lora_layers(module)
    previous = adapter_state(module)
    if previous is None:  # no adapter at all: the module already is the base
        yield
        return
    apply_adapter_state(module, ((name,) if name else previous[0], name is None), layers)
    try:
        yield
    finally:
        apply_adapter_state(module, previous, layers)


def checkpoint_keeping_adapters(block: nn.Module, *args):
    """``gradient_checkpointing_func`` for diffusers models: non-reentrant checkpointing (works with detached inputs
    and frozen bases) whose re-run in backward uses the adapter state the original forward used."""
    layers = lora_layers(block)
    state = adapter_state(block)

    def run(*inputs):
        current = adapter_state(block)
        apply_adapter_state(block, state, layers)
        try:
            return block(*inputs)
        finally:
            apply_adapter_state(block, current, layers)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


__all__ = ["AdapterState", "adapter_state", "apply_adapter_state", "checkpoint_keeping_adapters", "lora_layers", "using_adapter"]
