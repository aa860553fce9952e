"""Real-latent references in prompt records, for the Fidelity Preservation (adversarial) loss.

A JSONL record may carry ``"latent": {"file": "shard-00000.safetensors", "index": 3}``: row ``index`` of the
``"latents"`` tensor (n, 4, h, w) in a safetensors file, written by ``python -m comat_lightning.tools.real_latents``.
A relative ``file`` is relative to the folder of the JSONL that names it.

Files are read with safetensors' ``safe_open`` only (never pickle). :func:`check_latent_refs` reads one header per
file (no tensor data), so validating 20k references costs one header read per shard; items load their row lazily.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from comat_lightning.errors import InputError
from comat_lightning.files.paths import user_path

LATENTS_KEY = "latents"  # the tensor's name inside a shard
LATENT_CHANNELS = 4  # SD 1.x / 2.x / XL VAEs (the default when the model's VAE config cannot be read)
VAE_FACTOR = 8  # image px per latent px for those VAEs (likewise)
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


class LatentReferenceError(InputError):
    """A bad reference; ``position`` is its index in the list handed to :func:`check_latent_refs` (the caller
    turns it into a file and line)."""

    def __init__(self, position: int, message: str):
        super().__init__(message)
        self.position = position


@dataclass(frozen=True)
class LatentRef:
    file: Path  # absolute
    index: int

    def to_json(self) -> dict[str, Any]:
        return {"file": str(self.file), "index": self.index}


def parse_latent_ref(value: Any) -> tuple[str, int]:
    """``{"file": str, "index": int >= 0}`` -> (file, index). Raises InputError saying what was expected; no file
    is opened."""
    if not isinstance(value, dict) or set(value) - {"file", "index"}:
        raise InputError(f'expected {{"file": "<shard>.safetensors", "index": <int>}}, got {value!r}')
    file, index = value.get("file"), value.get("index")
    if not isinstance(file, str) or not file:
        raise InputError(f'"file" must be a non-empty path string, got {file!r}')
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:  # bool is an int subclass in Python
        raise InputError(f'"index" must be an integer >= 0, got {index!r}')
    return file, index


def resolve_latent_file(file: str, base: Path) -> Path:
    """``file`` as an absolute path; a relative one is relative to ``base`` (the folder of the JSONL naming it).
    Lexical only (no symlink lookups): 20k references cost no system calls."""
    path = user_path(file)
    return Path(os.path.normpath(path if path.is_absolute() else base.absolute() / path))


def expected_latent_shape(
    resolution: Optional[int], vae_factor: int = VAE_FACTOR, channels: int = LATENT_CHANNELS
) -> Optional[tuple[int, int, int]]:
    """Per-sample latent shape for an image resolution in px and a VAE's factor and latent channels (None: not
    checked against a resolution)."""
    if resolution is None:
        return None
    return (channels, resolution // vae_factor, resolution // vae_factor)


def _read_header(path: Path) -> tuple[str, list[int]]:
    """(dtype, shape) of the latents tensor in ``path``; headers only. Raises InputError naming the problem."""
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        raise InputError(f"latent file {path} does not exist")
    if not path.is_file():
        raise InputError(f"latent file {path} is not a file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            if LATENTS_KEY not in handle.keys():
                raise InputError(f'latent file {path} has no "{LATENTS_KEY}" tensor (tensors: {sorted(handle.keys())})')
            latents = handle.get_slice(LATENTS_KEY)
            return latents.get_dtype(), list(latents.get_shape())
    except SafetensorError as err:  # truncated, not safetensors at all (e.g. a torch.save pickle), bad header
        raise InputError(f"latent file {path} is not a readable safetensors file ({err})") from None
    except OSError as err:
        raise InputError(f"latent file {path} cannot be read ({err.strerror or err})") from None


def check_latent_refs(
    refs: Sequence[LatentRef], expected: Optional[tuple[int, int, int]] = None, resolution: Optional[int] = None
) -> tuple[int, ...]:
    """Check every reference against its file's header; return the common per-sample shape.

    Each file is opened once. Without ``expected`` every file must still hold (n, 4, h, w) float tensors of one
    common (h, w), since a batch stacks them. Raises :class:`LatentReferenceError` for the first bad reference."""
    headers: dict[str, tuple[str, list[int]]] = {}  # by str: cheaper to hash than Path, 20k times
    common: Optional[tuple[tuple[int, ...], int]] = None  # (shape, position of the reference that set it)
    for position, ref in enumerate(refs):
        key = str(ref.file)
        if key not in headers:
            try:
                headers[key] = _read_header(ref.file)
            except InputError as err:
                raise LatentReferenceError(position, str(err)) from None
            dtype, shape = headers[key]
            sample = tuple(shape[1:])
            if dtype not in _FLOAT_DTYPES:
                raise LatentReferenceError(position, f'latent file {ref.file}: "{LATENTS_KEY}" is {dtype}, expected a float tensor')
            channels = expected[0] if expected is not None else LATENT_CHANNELS
            if len(shape) != 4 or shape[1] != channels:
                raise LatentReferenceError(
                    position, f'latent file {ref.file}: "{LATENTS_KEY}" has shape {tuple(shape)}, expected (n, {channels}, h, w)'
                )
            if expected is not None and sample != tuple(expected):
                raise LatentReferenceError(
                    position,
                    f"latent file {ref.file}: latents are {sample}, expected {tuple(expected)} for data.latent_resolution="
                    f"{resolution} (latents must come from the model and resolution being trained)",
                )
            if common is None:
                common = (sample, position)
            elif sample != common[0]:
                raise LatentReferenceError(
                    position,
                    f"latent file {ref.file}: latents are {sample} but an earlier reference's are {common[0]}; "
                    "one batch stacks them, so all must share one shape (set data.latent_resolution to say which)",
                )
        count = headers[key][1][0]
        if ref.index >= count:
            raise LatentReferenceError(position, f"latent index {ref.index} is out of range: {ref.file} holds {count} latents")
    return common[0] if common is not None else ()


def load_latent(ref: LatentRef) -> torch.Tensor:
    """One latent (4, h, w) as float32, read lazily (only this row's bytes)."""
    from safetensors import safe_open

    with safe_open(str(ref.file), framework="pt") as handle:
        return handle.get_slice(LATENTS_KEY)[ref.index].to(torch.float32)
