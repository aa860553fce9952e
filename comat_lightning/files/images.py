"""Image grids for TensorBoard monitoring: cross-attention heat maps and side-by-side samples.

Every function takes and returns float tensors in [0, 1], channels first ``(3, H, W)``, on the CPU.
Labels are drawn with PIL's default font, which works with and without FreeType support.

Layouts (``L = LABEL_HEIGHT = 16``):

``label_strip(labels, width, height=L)`` -> ``(3, height, len(labels) * width)``
    White text on black, label ``i`` in the cell ``[i * width, (i + 1) * width)``, left-aligned with
    2 px padding, cut short with "..." when it does not fit its cell.

``attention_grid(image, maps, words, tile)`` -> ``(3, L + tile, (C + 1) * tile)`` with ``C = len(words)``
    One prompt per grid. Top: label strip ``["image", *words]``. Below: column 0 is the image resized to
    ``tile x tile``; column ``1 + c`` is ``maps[c]`` (min-max normalised, upsampled, "hot" coloured)
    blended over that resized image.

``sample_grid(rows, column_labels, row_labels, tile)`` -> ``(3, L + R * tile, P * tile)``
    ``rows`` holds ``R`` batches of ``P`` images each (for example base and fine-tuned samples for the
    same prompts and seeds). Top: label strip of the ``P`` column labels. Row ``r`` occupies the pixel rows
    ``[L + r * tile, L + (r + 1) * tile)``; image ``p`` of it the columns ``[p * tile, (p + 1) * tile)``.
    Each row's label sits on a small black box in the top-left corner of its first tile.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

LABEL_HEIGHT = 16
_PAD = 2
_ELLIPSIS = "..."  # ASCII: the bitmap fallback font of Pillow builds without FreeType has no "…" glyph


def heat_colors(values: Tensor) -> Tensor:
    """(H, W) values in [0, 1] -> (3, H, W) "hot" colours: black -> red -> yellow -> white.

    Red, then green, then blue ramp up over successive thirds, so each channel is non-decreasing and
    luminance rises strictly with the value: the brightest pixel is the most attended one.
    """
    v = values.float().clamp(0, 1) * 3
    return torch.stack([v.clamp(0, 1), (v - 1).clamp(0, 1), (v - 2).clamp(0, 1)])


def normalize_maps(maps: Tensor) -> Tensor:
    """(C, r, r) -> each map min-max normalised to [0, 1] on its own; a constant map becomes zeros."""
    flat = maps.float().flatten(1)
    low = flat.amin(dim=1, keepdim=True)
    span = flat.amax(dim=1, keepdim=True) - low
    # A constant map carries no "where": dividing by a clamped span keeps it at 0 instead of NaN.
    normed = (flat - low) / span.clamp_min(torch.finfo(flat.dtype).tiny)
    return torch.where(span > 0, normed, torch.zeros_like(normed)).view(maps.shape)


def overlay_heatmap(image: Tensor, heat: Tensor, alpha: float = 0.6) -> Tensor:
    """Blend ``heat`` (r, r) in [0, 1], upsampled bilinearly to the image size, over ``image`` (3, H, W)."""
    height, width = image.shape[-2:]
    upsampled = F.interpolate(heat.float()[None, None], size=(height, width), mode="bilinear", align_corners=False)
    colours = heat_colors(upsampled[0, 0])
    return ((1 - alpha) * image.float() + alpha * colours).clamp(0, 1)


def _text_width(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> float:
    return draw.textlength(text, font=font) if hasattr(draw, "textlength") else draw.textsize(text, font=font)[0]


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, room: float) -> str:
    """Longest prefix of ``text`` (plus an ellipsis when cut) that fits in ``room`` pixels."""
    if _text_width(draw, text, font) <= room:
        return text
    for end in range(len(text) - 1, -1, -1):
        candidate = text[:end] + _ELLIPSIS
        if _text_width(draw, candidate, font) <= room:
            return candidate
    return ""


def _to_tensor(picture: Image.Image) -> Tensor:
    return torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255


def _text_cell(text: str, width: int, height: int) -> Tensor:
    """One black ``(3, height, width)`` cell with ``text`` in white, left-aligned and vertically centred."""
    picture = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    text = _fit(draw, text, font, width - 2 * _PAD)
    if text:
        # The ink box's top is not at y=0 for most fonts, so centre on the measured box, not on the origin.
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        draw.text((_PAD - left, (height - (bottom - top)) // 2 - top), text, fill=(255, 255, 255), font=font)
    return _to_tensor(picture)


def label_strip(labels: Sequence[str], width: int, height: int = LABEL_HEIGHT) -> Tensor:
    """(3, height, len(labels) * width): one label per ``width``-px cell, white on black."""
    if not labels:
        return torch.zeros(3, height, 0)
    # Each label is drawn in its own cell image, so a long one can never spill into its neighbour.
    return torch.cat([_text_cell(str(label), width, height) for label in labels], dim=2)


def _resize(image: Tensor, tile: int) -> Tensor:
    resized = F.interpolate(image.float()[None], size=(tile, tile), mode="bilinear", align_corners=False, antialias=True)
    return resized[0].clamp(0, 1)


def attention_grid(image: Tensor, maps: Tensor, words: Sequence[str], tile: int = 128) -> Tensor:
    """(3, LABEL_HEIGHT + tile, (C + 1) * tile): the image, then one heat-map overlay per word."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    if maps.ndim != 3:
        raise ValueError(f"maps must be (C, r, r), got {tuple(maps.shape)}")
    if maps.shape[0] != len(words):
        raise ValueError(f"{maps.shape[0]} attention maps for {len(words)} words")
    base = _resize(image, tile)
    tiles = [base] + [overlay_heatmap(base, heat) for heat in normalize_maps(maps)]
    body = torch.cat(tiles, dim=2)
    return torch.cat([label_strip(["image", *words], tile), body], dim=1)


