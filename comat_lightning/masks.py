"""Where the Attribute Concentration loss gets each entity's mask: one small interface, two providers.

- :class:`MaskProvider`: image batch + entity phrases -> one mask per entity, or ``None`` when it is not found.
- :class:`JsonlMasks`: masks given with the data (image files or COCO-style RLE in the JSONL records).
- :class:`comat_lightning.grounded_sam.GroundedSAMMasks`: open-vocabulary detection + segmentation of the
  generated images (GroundingDINO boxes prompting SAM), as CoMat does.

Also here: decoders (and encoders, for preparing data) of COCO run-length encoding, uncompressed and compressed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

Masks = list[list[Optional[torch.Tensor]]]


class MaskProvider(nn.Module):
    """Image batch + entity phrases -> one mask per entity, or None when the entity is not found.

    ``forward(images, phrases, records)``:
      - images: (B, 3, H, W) float, nominally [0, 1] but not clamped; may be None when ``needs_images`` is False;
      - phrases[b]: the lower-case noun phrases of sample b's entities, e.g. ["cat", "teddy bear"];
      - records[b]: the datamodule's record of sample b (a dict with "prompt" and any JSONL fields);
      - returns masks[b][i]: a float32 (H', W') tensor with values in [0, 1] on the images' device (the loss
        resizes it to each attention map), or None = not found (the loss skips that entity).

    Providers are frozen tools: they run under ``torch.no_grad()``, their parameters never require grad and they
    stay in eval mode even when Lightning calls ``module.train()`` on the LightningModule that holds them.
    """

    needs_images: bool = True  # False for providers that read masks from the data

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


def rle_decode(rle: dict) -> np.ndarray:
    """Decode a COCO run-length encoding to a (h, w) bool array.

    ``rle = {"size": [h, w], "counts": counts}`` where counts is either a list of run lengths (uncompressed RLE)
    or COCO's compressed string. Runs alternate 0, 1, 0, ... starting with a (possibly empty) run of zeros and
    walk the mask in column-major (Fortran) order. Raises ValueError describing what is wrong."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError(f"an RLE must be a dict with 'size' and 'counts', got {_short(rle)}")
    size = rle["size"]
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 2
        or not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n > 0 for n in size)
    ):
        raise ValueError(f"RLE 'size' must be [height, width] with positive integers, got {_short(size)}")
    height, width = int(size[0]), int(size[1])
    counts = rle["counts"]
    if isinstance(counts, str):
        runs = rle_string_to_counts(counts)
    elif isinstance(counts, (list, tuple)):
        if not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in counts):
            raise ValueError(f"RLE 'counts' must be integers, got {_short(counts)}")
        runs = [int(n) for n in counts]
    else:
        raise ValueError(f"RLE 'counts' must be a list of run lengths or a COCO string, got {type(counts).__name__}")
    if any(n < 0 for n in runs):
        raise ValueError(f"RLE 'counts' has a negative run length: {_short(runs)}")
    if sum(runs) != height * width:
        raise ValueError(f"RLE run lengths sum to {sum(runs)}, but 'size' {height}x{width} has {height * width} pixels")
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
                raise ValueError(f"compressed RLE string ends in the middle of a number: {_short(text)}")
            group = ord(text[pos]) - 48
            if not 0 <= group < 64:
                raise ValueError(f"compressed RLE string has an invalid character {text[pos]!r}: {_short(text)}")
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


class JsonlMasks(MaskProvider):
    """Masks given with the data: ``record[field]`` is a dict ``{phrase: mask}``, each mask either a path to an
    image file (relative paths are resolved against ``root``, default the current directory; nonzero = inside) or
    a COCO-style RLE dict ``{"size": [h, w], "counts": [...] or "<compressed>"}``.

    A phrase missing from the dict (or a record without the field) gives None. A missing file or a malformed mask
    raises ValueError naming the record's prompt, the phrase and the problem. Masks come back at their stored
    resolution (the loss resizes them to each attention map)."""

    needs_images = False

    def __init__(self, field: str = "masks", root: Optional[str] = None) -> None:
        super().__init__()
        if not isinstance(field, str) or not field:
            raise ValueError(f"JsonlMasks: 'field' must be a non-empty string, got {field!r}")
        self.field = field
        self.root = Path(root) if root is not None else None

    def extra_repr(self) -> str:
        return f"field={self.field!r}, root={str(self.root) if self.root else None!r}"

    @torch.no_grad()
    def forward(self, images: Optional[torch.Tensor], phrases: list[list[str]], records: list[dict]) -> Masks:
        if len(phrases) != len(records):
            raise ValueError(f"JsonlMasks: got {len(phrases)} phrase lists for {len(records)} records")
        device = images.device if images is not None else self.device
        masks: Masks = []
        for sample_phrases, record in zip(phrases, records):
            stored = self._masks_of(record)
            masks.append(
                [self._decode(record, phrase, stored.get(phrase.strip().lower()), device) for phrase in sample_phrases]
            )
        return masks

    def _masks_of(self, record: dict) -> dict[str, Any]:
        given = record.get(self.field)
        if given is None:
            return {}
        if not isinstance(given, dict):
            raise ValueError(
                f"record {_record_name(record)}: field {self.field!r} must map phrases to masks, "
                f"got {type(given).__name__}"
            )
        by_phrase: dict[str, Any] = {}
        for key, mask in given.items():
            phrase = str(key).strip().lower()
            if phrase in by_phrase:
                raise ValueError(f"record {_record_name(record)}: field {self.field!r} has phrase {phrase!r} twice")
            by_phrase[phrase] = mask
        return by_phrase

    def _decode(self, record: dict, phrase: str, stored: Any, device: torch.device) -> Optional[torch.Tensor]:
        if stored is None:
            return None
        where = f"record {_record_name(record)}, phrase {phrase!r} (field {self.field!r})"
        if isinstance(stored, str):
            path = Path(stored).expanduser()
            if not path.is_absolute():
                path = (self.root if self.root is not None else Path.cwd()) / path
            if not path.is_file():
                raise ValueError(f"{where}: mask file {str(path)!r} does not exist")
            try:
                mask = read_mask_image(path)
            except Exception as error:  # PIL raises several types for unreadable files
                raise ValueError(f"{where}: cannot read mask file {str(path)!r}: {error}") from error
        elif isinstance(stored, dict):
            try:
                mask = rle_decode(stored)
            except ValueError as error:
                raise ValueError(f"{where}: malformed RLE: {error}") from error
        else:
            raise ValueError(f"{where}: a mask must be an image path or an RLE dict, got {type(stored).__name__}")
        return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32)).to(device)
