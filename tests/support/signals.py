"""Test-only callback: the process sends itself a signal at a chosen batch, as a scheduler's preemption would."""

from __future__ import annotations

import os
import signal

from lightning.pytorch import Callback


class SignalAtBatch(Callback):
    """Send ``signal_name`` to this process when batch ``batch_index`` of ``predict`` starts."""

    def __init__(self, batch_index: int, signal_name: str = "SIGTERM"):
        self.batch_index = batch_index
        self.signum = getattr(signal, signal_name)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx == self.batch_index:
            os.kill(os.getpid(), self.signum)
