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
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

# (active adapter names, adapters disabled?) as seen by every LoRA layer of a module
AdapterState = tuple[tuple[str, ...], bool]


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
