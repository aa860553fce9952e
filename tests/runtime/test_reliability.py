"""Runs survive kills, signals, non-finite values and damaged checkpoints without losing work.

The kill tests run the real entry point (``python train.py fit``) on the tiny demo with all three CoMat losses, a
checkpoint after every generator step, and compare the final weights and optimizer states bit for bit with an
uninterrupted run. benchmarks/kill_resume.py repeats this at random kill moments.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, instantiate_cli, tensorboard_scalars
from lightning.pytorch import Callback

sys.path.insert(0, str(REPO / "benchmarks"))
from kill_resume import CHECKPOINTS, differences, final_state, run_fit, write_config  # noqa: E402

STEPS = 5


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 5-step run; its folder."""
    workdir = tmp_path_factory.mktemp("reference")
    write_config(workdir)
    run = run_fit(workdir, STEPS)
    assert run.returncode == 0, run.log[-4000:]
    return workdir


def test_checkpoint_retention_keeps_the_newest_three_and_last(reference):
    names = sorted(p.name for p in (reference / CHECKPOINTS).iterdir())
    assert names == ["epoch=0-step=3.ckpt", "epoch=0-step=4.ckpt", "epoch=0-step=5.ckpt", "last.ckpt"]


@pytest.mark.slow  # end-to-end, in subprocesses
def test_sigkill_mid_training_then_resume_ends_bit_identical(reference, tmp_path):
    """SIGKILL a moment after the step-2 checkpoint; then damage the newest checkpoint and leave a dead writer's
    temporary file, as a kill mid-write on a flaky disk would: `--ckpt_path last` warns, takes the previous good
    checkpoint, removes the temporary, and the run still ends exactly where the uninterrupted one did."""
    write_config(tmp_path)
    killed = run_fit(tmp_path, STEPS, kill=(signal.SIGKILL, 0.7), anchor=CHECKPOINTS / "epoch=0-step=2.ckpt")
    assert killed.returncode == -signal.SIGKILL, killed.log[-3000:]
    folder = tmp_path / CHECKPOINTS
    newest = max(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns)
    step_before = torch.load(newest, map_location="cpu", weights_only=True)["comat"]["generator_step"]
    assert 2 <= step_before < STEPS
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    stale = folder / ".last.ckpt.tmp-999999999"  # pid beyond pid_max: its writer is certainly dead
    stale.write_bytes(b"partial")

    resumed = run_fit(tmp_path, STEPS, resume=True)
    assert resumed.returncode == 0, resumed.log[-4000:]
    assert f"checkpoint {newest} cannot be loaded" in resumed.log and "trying the previous one" in resumed.log
    assert not stale.exists()
    assert differences(final_state(reference), final_state(tmp_path)) == []


@pytest.mark.slow  # end-to-end, in subprocesses
def test_sigterm_checkpoints_at_the_step_boundary_and_exits_then_resumes_bit_identical(reference, tmp_path):
    write_config(tmp_path)
    stopped = run_fit(tmp_path, STEPS, kill=(signal.SIGTERM, 0.3), anchor=CHECKPOINTS / "epoch=0-step=1.ckpt")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.log[-3000:]
    last = torch.load(tmp_path / CHECKPOINTS / "last.ckpt", map_location="cpu", weights_only=True)
    step = last["comat"]["generator_step"]
    assert 1 <= step < STEPS and last["global_step"] == step  # written at a step boundary, not mid-step
    assert f"SIGTERM: stopped after generator step {step}; checkpoint" in stopped.log
    assert "Traceback" not in stopped.log

    resumed = run_fit(tmp_path, STEPS, resume=True)
    assert resumed.returncode == 0, resumed.log[-4000:]
    assert not (tmp_path / CHECKPOINTS / "last-v1.ckpt").exists()  # ModelCheckpoint took over the stop's last.ckpt
    assert differences(final_state(reference), final_state(tmp_path)) == []


