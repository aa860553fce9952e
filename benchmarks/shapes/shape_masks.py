"""The shapes world's detector + segmenter for attribute concentration: what GroundingDINO + SAM are to CoMat on
real images. Each generated image is segmented by the judge's palette segmentation (``judge.segment_objects``);
a phrase ("circle", or "red circle") gets the pixels of the largest recognised object of that shape (and colour,
if the phrase names one), or None when there is none: the object was looked for and not found, as a detector
missing it (``missing_means_absent``), so the faithful ``missed_entities: zero_mask`` applies.

    masks:
      class_path: benchmarks.shapes.shape_masks.ShapeMasks
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from judge import segment_objects  # noqa: E402
from world import COLOURS, IMAGE_SIZE, SHAPES  # noqa: E402

from comat_lightning.judges.masks import MaskProvider, Masks  # noqa: E402


class ShapeMasks(MaskProvider):
    needs_images = True
    missing_means_absent = True

    def forward(self, images: Optional[torch.Tensor], phrases: list[list[str]], records: list[dict]) -> Masks:
        if images is None:
            raise ValueError("ShapeMasks needs the generated images (got images=None)")
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        masks: Masks = []
        for image, sample_phrases in zip(pixels, phrases):
            found, _, _ = segment_objects(image)
            masks.append([self._mask(found, phrase, images.device) for phrase in sample_phrases])
        return masks

    @staticmethod
    def _mask(found: list[tuple], phrase: str, device) -> Optional[torch.Tensor]:
        words = phrase.lower().split()
        shape = words[-1] if words and words[-1] in SHAPES else None
        colour = next((w for w in words if w in COLOURS), None)
        for found_colour, found_shape, _, _, coordinates in found:  # largest first: the detector's best box
            if found_shape == shape and colour in (None, found_colour):
                mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
                mask[coordinates[:, 0], coordinates[:, 1]] = 1.0
                return torch.from_numpy(mask).to(device)
        return None
