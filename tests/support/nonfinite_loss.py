"""Test-only loss: concept matching that returns NaN (or inf) on chosen generator steps, to drive the non-finite
step guard through the real training loop."""

from __future__ import annotations

import torch

from callbacks.concept_matching import ConceptMatchingLoss


class NonFiniteOnSteps(ConceptMatchingLoss):
    """``bad_steps``: 0-based generator steps (the value of ``generator_step`` while the step runs) whose loss is
    replaced by ``value`` (keeping the graph, as a real overflow would)."""

    def __init__(self, bad_steps: list[int], value: float = float("nan"), **kwargs):
        super().__init__(**kwargs)
        self.bad_steps = set(bad_steps)
        self.value = value

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.module = pl_module  # the step counter and train/eval mode: not part of the loss contract (LossContext)

    def compute(self, context, generated):
        loss, logs = super().compute(context, generated)
        if self.module.training and self.module.generator_step in self.bad_steps:
            loss = loss * torch.tensor(self.value)
        return loss, logs
