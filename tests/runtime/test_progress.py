"""The run's progress line: generator steps toward max_steps with rate, elapsed and ETA that survive epoch
boundaries; cut to the terminal's width there, plain flushed lines in a log file."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest

from comat_lightning.runtime.progress import GeneratorStepProgress, clock, status_line, terms_text


def test_clock_and_terms():
    assert clock(59.9) == "0:59" and clock(3600 + 62) == "1:01:02"
    metrics = {"loss": 6.3061, "concept_matching": 6.3, "attribute_concentration": 0.00213, "v_num": "0"}
    assert terms_text(metrics) == "concept 6.3 attr 0.00213"  # the total only beside a single term; no v_num
    assert terms_text({"loss": 6.3061, "concept_matching": 6.3061}) == "loss 6.31 concept 6.31"


def test_status_line_has_rate_elapsed_and_eta():
    line = status_line("step", 120, 5000, elapsed=210.0, rate=0.57, terms="loss 6.31")
    assert line == "step 120/5000   2% elapsed 3:30 eta 2:22:41 0.57 step/s | loss 6.31"
    drawn = status_line("step", 8, 16, elapsed=80.0, rate=0.1, drawn=True)
    assert drawn == "step 8/16  50% |########--------| 1:20<1:20 0.1 step/s"
    assert status_line("step", 2, 16, elapsed=30.0, rate=0.05) .endswith("eta 4:40 20 s/step")
    assert status_line("step", 3, None, elapsed=1.0, rate=None) == "step 3/? elapsed 0:01"


class FakeTrainer(SimpleNamespace):
    """What the progress callback reads of a Trainer (a real fit is exercised by the CLI tests)."""


def test_log_file_lines_count_generator_steps_across_epochs(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("comat_lightning.runtime.progress.time.monotonic", lambda: now[0])
    stream = io.StringIO()
    progress = GeneratorStepProgress(log_every_seconds=30.0, stream=stream)
    module = SimpleNamespace(generator_step=0)
    trainer = FakeTrainer(lightning_module=module, max_steps=12, num_training_batches=6, max_epochs=-1,
                          is_global_zero=True, global_step=0, progress_bar_metrics={"loss": 2.0, "fidelity_preservation": 0.5})
    progress._trainer = trainer
    progress.on_train_start(trainer, module)
    for step in range(1, 13):  # two epochs of 6 batches: the clock and the rate do not restart
        now[0] += 10.0
        module.generator_step = step
        progress.on_train_batch_end(trainer, module, None, None, (step - 1) % 6)
    progress.on_train_end(trainer, module)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "step 1/12   8% elapsed 0:10 eta 1:50 0.1 step/s | loss 2 fid 0.5"
    assert lines[1].startswith("step 4/12  33% elapsed 0:40 eta 1:20")  # every 30 s, not every step
    assert lines[-1].startswith("step 12/12 100% elapsed 2:00 eta 0:00")
    assert "\r" not in stream.getvalue() and "v_num" not in stream.getvalue()


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def terminal(monkeypatch) -> Terminal:
    """A stream that says it is an 80-column terminal."""
    monkeypatch.setattr("comat_lightning.runtime.progress.shutil.get_terminal_size", lambda fallback: SimpleNamespace(columns=80))
    return Terminal()


def test_terminal_line_never_wraps_and_keeps_the_terms(monkeypatch, terminal):
    now = [100.0]
    monkeypatch.setattr("comat_lightning.runtime.progress.time.monotonic", lambda: now[0])
    stream = terminal
    progress = GeneratorStepProgress(stream=stream)
    module = SimpleNamespace(generator_step=0)
    trainer = FakeTrainer(lightning_module=module, max_steps=5000, is_global_zero=True, global_step=0,
                          progress_bar_metrics={"loss": 6.31, "concept_matching": 6.3, "attribute_concentration": 0.002,
                                                "fidelity_preservation": 0.75})
    progress._trainer = trainer
    progress.on_train_start(trainer, module)
    now[0] += 210.0
    module.generator_step = 120
    progress.on_train_batch_end(trainer, module, None, None, 0)
    drawn = stream.getvalue().split("\r")[-1]
    assert len(drawn) == 79 and "|#" not in drawn and "|-" not in drawn  # no room for the bar at 80 columns
    assert drawn.rstrip() == "step 120/5000   2% 3:30<2:22:20 0.571 step/s | concept 6.3 attr 0.002 fid 0.75"


def test_a_validation_after_the_last_step_ends_its_terminal_line(terminal):
    """Seen in tmux: the last validation's line stayed open and Lightning's "`Trainer.fit` stopped" joined it."""
    stream = terminal
    progress = GeneratorStepProgress(stream=stream)
    module = SimpleNamespace(generator_step=0)
    trainer = FakeTrainer(lightning_module=module, max_steps=20, is_global_zero=True, global_step=0, progress_bar_metrics={},
                          num_val_batches=[2], state=SimpleNamespace(fn="fit"))
    progress._trainer = trainer
    progress.on_train_start(trainer, module)
    for step, ended in ((10, False), (20, True)):
        module.generator_step = step
        progress.on_train_batch_end(trainer, module, None, None, 0)
        for batch_idx in range(2):
            progress.on_validation_batch_end(trainer, module, None, None, batch_idx)
        progress.on_validation_end(trainer, module)
        assert stream.getvalue().endswith("\n") == ended, step
        assert stream.getvalue().rstrip(" \n").endswith(f"step {step}/20 | validate 2/2")


def test_evaluation_rate_counts_the_first_batch_from_the_stage_start(monkeypatch):
    """Seen in the A-STAR demo's log: "predict 1/2 ... 4.59e+04 predict/s" (the clock started after batch 1)."""
    now = [100.0]
    monkeypatch.setattr("comat_lightning.runtime.progress.time.monotonic", lambda: now[0])
    stream = io.StringIO()
    progress = GeneratorStepProgress(stream=stream)
    module = SimpleNamespace(generator_step=0)
    trainer = FakeTrainer(lightning_module=module, is_global_zero=True, num_predict_batches=[2], state=SimpleNamespace(fn="predict"),
                          progress_bar_metrics={})
    progress._trainer = trainer
    progress.on_predict_start(trainer, module)
    for batch_idx in range(2):
        now[0] += 4.0
        progress.on_predict_batch_end(trainer, module, None, None, batch_idx)
    assert stream.getvalue().splitlines() == ["predict 1/2  50% elapsed 0:04 eta 0:04 0.25 predict/s",
                                              "predict 2/2 100% elapsed 0:08 eta 0:00 0.25 predict/s"]
