"""Atomic file writes: a file either holds its previous complete content or its new complete content, never a
partial one, even if the process dies mid-write."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

_DEFAULT_SUFFIX = ".tmp-{pid}"
_DEFAULT_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)$")  # what _DEFAULT_SUFFIX makes of any name


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, tmp_suffix: Optional[str] = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (``.<name><tmp_suffix>``, default ``.<name>.tmp-<pid>``) for the
    caller to write; on success it is fsynced and renamed over ``path`` (same folder, so ``os.replace`` is atomic),
    on failure removed. Files get the usual umask-based permissions."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{tmp_suffix if tmp_suffix is not None else _DEFAULT_SUFFIX.format(pid=os.getpid())}")
    try:
        yield tmp
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty folder next to ``path`` (``.<name>-<random>``) for the caller to fill; on success it
    takes the name ``path`` (a folder already there is removed first), on failure it is removed. A half-written
    folder is never visible under ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """The default-named temporary files (``.<name>.tmp-<pid>``) in ``folder`` whose writing process is gone:
    left by a process killed mid-write, safe to delete."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if (m := _DEFAULT_TEMPORARY.match(p.name)) and not _process_alive(int(m.group(1)))]


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def write_bytes_atomically(path: str | os.PathLike, data: bytes, tmp_suffix: Optional[str] = None) -> None:
    with atomic_write(path, tmp_suffix) as tmp:
        tmp.write_bytes(data)


__all__ = ["atomic_folder", "atomic_write", "stale_temporaries", "write_bytes_atomically"]
