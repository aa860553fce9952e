"""Per-step figures a user watches in TensorBoard: gradient norms, step time, throughput, peak memory.

All are cheap (no extra forward or backward) and are computed on every generator step.
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Iterable

import torch


def gradient_norm(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """L2 norm over the gradients of ``parameters`` (those that have one), in fp32; 0 if none has a gradient.
    Taken before clipping, so it shows how hard the loss pulls, not the clip value. Sharded (DTensor) gradients
    give their global norm."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    # torch's own total norm (as clip_grad_norm_ computes it); over FSDP2 shards it is a partial DTensor that one
    # all-reduce turns into the global value.
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0).float()
    return total.full_tensor() if hasattr(total, "full_tensor") else total


class StepClock:
    """Wall time of one training step. On CUDA it synchronises at both ends so the figure is the GPU's work, not
    the time to enqueue it (one sync per step costs microseconds against a multi-second step)."""

    def __init__(self):
        self._started = 0.0

    def start(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)  # peak memory is then per step
        self._started = time.perf_counter()

    def seconds(self, device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - self._started


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: peak memory allocated by tensors during the current step. CPU: the process's peak resident set size
    since it started (the OS keeps only that one figure)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


__all__ = ["StepClock", "gradient_norm", "peak_memory_gib"]
