"""Where the Attribute Concentration loss gets each entity's mask: one small interface, two providers.

- :class:`MaskProvider`: image batch + entity phrases -> one mask per entity, or ``None`` when it is not found.
- :class:`JsonlMasks`: masks given with the data (image files or COCO-style RLE in the JSONL records).
- :class:`comat_lightning.grounded_sam.GroundedSAMMasks`: open-vocabulary detection + segmentation of the
  generated images (GroundingDINO boxes prompting SAM), as CoMat does.

Also here: decoders (and encoders, for preparing data) of COCO run-length encoding, uncompressed and compressed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import nn

from comat_lightning.errors import InputError, MissingInputFile
from comat_lightning.input_checks import user_path

Masks = list[list[Optional[torch.Tensor]]]


class MaskProvider(nn.Module):
    """Image batch + entity phrases -> one mask per entity, or None when the entity is not found.

    ``forward(images, phrases, records)``:
      - images: (B, 3, H, W) float, nominally [0, 1] but not clamped; may be None when ``needs_images`` is False;
      - phrases[b]: the lower-case noun phrases of sample b's entities, e.g. ["cat", "teddy bear"];
      - records[b]: the datamodule's record of sample b (a dict with "prompt" and any JSONL fields);
      - returns masks[b][i]: a float32 (H', W') tensor with values in [0, 1] on the images' device (the loss
        resizes it to each attention map), or None = no mask. What None means is the provider's
        ``missing_means_absent``: True for a detector (the object was looked for in the image and not found; the
        official CoMat code then trains towards an all-zero mask), False for masks given with the data (none was
        given: there is nothing to train towards).

    Providers are frozen tools: they run under ``torch.no_grad()``, their parameters never require grad and they
    stay in eval mode even when Lightning calls ``module.train()`` on the LightningModule that holds them.
    """

    needs_images: bool = True  # False for providers that read masks from the data
    missing_means_absent: bool = True  # a None mask: the object was not found in the image (False: no mask given)

    def __init__(self) -> None:
        super().__init__()
        # Tracks the device the provider was moved to, for providers without parameters of their own.
        self.register_buffer("_device_anchor", torch.zeros(0), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._device_anchor.device

    def load(self) -> "MaskProvider":
        """Load the provider's models (idempotent). Called when the training module loads its own models, so
        that parsing a config never downloads or loads weights; providers also load on first use."""
        return self

    def train(self, mode: bool = True) -> "MaskProvider":
        # Always eval: dropout / batch-norm updates in a detector would make masks random and change its weights.
        return super().train(False)

    def forward(self, images: Optional[torch.Tensor], phrases: list[list[str]], records: list[dict]) -> Masks:
        raise NotImplementedError


def _record_name(record: dict) -> str:
    return repr(record.get("prompt", "<record without a prompt>"))


# ------------------------------------------------------------------------------------------------------- RLE


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


# COCO's compressed counts: each run length (from the fourth on, as the difference to the run two before it) is
# written as a little-endian sequence of 5-bit groups, one character each (value + 48); bit 0x20 says "another
# group follows" and bit 0x10 of the last group is the sign (two's complement).


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


# ------------------------------------------------------------------------------------------------ image files


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


# ------------------------------------------------------------------------------------------------ JsonlMasks


def _check_mask_entry(mask: Any, where: str) -> None:
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


def _phrase_map(given: Any, field: str, label: str) -> dict[str, Any]:
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
    by_phrase = _phrase_map(given, field, label)
    lead = f"{label}, " if label else ""
    for phrase, mask in by_phrase.items():
        _check_mask_entry(mask, f"{lead}phrase {phrase!r} (field {field!r})")
    return by_phrase


class JsonlMasks(MaskProvider):
    """Masks given with the data: ``record[field]`` is a dict ``{phrase: mask}``, each mask either a path to an
    image file (relative paths are resolved against ``root``, default the current directory; nonzero = inside) or
    a COCO-style RLE dict ``{"size": [h, w], "counts": [...] or "<compressed>"}``.

    A phrase missing from the dict (or a record without the field) gives None. A missing file or a malformed mask
    raises :class:`InputError` naming the record's prompt, the phrase and the problem; :meth:`check_records` finds
    all of them up front (before any model loads). Masks come back at their stored resolution (the loss resizes
    them to each attention map)."""

    needs_images = False
    missing_means_absent = False  # a phrase without a mask in the record was simply not given one

    def __init__(self, field: str = "masks", root: Optional[str] = None) -> None:
        super().__init__()
        if not isinstance(field, str) or not field:
            raise InputError(f"JsonlMasks.field: must be a non-empty string, got {field!r}")
        if root is not None and not user_path(root).is_dir():
            raise MissingInputFile(f"JsonlMasks.root={root!r}: no such folder (mask paths are resolved against it)")
        self.field = field
        self.root = user_path(root) if root is not None else None

    def extra_repr(self) -> str:
        return f"field={self.field!r}, root={str(self.root) if self.root else None!r}"

    def check_records(self, records: list[dict], locate: Callable[[dict], Optional[str]] = lambda record: None) -> None:
        """Check every record's masks: structure, RLE and that each image file exists (none is read). ``locate``
        gives a record's "file:line" for the message, when known."""
        for record in records:
            label = locate(record) or f"record {_record_name(record)}"
            for phrase, mask in check_mask_field(record.get(self.field), self.field, label).items():
                if isinstance(mask, str) and not self._path(mask).is_file():
                    raise MissingInputFile(f"{label}, phrase {phrase!r} (field {self.field!r}): mask file {str(self._path(mask))!r} does not exist")

    @torch.no_grad()
    def forward(self, images: Optional[torch.Tensor], phrases: list[list[str]], records: list[dict]) -> Masks:
        if len(phrases) != len(records):
            raise ValueError(f"JsonlMasks: got {len(phrases)} phrase lists for {len(records)} records")  # a caller's bug
        device = images.device if images is not None else self.device
        masks: Masks = []
        for sample_phrases, record in zip(phrases, records):
            given = record.get(self.field)
            stored = {} if given is None else _phrase_map(given, self.field, f"record {_record_name(record)}")
            masks.append(
                [self._decode(record, phrase, stored.get(phrase.strip().lower()), device) for phrase in sample_phrases]
            )
        return masks

    def _path(self, stored: str) -> Path:
        path = user_path(stored)
        return path if path.is_absolute() else (self.root if self.root is not None else Path.cwd()) / path

    def _decode(self, record: dict, phrase: str, stored: Any, device: torch.device) -> Optional[torch.Tensor]:
        if stored is None:
            return None
        where = f"record {_record_name(record)}, phrase {phrase!r} (field {self.field!r})"
        _check_mask_entry(stored, where)
        if isinstance(stored, str):
            path = self._path(stored)
            if not path.is_file():
                raise MissingInputFile(f"{where}: mask file {str(path)!r} does not exist")
            try:
                mask = read_mask_image(path)
            except Exception as error:  # PIL raises several types for unreadable files
                raise InputError(f"{where}: cannot read mask file {str(path)!r}: {error}") from error
        else:
            mask = rle_decode(stored)
        return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32)).to(device)
