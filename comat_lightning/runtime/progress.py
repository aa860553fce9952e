"""Progress that counts generator steps: one line for the whole run, with rate, elapsed time and ETA.

Lightning's bars count the batches of the current epoch; a CoMat run is sized in generator steps
(``trainer.max_steps``) and spans many short epochs over a small prompt file, so a per-epoch bar restarts its clock
and rate at every epoch and shows no useful ETA. :class:`GeneratorStepProgress` counts generator steps toward
``max_steps`` from the start of the process (a resumed run starts at its step), and:

- on a terminal, redraws one line, cut to the terminal's width (never wraps)::

    step 120/5000   2% 3:29<2:21:10 0.57 step/s | concept 6.31 attr 0.002 fid 0.75

  (with a drawn bar ``|##------|`` after the percentage when the terminal is wide enough)

- when the output is a file or a pipe, prints a plain line every ``log_every_seconds`` (and at the first and last
  step), flushed at once, so ``tail -f`` of a log shows the run as it goes.

Validation, test and predict report their batch count the same way. :meth:`CoMatModule.configure_callbacks` puts it
in place of Lightning's default bar; a bar you configure yourself is left alone.
"""

from __future__ import annotations

import shutil
import sys
import time

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar

# Short names for the progress line (the logged names stay the long ones): at 80 columns every term must fit.
SHORT_NAMES = {
    "concept_matching": "concept",
    "attribute_concentration": "attr",
    "fidelity_preservation": "fid",
    "attention_segregation": "segregation",
    "attention_retention": "retention",
}
BAR_WIDTH = 16  # characters of the drawn bar on a terminal


def clock(seconds: float) -> str:
    """``h:mm:ss`` (or ``m:ss`` under an hour)."""
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def terms_text(metrics: dict) -> str:
    """``concept 6.31 attr 0.002 fid 0.75``: the progress-bar metrics with short names, 3 significant digits; the
    total ``loss`` only when it is not just the sum of several terms shown beside it (80 columns are few)."""
    parts = []
    numbers = {name: value for name, value in metrics.items() if name != "v_num"}
    if len(numbers) > 2:
        numbers.pop("loss", None)
    for name, value in numbers.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        parts.append(f"{SHORT_NAMES.get(name, name)} {number:.3g}")
    return " ".join(parts)


def status_line(label: str, done: int, total: int | None, elapsed: float, rate: float | None, terms: str = "",
                drawn: bool = False, bar: bool = True) -> str:  # fmt: skip
    """One progress line: ``label done/total pct [bar] elapsed<eta rate | terms``; ``drawn``: the terminal form
    (with the bar unless ``bar=False``), else the plain form for log files."""
    parts = [f"{label} {done}/{total if total else '?'}"]
    if total:
        fraction = min(done / total, 1.0)
        parts.append(f"{100 * fraction:3.0f}%")
        if drawn and bar:
            filled = round(BAR_WIDTH * fraction)
            parts.append("|" + "#" * filled + "-" * (BAR_WIDTH - filled) + "|")
    eta = (total - done) / rate if total and rate else None
    parts.append(clock(elapsed) + (f"<{clock(eta)}" if eta is not None else "") if drawn else f"elapsed {clock(elapsed)}")
    if not drawn and eta is not None:
        parts.append(f"eta {clock(eta)}")
    if rate:
        parts.append(f"{rate:.3g} {label}/s" if rate >= 0.1 else f"{1 / rate:.3g} s/{label}")
    return " ".join(parts) + (f" | {terms}" if terms else "")


def batches(counts, dataloader_idx: int):
    """The batch count of one evaluation dataloader (Lightning's per-dataloader list), or None if unknown."""
    try:
        return counts[dataloader_idx]
    except (IndexError, KeyError, TypeError):
        return None


