"""Which denoising steps of the online model's rollout carry gradient.

Which steps carry gradient is a pluggable :class:`GradientStepPolicy`:

- :class:`EvenlySpacedSteps` (CoMat): K steps, ``num_steps // K`` apart, with a random phase.
- :class:`LastSteps` (DRaFT-K, AlignProp): the last K steps.
- :class:`SingleRandomStep` (ReFL): one random step inside a window near the end.

How the denoising loop uses the chosen steps (what runs with a graph, and what it costs in memory): the
docstring of :mod:`comat_lightning.sampling.denoising`."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from comat_lightning.errors import InputError


class GradientStepPolicy(ABC):
    """Chooses the denoising step indices (0 = first, from pure noise) that carry gradient."""

    @abstractmethod
    def select(self, num_steps: int, generator: torch.Generator) -> list[int]: ...

    @staticmethod
    def _randint(low: int, high: int, generator: torch.Generator) -> int:
        """Uniform integer in [low, high], inclusive."""
        return int(torch.randint(low, high + 1, (1,), generator=generator).item())


class EvenlySpacedSteps(GradientStepPolicy):
    """CoMat: steps ``interval = num_steps // K`` apart, starting at a random phase
    ``s`` in ``[0, num_steps - interval * (K - 1) - 1]``. 50 steps, K=5: interval 10, s in [0, 9].

    Args:
        num_gradient_steps: K.
        fill_to_end: True (official ``range(s, num_steps, interval)``): every interval-th step from the phase to the
            end, which is K steps when K divides the step count (50 / 5) and can be K + 1 otherwise (50 steps, K=3,
            s=0: [0, 16, 32, 48]); False: exactly K steps (memory is then bounded by K whatever the step count).
    """

    def __init__(self, num_gradient_steps: int = 5, fill_to_end: bool = True):
        if num_gradient_steps < 1:
            raise InputError(f"EvenlySpacedSteps: num_gradient_steps must be >= 1, got {num_gradient_steps}")
        self.num_gradient_steps = num_gradient_steps
        self.fill_to_end = bool(fill_to_end)

    def select(self, num_steps: int, generator: torch.Generator) -> list[int]:
        k = self.num_gradient_steps
        if k > num_steps:
            raise InputError(f"EvenlySpacedSteps: num_gradient_steps={k} exceeds num_inference_steps={num_steps}")
        interval = num_steps // k
        phase = self._randint(0, num_steps - interval * (k - 1) - 1, generator)
        if self.fill_to_end:
            return list(range(phase, num_steps, interval))
        return [phase + i * interval for i in range(k)]


class LastSteps(GradientStepPolicy):
    """DRaFT-K / AlignProp: gradient through the last K steps only."""

    def __init__(self, num_gradient_steps: int = 1):
        if num_gradient_steps < 1:
            raise InputError(f"LastSteps: num_gradient_steps must be >= 1, got {num_gradient_steps}")
        self.num_gradient_steps = num_gradient_steps

    def select(self, num_steps: int, generator: torch.Generator) -> list[int]:
        if self.num_gradient_steps > num_steps:
            raise InputError(f"LastSteps: num_gradient_steps={self.num_gradient_steps} exceeds num_inference_steps={num_steps}")
        return list(range(num_steps - self.num_gradient_steps, num_steps))


class SingleRandomStep(GradientStepPolicy):
    """ReFL-style: one step drawn uniformly from the window ``[first_fraction, last_fraction)`` of the schedule
    (default: the last quarter, as ReFL's t in [30, 39] of 40). Unlike ReFL the rollout then finishes the
    remaining steps as constants instead of jumping to the x0 prediction."""

    def __init__(self, first_fraction: float = 0.75, last_fraction: float = 1.0):
        if not 0.0 <= first_fraction < last_fraction <= 1.0:
            raise InputError(f"SingleRandomStep: need 0 <= first_fraction < last_fraction <= 1, got {first_fraction}, {last_fraction}")
        self.first_fraction = first_fraction
        self.last_fraction = last_fraction

    def select(self, num_steps: int, generator: torch.Generator) -> list[int]:
        low = min(int(self.first_fraction * num_steps), num_steps - 1)
        high = max(low, min(int(self.last_fraction * num_steps), num_steps) - 1)
        return [self._randint(low, high, generator)]
