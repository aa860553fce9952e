"""One run, one folder: ``<save_dir>/<name>/version_N`` holds a run's TensorBoard events, config, checkpoints
(``checkpoints/``) and LoRA exports; a resumed run continues in its own folder; a start-up that fails leaves none.

The command line picks the version before anything is built (:func:`next_version` for a new run,
:func:`resume_version` for ``--ckpt_path last``) and writes it into the logger's and the checkpoint callback's
settings, so every rank and every callback agrees on the folder.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Optional

from lightning.pytorch import Callback

from comat_lightning.runtime.checkpoint_files import resume_path

VERSION = re.compile(r"version_(\d+)")


def versions(run_root: Path) -> list[int]:
    """The N of every ``version_N`` folder under ``run_root``, ascending."""
    if not run_root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in run_root.iterdir() if p.is_dir() and (m := VERSION.fullmatch(p.name)))


def next_version(run_root: Path) -> int:
    """The version a new run takes (TensorBoardLogger's rule: one past the highest)."""
    existing = versions(run_root)
    return existing[-1] + 1 if existing else 0


def resume_version(run_root: Path) -> tuple[Optional[int], Optional[Path]]:
    """(N, checkpoint) of the run whose newest loadable checkpoint is the newest of all versions; (None, None) if
    no version has one (``--ckpt_path last`` on a first run starts from scratch in a new version)."""
    folders = [run_root / f"version_{n}" / "checkpoints" for n in versions(run_root)]
    path = resume_path(folders)
    if path is None:
        return None, None
    return int(VERSION.fullmatch(path.parent.parent.name).group(1)), path


class DiscardFailedStart(Callback):
    """Remove the run folder if this process created it and the run failed before its first checkpoint: a failed
    start-up (a bad prompt file, a model that does not load) leaves no empty ``version_N`` behind."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.existed = self.run_dir.exists()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self.existed or not trainer.is_global_zero or not self.run_dir.is_dir():
            return
        if any(self.run_dir.glob("checkpoints/*.ckpt")):  # a run that got somewhere keeps its folder
            return
        shutil.rmtree(self.run_dir, ignore_errors=True)


__all__ = ["DiscardFailedStart", "next_version", "resume_version", "versions"]
