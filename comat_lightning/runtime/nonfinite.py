"""Non-finite values skip the update instead of poisoning the weights.

A NaN or inf in one loss term (a black image, a captioner overflow, a diverged discriminator) turns every gradient
into NaN, and one AdamW step with NaN gradients ruins the LoRA and the optimizer's moments for good. The module
checks each loss term before backward and each gradient norm after it; if anything is non-finite, neither optimizer
steps (nor their LR schedules), the step is counted and logged with the names of the offending values, and after
``limit`` such steps in a row the run stops at the step boundary with a checkpoint of the last good state (the
weights and optimizer state of the last applied update: skipped steps change neither).

Every decision is taken over all ranks (one boolean all-reduce per check), so ranks always skip together and the
collectives of backward and checkpointing never go out of step.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from comat_lightning.errors import InputError


class NonFiniteLimitReached(SystemExit):
    """The run stopped after ``limit`` consecutive skipped steps; the message names the values and the checkpoint."""


class NonFiniteGuard:
    """Per-step bookkeeping: ``check`` the values of each phase, then ``finish_step`` says whether to apply the
    update. ``reduce_any(flag)`` combines a boolean over the ranks (identity on one process)."""

    def __init__(self, limit: int, reduce_any: Callable[[bool], bool] = bool):
        if limit < 1:
            raise InputError(f"model.nonfinite_limit={limit}: must be >= 1 (the number of non-finite steps in a row that stops the run)")
        self.limit = limit
        self.reduce_any = reduce_any
        self.skipped_total = 0
        self.skipped_in_a_row = 0
        self.stop_message: Optional[str] = None  # set when the limit is reached; the GracefulStop callback stops
        self._bad: list[str] = []  # this step's non-finite values (names), on this rank
        self._any_bad = False  # ... on any rank

    def start_step(self) -> None:
        self._bad, self._any_bad = [], False

    @property
    def skipping(self) -> bool:
        """True once this step has a non-finite value on some rank: the remaining phases need not run."""
        return self._any_bad

    def check(self, values: dict[str, torch.Tensor]) -> bool:
        """Record the names of non-finite ``values``; True if every value is finite on every rank."""
        bad = [name for name, value in values.items() if not bool(torch.isfinite(value.detach()).all())]
        self._bad += bad
        self._any_bad = self.reduce_any(bool(bad)) or self._any_bad
        return not self._any_bad

    def finish_step(self, step: int) -> tuple[bool, Optional[str]]:
        """(apply the update?, a warning to print if not). Counts the skip and sets ``stop_message`` at the limit."""
        if not self._any_bad:
            self.skipped_in_a_row = 0
            return True, None
        self.skipped_total += 1
        self.skipped_in_a_row += 1
        names = ", ".join(self._bad) if self._bad else "a value on another rank"
        warning = (
            f"generator step {step}: non-finite {names}; update skipped (both optimizers untouched), "
            f"{self.skipped_in_a_row} in a row (limit {self.limit}), {self.skipped_total} in total"
        )
        if self.skipped_in_a_row >= self.limit:
            self.stop_message = (
                f"stopped: {self.skipped_in_a_row} generator steps in a row had non-finite values (last: {names} at "
                f"step {step}). The weights and optimizer state are those of the last applied update. Lower "
                "model.optimizer.lr or the named loss's weight, check its inputs, or raise model.nonfinite_limit"
            )
        return False, warning

    def state_dict(self) -> dict[str, int]:
        return {"skipped_total": self.skipped_total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # A resumed run gets the full limit again (it usually resumes after a config change).
        self.skipped_total = int(state.get("skipped_total", 0))
        self.skipped_in_a_row = 0


__all__ = ["NonFiniteGuard", "NonFiniteLimitReached"]
