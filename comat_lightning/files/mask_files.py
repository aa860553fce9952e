"""Masks as files and JSON: COCO run-length encodings (uncompressed and compressed), mask images, a record's mask field."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from comat_lightning.errors import InputError

# The largest mask accepted (8192 x 8192): a few bytes of RLE can describe any size, and decoding allocates it.
MAX_MASK_PIXELS = 8192 * 8192


def check_rle(rle: Any) -> tuple[int, int, list[int]]:
    """Check a COCO run-length encoding without decoding it; return (height, width, run lengths).

    ``rle = {"size": [h, w], "counts": counts}`` where counts is either a list of run lengths (uncompressed RLE)
    or COCO's compressed string. Raises :class:`InputError` saying what is wrong."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise InputError(f"an RLE must be a dict with 'size' and 'counts', got {_short(rle)}")
    size = rle["size"]
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 2
        or not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n > 0 for n in size)
    ):
        raise InputError(f"RLE 'size' must be [height, width] with positive integers, got {_short(size)}")
    height, width = int(size[0]), int(size[1])
    if height * width > MAX_MASK_PIXELS:
        raise InputError(f"RLE 'size' {height}x{width} is larger than the largest mask accepted ({MAX_MASK_PIXELS} pixels)")
    counts = rle["counts"]
    if isinstance(counts, str):
        runs = rle_string_to_counts(counts)
    elif isinstance(counts, (list, tuple)):
        if not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in counts):
            raise InputError(f"RLE 'counts' must be integers, got {_short(counts)}")
        runs = [int(n) for n in counts]
    else:
        raise InputError(f"RLE 'counts' must be a list of run lengths or a COCO string, got {type(counts).__name__}")
    if any(n < 0 for n in runs):
        raise InputError(f"RLE 'counts' has a negative run length: {_short(runs)}")
    if sum(runs) != height * width:
        raise InputError(f"RLE run lengths sum to {sum(runs)}, but 'size' {height}x{width} has {height * width} pixels")
    return height, width, runs


def rle_decode(rle: dict) -> np.ndarray:
    """Decode a COCO run-length encoding (checked by :func:`check_rle`) to a (h, w) bool array. Runs alternate
    0, 1, 0, ... starting with a (possibly empty) run of zeros and walk the mask in column-major (Fortran) order."""
    height, width, runs = check_rle(rle)
    values = np.arange(len(runs)) % 2 == 1  # odd runs are the mask
    flat = np.repeat(values, runs)
    return flat.reshape(width, height).T  # column-major: the flat order walks down each column first


def rle_encode(mask: Union[np.ndarray, torch.Tensor], compress: bool = False) -> dict:
    """Encode a (h, w) mask (nonzero = inside) as COCO RLE: ``{"size": [h, w], "counts": ...}`` with a list of
    run lengths, or COCO's compressed string when ``compress``. Inverse of :func:`rle_decode`."""
    mask = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask)
    if mask.ndim != 2:
        raise ValueError(f"rle_encode expects a (height, width) mask, got shape {mask.shape}")
    flat = (mask != 0).T.reshape(-1)  # column-major order
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs  # runs start with zeros
    size = [int(mask.shape[0]), int(mask.shape[1])]
    return {"size": size, "counts": rle_counts_to_string(runs) if compress else runs}


def rle_string_to_counts(text: str) -> list[int]:
    """Decode COCO's compressed RLE counts string into run lengths."""
    counts: list[int] = []
    pos = 0
    while pos < len(text):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(text):
                raise InputError(f"compressed RLE string ends in the middle of a number: {_short(text)}")
            group = ord(text[pos]) - 48
            if not 0 <= group < 64:
                raise InputError(f"compressed RLE string has an invalid character {text[pos]!r}: {_short(text)}")
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            pos += 1
            shift += 5
            if not more and group & 0x10:
                value -= 1 << shift  # sign-extend
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def rle_counts_to_string(counts: list[int]) -> str:
    """Encode run lengths as COCO's compressed RLE counts string."""
    chars: list[str] = []
    for i, count in enumerate(counts):
        value = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            group = value & 0x1F
            value >>= 5  # arithmetic shift: negative values end at -1
            more = not ((value == 0 and not group & 0x10) or (value == -1 and group & 0x10))
            chars.append(chr(group + (0x20 if more else 0) + 48))
    return "".join(chars)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_mask_image(path: Path) -> np.ndarray:
    """Read a mask image as a (h, w) bool array: a pixel is inside when any of its colour (or grey / palette
    index) channels is nonzero; an alpha channel is ignored."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        if image.mode in ("LA", "PA"):  # grey level / palette index, then alpha
            image = image.getchannel(0)
        elif image.mode in ("RGBA", "RGBa"):
            image = image.convert("RGB")
        array = np.asarray(image)
    return array != 0 if array.ndim == 2 else (array != 0).any(axis=-1)


def check_mask_entry(mask: Any, where: str) -> None:
    """One stored mask: an image path (not opened here) or a well-formed RLE dict."""
    if isinstance(mask, str):
        if not mask.strip():
            raise InputError(f"{where}: the mask path is empty")
    elif isinstance(mask, dict):
        try:
            check_rle(mask)
        except InputError as error:
            raise InputError(f"{where}: malformed RLE: {error}") from None
    else:
        raise InputError(f"{where}: a mask must be an image path or an RLE dict, got {type(mask).__name__}")


def phrase_map(given: Any, field: str, label: str) -> dict[str, Any]:
    """``{phrase: mask}`` keyed by the normalised phrase (stripped, lower case); entries are not checked."""
    head = f"{label}: " if label else ""
    if not isinstance(given, dict):
        raise InputError(f"{head}field {field!r} must map phrases to masks, got {type(given).__name__}")
    by_phrase: dict[str, Any] = {}
    for key, mask in given.items():
        phrase = str(key).strip().lower()
        if not phrase:
            raise InputError(f"{head}field {field!r} has an empty phrase")
        if phrase in by_phrase:
            raise InputError(f"{head}field {field!r} has phrase {phrase!r} twice")
        by_phrase[phrase] = mask
    return by_phrase


def check_mask_field(given: Any, field: str, label: str = "") -> dict[str, Any]:
    """Check a record's whole mask field (``{phrase: image path or RLE}``) without reading any file, as the prompt
    reader does for every record; returns it keyed by normalised phrase. Messages start with ``label``."""
    if given is None:
        return {}
    by_phrase = phrase_map(given, field, label)
    lead = f"{label}, " if label else ""
    for phrase, mask in by_phrase.items():
        check_mask_entry(mask, f"{lead}phrase {phrase!r} (field {field!r})")
    return by_phrase
