"""Finding the checkpoint to resume from, and keeping the checkpoint folder clean.

Checkpoints are written atomically (:class:`comat_lightning.runtime.checkpoint_state.AtomicCheckpointIO`), so a kill never
leaves a partial file under a checkpoint's name. A file can still be unreadable (a full disk, a copy cut short, a
bad sector), and ``--ckpt_path last`` must then not fail the resume or, worse, start over: :func:`resume_path`
takes the newest checkpoint that loads, with a warning for each one it passes over.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, Optional

from comat_lightning.files.atomic import stale_temporaries

LAST_NAME = "last.ckpt"  # Lightning's ModelCheckpoint.CHECKPOINT_NAME_LAST + FILE_EXTENSION


def checkpoint_folders(trainer) -> list[Path]:
    """The folders of the trainer's ModelCheckpoint callbacks (resolved as Lightning resolves them, so this works
    before ``fit`` has set them up)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    folders = []
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint):
            continue
        folder = callback.dirpath
        if folder is None:
            folder = callback._ModelCheckpoint__resolve_ckpt_dir(trainer)  # what Lightning's "last" lookup uses
        if "://" not in str(folder) and Path(folder) not in folders:
            folders.append(Path(folder))
    return folders


def stop_checkpoint_path(trainer) -> Path:
    """Where a run that stops early (signal, too many non-finite steps) writes its checkpoint: ``last.ckpt`` in the
    first checkpoint folder, which ``--ckpt_path last`` finds; without a ModelCheckpoint, the trainer's root."""
    folders = checkpoint_folders(trainer)
    return (folders[0] if folders else Path(trainer.default_root_dir)) / LAST_NAME


def unreadable_reason(path: Path) -> Optional[str]:
    """None if ``path`` is a Lightning checkpoint that loads (safely: ``weights_only``; memory-mapped, so only the
    archive's index is read), else why not."""
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any failure to load means "not usable", reported with its cause
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'unreadable'}"
    if not isinstance(checkpoint, dict) or "pytorch-lightning_version" not in checkpoint:
        return "not a Lightning checkpoint"
    return None


def resume_path(folders: Iterable[Path]) -> Optional[Path]:
    """The newest ``*.ckpt`` in ``folders`` that loads; every newer one that does not is named in a warning.
    None if there is none (a first run: training starts from scratch)."""
    candidates = [p for folder in folders if folder.is_dir() for p in folder.glob("*.ckpt") if p.is_file()]
    # Newest first; at equal times `last.ckpt` first (it is written right after the step checkpoint it copies).
    candidates.sort(key=lambda p: (p.stat().st_mtime_ns, p.name == LAST_NAME), reverse=True)
    for path in candidates:
        reason = unreadable_reason(path)
        if reason is None:
            return path
        warnings.warn(f"checkpoint {path} cannot be loaded ({reason}); trying the previous one", stacklevel=2)
    return None


def checkpoint_values(folders: Iterable[Path], key: str) -> set[int]:
    """The integer values of ``key`` in every readable checkpoint in ``folders`` (read memory-mapped: only the index and
    the small entries are loaded)."""
    import torch

    steps = set()
    for path in (p for folder in folders if folder.is_dir() for p in folder.glob("*.ckpt")):
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - an unreadable checkpoint keeps no export alive
            continue
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), int):
            steps.add(checkpoint[key])
    return steps


def remove_stale_temporaries(folders: Iterable[Path]) -> list[Path]:
    """Delete the temporary files of checkpoint writes whose process is gone (killed mid-write); return them."""
    removed = [path for folder in folders for path in stale_temporaries(folder)]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


__all__ = ["checkpoint_folders", "checkpoint_values", "remove_stale_temporaries", "resume_path", "stop_checkpoint_path", "unreadable_reason"]