def sample_grid(rows: Sequence[Tensor], column_labels: Sequence[str], row_labels: Sequence[str], tile: int = 128) -> Tensor:
    """(3, LABEL_HEIGHT + len(rows) * tile, P * tile): prompts on top, one row of tiles per image batch."""
    if not rows:
        raise ValueError("sample_grid needs at least one row of images")
    if len(row_labels) != len(rows):
        raise ValueError(f"{len(row_labels)} row labels for {len(rows)} rows")
    for index, batch in enumerate(rows):
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"row {index} must be (P, 3, H, W), got {tuple(batch.shape)}")
    counts = [batch.shape[0] for batch in rows]
    if len(set(counts)) != 1:
        raise ValueError(f"all rows must hold the same number of images, got {counts}")
    if counts[0] == 0:
        raise ValueError("rows hold no images")
    if len(column_labels) != counts[0]:
        raise ValueError(f"{len(column_labels)} column labels for {counts[0]} images per row")

    bands = [label_strip(column_labels, tile)]
    for batch, name in zip(rows, row_labels):
        band = torch.cat([_resize(picture, tile) for picture in batch], dim=2)
        bands.append(_stamp_label(band, str(name)))
    return torch.cat(bands, dim=1)


def _stamp_label(band: Tensor, text: str) -> Tensor:
    """Draw ``text`` on a black box just wide enough for it, in the band's top-left corner."""
    width = band.shape[2]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    box_width = min(width, int(np.ceil(_text_width(probe, text, ImageFont.load_default()))) + 2 * _PAD)
    height = min(LABEL_HEIGHT, band.shape[1])
    if box_width <= 0 or height <= 0:
        return band
    band = band.clone()
    band[:, :height, :box_width] = _text_cell(text, box_width, height)
    return band


def to_uint8(images: Tensor) -> Tensor:
    """Floats nominally in [0, 1] (any shape) -> 0..255 uint8, clamped and rounded (k / 255 comes back as k), as a
    saved PNG holds them."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def to_uint8_hwc(image: Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8 array, as PIL's ``Image.fromarray`` expects."""
    return to_uint8(image.cpu()).permute(1, 2, 0).contiguous().numpy()


def save_png(image: Tensor, path: str | Path) -> None:
    Image.fromarray(to_uint8_hwc(image)).save(Path(path), format="PNG")