@pytest.mark.slow  # end-to-end, in subprocesses
def test_a_second_signal_exits_at_once(tmp_path):
    """The first SIGTERM only sets the flag (the loop is still running); the second ends the process with 143."""
    script = tmp_path / "loop.py"
    script.write_text(
        "import os, signal, sys, time\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from comat_lightning.runtime.stop_signals import StopRequest\n"
        "request = StopRequest(what='the loop'); request.install()\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(0.2)\n"
        "print('flag', request.requested, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(5)\n"
        "print('not reached', flush=True)\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 143
    assert result.stdout.strip() == "flag True"
    assert "SIGTERM received: the loop stops at the next step boundary" in result.stderr
    assert "SIGTERM again: exiting now" in result.stderr


def test_stop_request_restores_the_previous_handlers():
    from comat_lightning.runtime.stop_signals import StopRequest

    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as request:
        assert signal.getsignal(signal.SIGINT) == request._handle
    assert signal.getsignal(signal.SIGINT) is before


# ------------------------------------------------------------------------------------------ non-finite values


class _RecordSteps(Callback):
    """Trainable weights and both optimizers' step counts after every generator step."""

    def __init__(self):
        self.weights, self.optimizer_steps = {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = pl_module.generator_step
        self.weights[step] = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        self.optimizer_steps[step] = [max((int(s["step"]) for s in o.state.values() if "step" in s), default=0) for o in trainer.optimizers]


def _nonfinite_config(tmp_path: Path, bad_steps: list[int], value: str = ".nan") -> Path:
    config = yaml.safe_load((REPO / "configs" / "tiny_demo.yaml").read_text())
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"] == "callbacks.ConceptMatchingLoss":
            callback["class_path"] = "tests.support.nonfinite_loss.NonFiniteOnSteps"
            callback["init_args"].update(bad_steps=bad_steps, name="concept_matching")
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["every_n_train_steps"] = 100  # only the stop's checkpoint
    config["trainer"].update(limit_val_batches=0, enable_progress_bar=False)
    config["model"]["nonfinite_limit"] = 3
    for key in ("train_file", "val_file"):
        config["data"][key] = str(REPO / config["data"][key])
    path = tmp_path / "nan.yaml"
    path.write_text(yaml.safe_dump(config).replace("'.nan'", value))
    return path


def test_nonfinite_steps_are_skipped_counted_and_the_limit_stops_with_a_resumable_checkpoint(tmp_path, monkeypatch):
    from comat_lightning.runtime.nonfinite import NonFiniteLimitReached

    monkeypatch.chdir(tmp_path)
    # Steps (0-based) 1, 3, 4, 5 return NaN: 1 is skipped alone, 3-5 are three in a row = the limit.
    cli = instantiate_cli(["--config", str(_nonfinite_config(tmp_path, [1, 3, 4, 5])), "--trainer.max_steps=10"])
    recorder = _RecordSteps()
    cli.trainer.callbacks.append(recorder)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(NonFiniteLimitReached) as stop:
        warnings.simplefilter("always")
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    w = recorder.weights
    assert sorted(w) == [1, 2, 3, 4, 5, 6]
    same = lambda a, b: all(torch.equal(w[a][n], w[b][n]) for n in w[a])  # noqa: E731
    assert same(2, 1) and not same(3, 2) and same(4, 3) and same(5, 3) and same(6, 3)  # skipped steps change nothing
    # Both optimizers (generator, discriminator) stepped only on the applied steps 0 and 2.
    assert recorder.optimizer_steps[1] == [1, 1] and recorder.optimizer_steps[2] == [1, 1]
    assert recorder.optimizer_steps[3] == [2, 2] and recorder.optimizer_steps[6] == [2, 2]
    skips = [str(c.message) for c in caught if "update skipped" in str(c.message)]
    assert len(skips) == 4 and all("non-finite concept_matching" in m for m in skips)
    assert "3 in a row (limit 3), 4 in total" in skips[-1]
    message = str(stop.value.code)
    assert "3 generator steps in a row had non-finite values (last: concept_matching at step 6)" in message
    checkpoint = tmp_path / "runs" / "nan" / "version_0" / "checkpoints" / "last.ckpt"
    assert f"checkpoint: {checkpoint}" in message
    logged = tensorboard_scalars(tmp_path / "runs" / "nan")
    assert [v for _, v in sorted(logged["train/skipped_steps"])] == [0.0, 1.0, 1.0, 2.0, 3.0, 4.0]

    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert saved["comat"]["generator_step"] == 6 and saved["global_step"] == 2 and saved["comat"]["nonfinite"] == {"skipped_total": 4}
    for name, value in saved["state_dict"].items():  # the last good state
        assert torch.equal(value, w[3][name]), name

    # Resume (the bad steps gone): training goes on from step 6 with the saved weights and optimizer states.
    cli = instantiate_cli(["--config", str(_nonfinite_config(tmp_path, [])), "--trainer.max_steps=4"])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(checkpoint))
    assert cli.model.generator_step == 8 and cli.trainer.global_step == 4 and cli.model.nonfinite.skipped_total == 4


def test_an_infinite_discriminator_gradient_skips_both_updates():
    from comat_lightning.runtime.nonfinite import NonFiniteGuard

    guard = NonFiniteGuard(limit=2)
    guard.start_step()
    assert guard.check({"concept_matching": torch.tensor(1.0)}) and not guard.skipping
    assert not guard.check({"fidelity_preservation/discriminator gradient": torch.tensor(float("inf"))})
    apply, warning = guard.finish_step(7)
    assert not apply and "generator step 7: non-finite fidelity_preservation/discriminator gradient" in warning
    guard.start_step()
    assert guard.finish_step(8) == (True, None) and guard.skipped_in_a_row == 0 and guard.skipped_total == 1


# ------------------------------------------------------------------------------------------ checkpoint files


def test_resume_path_skips_unreadable_checkpoints_with_a_warning(reference, tmp_path):
    from comat_lightning.runtime.checkpoint_files import resume_path

    folder = tmp_path / "checkpoints"
    shutil.copytree(reference / CHECKPOINTS, folder)
    good = folder / "epoch=0-step=5.ckpt"
    last = folder / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated
    (folder / "garbage.ckpt").write_bytes(os.urandom(4096))
    not_lightning = folder / "weights.ckpt"
    torch.save({"w": torch.zeros(2)}, not_lightning)
    now = good.stat().st_mtime
    for age, path in enumerate([not_lightning, folder / "garbage.ckpt", last]):  # all newer than the good one
        os.utime(path, (now + 10 - age, now + 10 - age))
    with pytest.warns(UserWarning) as caught:
        assert resume_path([folder]) == good
    messages = [str(w.message) for w in caught]
    assert any(f"checkpoint {last} cannot be loaded" in m for m in messages)
    assert any("garbage.ckpt cannot be loaded" in m for m in messages)
    assert any("weights.ckpt cannot be loaded (not a Lightning checkpoint)" in m for m in messages)
    assert resume_path([tmp_path / "nothing-here"]) is None


def test_checkpoints_load_with_weights_only(tmp_path):
    """A checkpoint holding a pickled object (code that would run on load) is refused, whatever the caller asks."""
    from comat_lightning.runtime.checkpoint_state import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "step": 3}, tmp_path / "ok.ckpt")
    assert io.load_checkpoint(tmp_path / "ok.ckpt", weights_only=False)["step"] == 3
    torch.save({"evil": _Unpicklable()}, tmp_path / "evil.ckpt")
    with pytest.raises(Exception, match="Weights only load failed"):
        io.load_checkpoint(tmp_path / "evil.ckpt", weights_only=False)


