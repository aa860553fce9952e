"""One run, one folder: a new run takes the next version, ``--ckpt_path last`` the version of the newest loadable
checkpoint; checkpoints go inside the version; a failed start-up leaves no folder; LoRA exports follow checkpoint
retention."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from conftest import REPO
from jsonargparse import Namespace

from comat_lightning.cli import name_runs_after_config
from comat_lightning.runtime.run_folders import next_version, resume_version


def fake_checkpoint(path: Path, **entries) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"pytorch-lightning_version": "2.6.6", "state_dict": {}, **entries}, path)
    return path


def config_for(save_dir: Path, version=None) -> Namespace:
    logger = Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger",
                       init_args=Namespace(save_dir=str(save_dir), name=None, version=version))  # fmt: skip
    checkpoint = Namespace(class_path="lightning.pytorch.callbacks.ModelCheckpoint", init_args=Namespace(dirpath=None))
    return Namespace(config=[Path("configs/tiny_demo.yaml")], trainer=Namespace(logger=logger, callbacks=[checkpoint]))


def test_new_runs_take_the_next_version_and_keep_their_checkpoints_inside_it(tmp_path):
    config = config_for(tmp_path)
    assert name_runs_after_config(config) is None
    assert config.trainer.logger.init_args.name == "tiny_demo" and config.trainer.logger.init_args.version == 0
    assert config.trainer.callbacks[0].init_args.dirpath == str(tmp_path / "tiny_demo" / "version_0" / "checkpoints")
    (tmp_path / "tiny_demo" / "version_0").mkdir(parents=True)
    (tmp_path / "tiny_demo" / "version_3").mkdir()
    again = config_for(tmp_path)
    name_runs_after_config(again)
    assert again.trainer.logger.init_args.version == 4 == next_version(tmp_path / "tiny_demo")


def test_resume_takes_the_version_of_the_newest_loadable_checkpoint(tmp_path):
    run_root = tmp_path / "tiny_demo"
    fake_checkpoint(run_root / "version_0" / "checkpoints" / "last.ckpt")
    newer = fake_checkpoint(run_root / "version_1" / "checkpoints" / "last.ckpt")
    (run_root / "version_2").mkdir()  # a later run that wrote no checkpoint
    assert resume_version(run_root) == (1, newer)
    config = config_for(tmp_path)
    assert name_runs_after_config(config, resume=True) == newer
    assert config.trainer.logger.init_args.version == 1
    assert config.trainer.callbacks[0].init_args.dirpath == str(run_root / "version_1" / "checkpoints")
    assert resume_version(tmp_path / "other") == (None, None)


def test_a_failed_start_writes_no_run_folder(tmp_path, monkeypatch, capsys):
    from comat_lightning.cli import command_line

    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(REPO / "configs" / "tiny_demo.yaml"), f"--data.train_file={tmp_path / 'missing.jsonl'}",
            f"--data.val_file={REPO / 'data' / 'demo_val_prompts.jsonl'}", "--trainer.max_steps=1"]  # fmt: skip
    with mock.patch.object(sys, "argv", ["train.py"]), pytest.raises(SystemExit):
        command_line(args)
    assert "does not exist" in capsys.readouterr().err
    assert not list((tmp_path / "runs" / "tiny_demo").glob("version_*"))  # no empty version_0 left behind


def test_lora_exports_follow_checkpoint_retention(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from callbacks.lora_export import EXPORTED_STEP, ExportLoRA

    checkpoints = tmp_path / "checkpoints"
    fake_checkpoint(checkpoints / "step=20.ckpt", **{EXPORTED_STEP: 20})
    fake_checkpoint(checkpoints / "last.ckpt", **{EXPORTED_STEP: 30})
    for step in (10, 20, 30, 40):
        (tmp_path / "lora_checkpoints" / f"step_{step}").mkdir(parents=True)
    trainer = SimpleNamespace(is_global_zero=True, log_dir=str(tmp_path), default_root_dir=str(tmp_path),
                              checkpoint_callbacks=[ModelCheckpoint(dirpath=checkpoints)])  # fmt: skip
    ExportLoRA()._prune(trainer, keep={40})  # 40: the export being written now
    assert sorted(p.name for p in (tmp_path / "lora_checkpoints").iterdir()) == ["step_20", "step_30", "step_40"]
