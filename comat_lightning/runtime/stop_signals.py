"""Stop on SIGTERM/SIGINT at the next safe point instead of dying mid-step.

A preemptible GPU gets SIGTERM and some seconds of grace; Ctrl+C sends SIGINT. The first signal only sets a flag,
which the long-running loop (training, prediction, real-latent sampling) reads at its next step boundary to write
what it has and exit with ``128 + signal number`` (the shell's "terminated by signal" status, so wrappers such as
``until python train.py fit ... --ckpt_path last; do :; done`` know the job is not finished). A second signal exits
at once: the files written so far are complete (every write is atomic), and the loop's last boundary is what a
rerun resumes from.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Optional

DEFAULT_SIGNALS = ("SIGTERM", "SIGINT")


class StoppedBySignal(SystemExit):
    """Raised at a step boundary after a stop signal; ``code`` is 128 + the signal number, and ``checkpoint`` the
    file written for the resume (None where the loop's own output files are the resume state)."""

    def __init__(self, signum: int, message: str, checkpoint: Optional[str] = None):
        super().__init__(128 + signum)
        self.signum = signum
        self.message = message
        self.checkpoint = checkpoint


class StopRequest:
    """Installable handlers for ``signals``: the first records the signal (``received``), a second exits at once.

    ``install`` only works in the main thread (Python delivers signals there); elsewhere it is a no-op and returns
    False. ``restore`` puts back the handlers it replaced, unless something else has replaced ours since."""

    def __init__(self, signals: tuple[str, ...] = DEFAULT_SIGNALS, what: str = "the run"):
        self.signals = tuple(getattr(signal, name) for name in signals)
        self.what = what  # for messages: "training", "prediction", ...
        self.received: Optional[int] = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def install(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return False
        for signum in self.signals:
            previous = signal.signal(signum, self._handle)
            self._previous.setdefault(signum, previous)  # re-installing keeps the first (original) handler
        return True

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            # Nothing is flushed: every file we write is written atomically, so what exists is complete.
            sys.stderr.write(f"\n{name} again: exiting now, without a new checkpoint\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.received = signum
        sys.stderr.write(f"\n{name} received: {self.what} stops at the next step boundary (send it again to exit at once)\n")
        sys.stderr.flush()

    def __enter__(self) -> "StopRequest":
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


__all__ = ["DEFAULT_SIGNALS", "StopRequest", "StoppedBySignal"]
