"""Reductions that give the same update on N data-parallel ranks as on one process with N x the batch."""

from __future__ import annotations

import torch
import torch.distributed as dist


def data_parallel_world_size() -> int:
    """Ranks in the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def data_parallel_mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """This rank's share of a mean over the whole data-parallel batch: ``total`` (sum of this rank's items) over
    the mean item count per rank. DDP and FSDP average gradients over ranks, so the update is then exactly that of
    the mean over every rank's items; a per-rank mean would weigh items more on a rank that has fewer of them (e.g.
    entities per prompt). Every rank must call it (one all-reduce of a scalar); one process: ``total / count``."""
    count = count.detach().to(device=total.device, dtype=torch.float32)
    world = data_parallel_world_size()
    if world > 1:
        count = count.clone()
        dist.all_reduce(count)
        count = count / world
    # No item anywhere: count 0 and total 0 (a sum over nothing), so the quotient is 0 without a host sync to test it.
    return total / count.clamp(min=1e-12)
