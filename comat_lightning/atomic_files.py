"""Atomic file writes: a file either holds its previous complete content or its new complete content, never a
partial one, even if the process dies mid-write."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Optional


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, tmp_suffix: Optional[str] = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (``.<name><tmp_suffix>``, default ``.<name>.tmp-<pid>``) for the
    caller to write; on success it is fsynced and renamed over ``path`` (same folder, so ``os.replace`` is atomic),
    on failure removed. Files get the usual umask-based permissions."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{tmp_suffix if tmp_suffix is not None else f'.tmp-{os.getpid()}'}")
    try:
        yield tmp
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomically(path: str | os.PathLike, data: bytes, tmp_suffix: Optional[str] = None) -> None:
    with atomic_write(path, tmp_suffix) as tmp:
        tmp.write_bytes(data)


__all__ = ["atomic_write", "write_bytes_atomically"]
