"""Where the Attribute Concentration loss gets each entity's mask: one small interface, two providers.

- :class:`MaskProvider`: image batch + entity phrases -> one mask per entity, or ``None`` when it is not found.
- :class:`JsonlMasks`: masks given with the data (image files or COCO-style RLE in the JSONL records).
- :class:`comat_lightning.GroundedSAMMasks`: open-vocabulary detection + segmentation of the
  generated images (GroundingDINO boxes prompting SAM), as CoMat does.

Also here: decoders (and encoders, for preparing data) of COCO run-length encoding, uncompressed and compressed."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from comat_lightning.errors import InputError, MissingInputFile
from comat_lightning.files.mask_files import check_mask_entry, check_mask_field, phrase_map, read_mask_image, rle_decode
from comat_lightning.files.paths import user_path
from comat_lightning.files.record_fields import PROMPT

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
    return repr(record.get(PROMPT, "<record without a prompt>"))


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
            stored = {} if given is None else phrase_map(given, self.field, f"record {_record_name(record)}")
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
        check_mask_entry(stored, where)
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