class GeneratorStepProgress(ProgressBar):
    """The run's progress in generator steps (see the module docstring). ``log_every_seconds``: the interval of the
    plain lines when the output is not a terminal; ``refresh_seconds``: how often the terminal line is redrawn."""

    def __init__(self, log_every_seconds: float = 30.0, refresh_seconds: float = 0.5, stream=None):
        super().__init__()
        self.log_every_seconds = log_every_seconds
        self.refresh_seconds = refresh_seconds
        self._stream = stream
        self._enabled = True
        self._start = self._last = self._stage_start = 0.0
        self._start_step = 0
        self._line_open = False  # a terminal line is drawn and not yet ended with a newline

    # Lightning's ProgressBar interface.
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled and (self._trainer is None or self.trainer.is_global_zero)

    @property
    def stream(self):
        return self._stream or sys.stderr

    @property
    def on_terminal(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def total_steps(self, trainer) -> int | None:
        """``max_steps`` (generator steps), else the batches of all epochs if known, else None."""
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return int(trainer.max_steps)
        batches, epochs = trainer.num_training_batches, trainer.max_epochs
        if isinstance(batches, int) and epochs is not None and epochs > 0:
            return batches * epochs
        return None

    def at_last_step(self, trainer) -> bool:
        total = self.total_steps(trainer)
        return total is not None and self.generator_step(trainer) >= total

    @staticmethod
    def generator_step(trainer) -> int:
        return int(getattr(trainer.lightning_module, "generator_step", trainer.global_step))

    # Training.
    def on_train_start(self, trainer, pl_module) -> None:
        self._start = self._last = time.monotonic()
        self._start_step = self.generator_step(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, total = self.generator_step(trainer), self.total_steps(trainer)
        # The last step's line ends here, before Lightning prints why fit stopped.
        final = self.at_last_step(trainer)
        self._report("step", step, total, trainer, first=step == self._start_step + 1, final=final)
        self._reported_final = final

    def on_train_end(self, trainer, pl_module) -> None:
        if not getattr(self, "_reported_final", False):  # stopped early (a signal, the non-finite limit)
            self._report("step", self.generator_step(trainer), self.total_steps(trainer), trainer, final=True)
        self._end_line()

    # Validation, test, predict: the batch count of the stage, on the same line on a terminal; the stage's clock
    # starts before its first batch (its rate and elapsed time include that batch).
    def on_validation_start(self, trainer, pl_module) -> None:
        self._stage_start = time.monotonic()

    def on_test_start(self, trainer, pl_module) -> None:
        self._stage_start = time.monotonic()

    def on_predict_start(self, trainer, pl_module) -> None:
        self._stage_start = time.monotonic()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._stage("validate", trainer, batch_idx, batches(trainer.num_val_batches, dataloader_idx))

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._stage("test", trainer, batch_idx, batches(trainer.num_test_batches, dataloader_idx))

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._stage("predict", trainer, batch_idx, batches(trainer.num_predict_batches, dataloader_idx))

    def on_validation_end(self, trainer, pl_module) -> None:
        # A validation after the last step: its line ends here, before Lightning prints why fit stopped.
        if trainer.state.fn == "fit" and self.at_last_step(trainer):
            self._end_line()

    def on_test_end(self, trainer, pl_module) -> None:
        self._end_line()

    def on_predict_end(self, trainer, pl_module) -> None:
        self._end_line()

    def _stage(self, label: str, trainer, batch_idx: int, total) -> None:
        if not self.is_enabled:
            return
        total = int(total) if isinstance(total, (int, float)) and total != float("inf") else None
        now = time.monotonic()
        if trainer.state.fn == "fit":  # validation inside fit: after the step line on a terminal; a log gets one line
            if self.on_terminal:
                step = self.generator_step(trainer)
                self._draw(f"step {step}/{self.total_steps(trainer) or '?'} | {label} {batch_idx + 1}/{total or '?'}")
            elif total is not None and batch_idx + 1 == total:
                print(f"{label}: {total} batches in {clock(now - self._stage_start)}", file=self.stream, flush=True)
            return
        self._report(label, batch_idx + 1, total, trainer, first=batch_idx == 0, final=total == batch_idx + 1,
                     start=(self._stage_start, 0))  # fmt: skip

    def _report(self, label: str, done: int, total: int | None, trainer, first: bool = False, final: bool = False,
                start: tuple[float, int] | None = None) -> None:  # fmt: skip
        """A progress line (throttled); ``start``: (time, count) the rate counts from (default: the run's)."""
        if not self.is_enabled:
            return
        now = time.monotonic()
        interval = self.refresh_seconds if self.on_terminal else self.log_every_seconds
        if not (first or final or now - self._last >= interval):
            return
        self._last = now
        began, began_at = start if start is not None else (self._start, self._start_step)
        elapsed = now - began
        progress = done - began_at
        rate = progress / elapsed if progress > 0 and elapsed > 0 else None
        terms = terms_text(trainer.progress_bar_metrics) if label == "step" else ""
        line = status_line(label, done, total, elapsed, rate, terms, drawn=self.on_terminal)
        if self.on_terminal:
            if len(line) > self.width:  # a narrow terminal: the terms matter more than the drawn bar
                line = status_line(label, done, total, elapsed, rate, terms, drawn=True, bar=False)
            self._draw(line)
            if final:
                self._end_line()
        else:
            print(line, file=self.stream, flush=True)

    @property
    def width(self) -> int:
        return shutil.get_terminal_size((80, 24)).columns - 1  # never the last column: some terminals wrap there

    def _draw(self, line: str) -> None:
        width = self.width
        self.stream.write("\r" + line[:width].ljust(width))
        self.stream.flush()
        self._line_open = True

    def _end_line(self) -> None:
        if self._line_open:
            self.stream.write("\n")
            self.stream.flush()
            self._line_open = False

    def print(self, *args, sep: str = " ", **kwargs) -> None:  # Lightning's trainer.print while a bar is drawn
        self._end_line()
        print(*args, sep=sep, file=self.stream, flush=True, **kwargs)


def generator_step_bar(bar):
    """:class:`GeneratorStepProgress` in place of Lightning's default bar ``bar`` (its tqdm or Rich bar, as
    Lightning chose it); None for any other (or no) bar: one you configured stays."""
    if type(bar) in (TQDMProgressBar, RichProgressBar):
        return GeneratorStepProgress()
    return None


# The names of earlier releases (a tqdm and a Rich bar): configs naming them get the one progress callback.
GeneratorStepProgressBar = GeneratorStepRichProgressBar = GeneratorStepProgress

__all__ = ["GeneratorStepProgress", "GeneratorStepProgressBar", "GeneratorStepRichProgressBar", "generator_step_bar",
           "status_line", "terms_text"]  # fmt: skip
