"""Stop at a step boundary with a checkpoint: on SIGTERM/SIGINT, or when the module gives up on non-finite steps.

CoMatModule attaches this callback to every run (``configure_callbacks``); list it under ``trainer.callbacks`` only
to change the signals it handles.

- ``fit``: the first signal is acted on after the current generator step (and its discriminator step) completes:
  ``last.ckpt`` is written in the checkpoint folder (atomically) and the process exits with 128 + the signal
  number; ``--ckpt_path last`` resumes exactly there. A signal during a validation pass is acted on after the next
  training step. A second signal exits at once (the previous checkpoint is intact).
- ``predict``: the run stops after the current batch's images are written; the same command resumes (the image
  writer skips finished images).
- All ranks stop at the same step: the flag is combined over ranks at every step boundary, so a signal that only
  reaches rank 0 (e.g. ``kill`` of the launching process) never leaves the others waiting in a collective.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Optional

from lightning.pytorch import Callback

from comat_lightning.errors import InputError
from comat_lightning.runtime.checkpoint_files import checkpoint_folders, remove_stale_temporaries, stop_checkpoint_path
from comat_lightning.runtime.nonfinite import NonFiniteLimitReached
from comat_lightning.runtime.stop_signals import DEFAULT_SIGNALS, StoppedBySignal, StopRequest


class GracefulStop(Callback):
    """Args:
    signals: the signal names that ask for a stop (default SIGTERM and SIGINT; add e.g. SIGUSR1 for a
        scheduler that warns with it)."""

    def __init__(self, signals: list[str] = list(DEFAULT_SIGNALS)):  # noqa: B006 (read-only)
        unknown = [name for name in signals if not isinstance(getattr(signal, str(name), None), signal.Signals)]
        if unknown or not signals:
            raise InputError(f"GracefulStop(signals={signals}): expected signal names such as SIGTERM, SIGINT, SIGUSR1")
        self.signals = tuple(signals)
        self._request = StopRequest(self.signals)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:
            for path in remove_stale_temporaries(checkpoint_folders(trainer)):
                print(f"removed {path} (left by a process killed while writing a checkpoint)", file=sys.stderr)

    # ------------------------------------------------------------------------------------------ fit

    def on_train_start(self, trainer, pl_module) -> None:
        # After Lightning's own SIGTERM handler is registered, replacing it: Lightning would exit 0 without a
        # checkpoint, and broadcasts from inside the handler, which can desynchronise the ranks' collectives.
        self._request = StopRequest(self.signals, what="training")
        self._request.install()
        if trainer.received_sigterm:  # arrived between Lightning's registration and now
            self._request.received = signal.SIGTERM

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        guard = getattr(pl_module, "nonfinite", None)
        give_up = guard.stop_message if guard is not None else None  # already agreed over the ranks
        signalled = trainer.strategy.reduce_boolean_decision(self._request.requested, all=False)
        if not (signalled or give_up):
            return
        path = stop_checkpoint_path(trainer)
        for callback in trainer.checkpoint_callbacks:  # ModelCheckpoint then owns the file: it overwrites it after a
            if Path(getattr(callback, "dirpath", "") or "") == path.parent:  # resume instead of writing last-v1.ckpt
                callback.last_model_path = str(path)
        # Every rank takes part (FSDP2 gathers), rank 0 writes; weights_only=False = the full training state
        # (optimizers, loops, callbacks), not a load option.
        trainer.save_checkpoint(path, weights_only=False)
        # This step is complete: log its metrics now (Lightning would after this hook, which we leave by raising).
        trainer._logger_connector.update_train_step_metrics()
        for logger in trainer.loggers:
            logger.save()
        if give_up:
            raise NonFiniteLimitReached(f"{give_up}\ncheckpoint: {path} (resume with --ckpt_path last)")
        step = getattr(pl_module, "generator_step", trainer.global_step)
        self._stop(trainer, f"stopped after generator step {step}; checkpoint {path}; resume with --ckpt_path last", path)

    def on_train_end(self, trainer, pl_module) -> None:
        self._request.restore()

    # ------------------------------------------------------------------------------------------ predict

    def on_predict_start(self, trainer, pl_module) -> None:
        self._request = StopRequest(self.signals, what="prediction")
        self._request.install()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        # Runs after the image writer (model callbacks come after the configured ones), so this batch is on disk.
        # Decided by each process alone: under DDP Lightning's predict sampler gives ranks unequal batch counts, so a
        # collective here would wait forever on the rank with one batch more (torchrun and SLURM signal every rank).
        if not self._request.requested:
            return
        self._stop(trainer, f"prediction stopped after batch {batch_idx}; rerun the same command to continue")

    def _stop(self, trainer, what: str, checkpoint: Optional[Path] = None) -> None:
        signum = self._request.received or signal.SIGTERM  # None here: another rank received it
        message = f"{signal.Signals(signum).name}: {what}"
        if trainer.is_global_zero:
            print(message, file=sys.stderr, flush=True)
        raise StoppedBySignal(signum, message, None if checkpoint is None else str(checkpoint))

    def on_predict_end(self, trainer, pl_module) -> None:
        self._request.restore()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._request.restore()


__all__ = ["GracefulStop"]
