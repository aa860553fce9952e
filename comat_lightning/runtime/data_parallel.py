"""Data-parallel helpers: reductions that give the same update on N ranks as on one process with N x the batch, and
the processes of a torchrun / SLURM launch for the tools that split work by rank."""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.distributed as dist


def launched_processes(cuda: bool) -> tuple[int, int, int, Callable[[], None]]:
    """(rank, world size, local rank, barrier) of this process: one process, or every process of a torchrun / SLURM
    launch (Lightning's own cluster environments read them), joined by a gloo (CPU) or NCCL (GPU) process group."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    environment = next((env() for env in (TorchElasticEnvironment, SLURMEnvironment) if env.detect()), None)
    if environment is None or environment.world_size() <= 1:
        return 0, 1, 0, lambda: None
    os.environ.setdefault("MASTER_ADDR", environment.main_address)
    os.environ.setdefault("MASTER_PORT", str(environment.main_port))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=environment.global_rank(), world_size=environment.world_size())
    if cuda:
        torch.cuda.set_device(environment.local_rank())
    return environment.global_rank(), environment.world_size(), environment.local_rank(), dist.barrier


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
