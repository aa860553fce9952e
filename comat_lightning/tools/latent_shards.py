"""The real-latents shard format (written by ``python -m comat_lightning.tools.real_latents``, read by
``datamodules/latents.py``): prompts ``[k * shard_size, (k + 1) * shard_size)`` of a prompt file in
``shard-0000k.safetensors``, tensor ``"latents"`` (n, C, h, w) float32, with string metadata saying exactly what
made it (format, config, model, sampler, precision, seed, seed_rule, first_index, count, seeds, prompts_sha256).

A shard's content depends only on its prompts' indices (one seed per prompt), never on which process made it or
in which batches: any number of processes can make, keep or remake any shard."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from comat_lightning.files.atomic import atomic_write
from comat_lightning.sampling.seeds import prompt_seed
from datamodules.latents import LATENTS_KEY  # the tensor name the datamodule reads

FORMAT = "comat-real-latents/1"
# Metadata that must match for a kept shard to be the shard this run would write ("config" is only recorded:
# the same settings under another config path give the same latents).
_MUST_MATCH = ("format", "model", "sampler", "precision", "seed", "first_index", "count", "seeds", "prompts_sha256")
LEFTOVER_PATTERN = ".shard-*.tmp"  # a save's temporary file, left by a process killed while saving


def latent_seed(seed: int, index: int) -> int:
    """The noise seed of prompt ``index``: distinct per prompt, independent of batching and sharding."""
    return prompt_seed(seed, index)


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


@dataclass(frozen=True)
class Shard:
    number: int
    first: int  # index of its first prompt
    count: int

    @property
    def name(self) -> str:
        return shard_name(self.number)

    @property
    def indices(self) -> range:
        return range(self.first, self.first + self.count)


def plan_shards(num_prompts: int, shard_size: int) -> list[Shard]:
    return [Shard(k, first, min(shard_size, num_prompts - first)) for k, first in enumerate(range(0, num_prompts, shard_size))]


def shard_metadata(context: dict[str, str], shard: Shard, prompts: Sequence[str], seed: int) -> dict[str, str]:
    """``context`` (format, config, model, sampler, precision, seed, seed_rule) plus what identifies the shard;
    ``prompts`` are the shard's own prompts."""
    digest = hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()
    seeds = f"{latent_seed(seed, shard.first)}..{latent_seed(seed, shard.first + shard.count - 1)}"
    return {**context, "first_index": str(shard.first), "count": str(shard.count), "seeds": seeds, "prompts_sha256": digest}


def check_shard(path: Path, metadata: dict[str, str], shape: tuple[int, ...]) -> Optional[str]:
    """Why the shard at ``path`` cannot be kept (completing "the old file was ..."), or None if it is exactly
    what this run would write."""
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        return "missing"
    try:
        with safe_open(str(path), framework="pt") as handle:
            written = handle.metadata() or {}
            if LATENTS_KEY not in handle.keys():
                return f'without a "{LATENTS_KEY}" tensor'
            latents = handle.get_tensor(LATENTS_KEY)
    except (SafetensorError, OSError) as err:
        return f"unreadable ({err})"
    if tuple(latents.shape) != tuple(shape) or latents.dtype != torch.float32:
        return f"of shape {tuple(latents.shape)} {latents.dtype}, not {tuple(shape)} torch.float32"
    if not torch.isfinite(latents).all():
        return "holding non-finite values"
    stale = [key for key in _MUST_MATCH if written.get(key) != metadata.get(key)]
    if stale:
        return f"written with other settings ({', '.join(stale)})"
    return None


def write_shard(path: Path, latents: torch.Tensor, metadata: dict[str, str]) -> None:
    """Save to a temporary file in the same folder, then rename over ``path``: never a half-written shard."""
    from safetensors.torch import save_file

    # ".<shard name>.<pid>.tmp": what start-up removes as leftovers of a killed process (LEFTOVER_PATTERN)
    with atomic_write(path, tmp_suffix=f".{os.getpid()}.tmp") as tmp:
        save_file({LATENTS_KEY: latents.to(torch.float32).contiguous()}, str(tmp), metadata=metadata)


__all__ = ["FORMAT", "Shard", "check_shard", "latent_seed", "plan_shards", "shard_metadata", "shard_name", "write_shard"]
