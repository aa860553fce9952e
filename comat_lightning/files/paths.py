"""Paths in options: user paths (~ expanded), local path or hub id, and the check that a local one exists."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from comat_lightning.errors import InputError, MissingInputFile
from comat_lightning.tiny.zoo import SHAPES_SCHEME, TINY_SCHEME, short_name_error

_PATH_PREFIXES = ("./", "../", "/", "~", ".\\", "..\\")


def user_path(text: str) -> Path:
    """``text`` as a Path with ``~`` expanded; ``~unknown_user`` stays as written (pathlib would raise)."""
    return Path(os.path.expanduser(text))


def looks_local(path: str) -> bool:
    """Whether a model option names a local path rather than a hub id: it starts like a path (./, ../, /, ~) or
    its parent folder exists ("models/sd15" next to a "models" folder). A hub id "owner/name" has no local
    "owner" folder; a bare name ("gpt2") is a hub id unless it exists."""
    if path.startswith(TINY_SCHEME) or "://" in path:
        return False
    if path in (".", "..") or path.startswith(_PATH_PREFIXES):
        return True
    return len(Path(path).parts) > 1 and user_path(path).parent.is_dir()


def check_local_path(option: str, value: Optional[str], what: str = "file or folder") -> None:
    """Refuse a path option whose local file or folder does not exist, and an unknown ``tiny://`` model."""
    if value is None:
        return
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{option}={value!r}: expected a path or a hub id (owner/name)")
    if value.startswith((TINY_SCHEME, SHAPES_SCHEME)):
        problem = short_name_error(value)
        if problem:
            raise InputError(f"{option}={value!r}: {problem}")
        return
    if looks_local(value) and not user_path(value).exists():
        raise MissingInputFile(
            f"{option}={value!r}: no such {what} ({user_path(value).absolute()} does not exist); a hub id is written owner/name"
        )