class _Unpicklable:
    pass


# ------------------------------------------------------------------------------------------ predict


def test_sigterm_stops_predict_after_the_batch_in_hand_and_the_rerun_finishes(tiny_paths, tmp_path, monkeypatch):
    import json

    from conftest import run_cli

    from comat_lightning.runtime.stop_signals import StoppedBySignal

    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("".join(f"a red cube number {i}\n" for i in range(6)))
    config = {
        "trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                    "callbacks": [{"class_path": "callbacks.ImageWriter", "init_args": {"output_dir": str(tmp_path / "out")}},
                                  {"class_path": "tests.support.signals.SignalAtBatch", "init_args": {"batch_index": 1}}]},
        "model": {"pretrained_model": tiny_paths["sd"], "sampler": {"resolution": 64, "num_inference_steps": 5}},
        "data": {"train_file": str(tmp_path / "prompts.txt"), "batch_size": 2},
    }  # fmt: skip
    path = tmp_path / "predict.yaml"
    path.write_text(yaml.safe_dump(config))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(StoppedBySignal) as stopped:
        run_cli(["predict", "--config", str(path), "--return_predictions", "false"])
    assert stopped.value.code == 143 and "prediction stopped after batch 1" in stopped.value.message
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
    manifest = tmp_path / "out" / "manifest.jsonl"
    done = [json.loads(line)["key"] for line in manifest.read_text().splitlines()]
    assert len(done) == 4  # batches 0 and 1 (the one in hand when the signal came), nothing of batch 2
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.png")}

    config["trainer"]["callbacks"].pop()  # the rerun is not signalled
    path.write_text(yaml.safe_dump(config))
    run_cli(["predict", "--config", str(path), "--return_predictions", "false"])
    assert len(manifest.read_text().splitlines()) == 6
    assert {n: t for n, t in ((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "out").glob("*.png")) if n in mtimes} == mtimes
