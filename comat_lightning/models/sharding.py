"""FSDP2 for the online UNet under Lightning's ``ModelParallelStrategy`` (``trainer.strategy: {class_path:
lightning.pytorch.strategies.ModelParallelStrategy, ...}``; it has no short registry name).

What is sharded and why:

- the online UNet (frozen base weights, the generator's LoRA and, when it shares the UNet, the discriminator's LoRA):
  one FSDP2 unit per down/mid/up block plus the root (``conv_in``, time embedding, ``conv_out``); an SD3 / FLUX.1
  transformer likewise, one unit per transformer block. Its frozen weights are the bulk of the memory (SDXL: 2.6 B
  parameters, FLUX.1-dev: 11.9 B); sharding them divides that by the number of ranks.
  Only the LoRA weights get gradients and optimizer state (FSDP2 keeps per-parameter ``requires_grad``).
- the trainable parts of helper models (the discriminator's head, or its own UNet): :func:`shard_trainable`;
- not the VAE, text encoders, captioner or segmentation models: they are frozen and run outside the UNet's
  units, so they stay plain replicated modules with no gradient buffers (sharding them would save their
  memory at the cost of an all-gather per use; a separate ``fully_shard`` of each is the next step if needed).

Gradients are reduce-scattered as means over ranks, like DDP's all-reduce, so N ranks train like one process
with N x the batch. Exports gather every rank's shard (:func:`full_state`).
"""

from __future__ import annotations

import torch
from torch import nn


def is_model_parallel(trainer) -> bool:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return trainer is not None and isinstance(trainer.strategy, ModelParallelStrategy)


def denoiser_blocks(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 units of a denoiser: a UNet's down/mid/up blocks; an SD3 transformer's blocks; FLUX's double- then
    single-stream blocks."""
    if hasattr(model, "transformer_blocks"):
        return [*model.transformer_blocks, *getattr(model, "single_transformer_blocks", [])]
    return [*model.down_blocks, *([model.mid_block] if model.mid_block is not None else []), *model.up_blocks]


def shard_denoiser(model: nn.Module, mesh) -> None:
    """``fully_shard`` each block (:func:`denoiser_blocks`), then the model itself (its remaining root parameters:
    a UNet's ``conv_in``, time embedding and ``conv_out``; a transformer's patch / text / time embeddings and output
    projection)."""
    from torch.distributed.fsdp import fully_shard

    for block in denoiser_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def shard_trainable(module: nn.Module, mesh) -> None:
    """Shard every part of a helper model that trains (e.g. the discriminator's head, or its own UNet when it does
    not share the generator's): left replicated, its gradients would not be averaged over ranks and the ranks
    would drift apart. Frozen parts stay plain."""
    for child in module.children():
        if not any(p.requires_grad for p in child.parameters()) or _is_sharded(child):
            continue
        if hasattr(child, "down_blocks") and hasattr(child, "up_blocks"):  # a UNet
            shard_denoiser(child, mesh)
        elif any(p.requires_grad for p in child.parameters(recurse=False)) or not list(child.children()):
            from torch.distributed.fsdp import fully_shard

            fully_shard(child, mesh=mesh)
        else:
            shard_trainable(child, mesh)


def _is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def full_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace sharded (DTensor) values by the full tensors gathered from every rank (a collective: every rank
    must call it, in the same key order); plain tensors pass through."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in state.items()}
