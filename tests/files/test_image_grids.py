"""Image grids: layouts, the heat colour map, per-map normalisation, where the heat lands, labels, PNG output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont

from comat_lightning.files.images import (
    LABEL_HEIGHT,
    attention_grid,
    heat_colors,
    label_strip,
    normalize_maps,
    overlay_heatmap,
    sample_grid,
    save_png,
    to_uint8_hwc,
)


def _luminance(rgb: torch.Tensor) -> torch.Tensor:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


@pytest.mark.parametrize("channels", [0, 1, 3])
@pytest.mark.parametrize("tile", [32, 64])
def test_attention_grid_shape(channels, tile):
    words = [f"word{i}" for i in range(channels)]
    grid = attention_grid(torch.rand(3, 40, 56), torch.rand(channels, 8, 8), words, tile=tile)
    assert grid.shape == (3, LABEL_HEIGHT + tile, (channels + 1) * tile)
    assert grid.dtype == torch.float32
    assert 0 <= grid.min() and grid.max() <= 1


def test_attention_grid_rejects_word_count_mismatch():
    with pytest.raises(ValueError, match="2 attention maps for 1 words"):
        attention_grid(torch.rand(3, 16, 16), torch.rand(2, 4, 4), ["cat"])


@pytest.mark.parametrize("prompts,n_rows,tile", [(1, 1, 32), (3, 2, 48), (2, 3, 64)])
def test_sample_grid_shape(prompts, n_rows, tile):
    rows = [torch.rand(prompts, 3, 24, 24) for _ in range(n_rows)]
    grid = sample_grid(rows, [f"prompt {p}" for p in range(prompts)], [f"row {r}" for r in range(n_rows)], tile=tile)
    assert grid.shape == (3, LABEL_HEIGHT + n_rows * tile, prompts * tile)


def test_sample_grid_places_tiles_and_row_labels():
    tile = 64
    grey, white = torch.full((1, 3, 32, 32), 0.5), torch.ones(1, 3, 32, 32)
    grid = sample_grid([grey, white], ["prompt"], ["base", "tuned"], tile=tile)
    second_row = grid[:, LABEL_HEIGHT + tile :]
    # Away from the corner label each tile is its (resized) source image.
    assert torch.allclose(grid[:, LABEL_HEIGHT + tile // 2 : LABEL_HEIGHT + tile, :], torch.tensor(0.5))
    assert torch.allclose(second_row[:, tile // 2 :, :], torch.tensor(1.0))
    # The row label is a black box with white text in the top-left corner of the row's first tile.
    corner = second_row[:, :LABEL_HEIGHT, :8]
    assert (corner == 0).all(dim=0).any()
    assert (second_row[:, :LABEL_HEIGHT, : tile // 2] > 0.9).all(dim=0).any()


@pytest.mark.parametrize(
    "rows,columns,row_labels,message",
    [
        ([], [], [], "at least one row"),
        ([torch.rand(2, 3, 8, 8), torch.rand(3, 3, 8, 8)], ["a", "b"], ["x", "y"], "same number of images"),
        ([torch.rand(2, 3, 8, 8)], ["a"], ["x"], "1 column labels for 2 images"),
        ([torch.rand(2, 3, 8, 8)], ["a", "b"], ["x", "y"], "2 row labels for 1 rows"),
        ([torch.rand(2, 1, 8, 8)], ["a", "b"], ["x"], r"row 0 must be \(P, 3, H, W\)"),
        ([torch.rand(0, 3, 8, 8)], [], ["x"], "no images"),
    ],
)
def test_sample_grid_validation(rows, columns, row_labels, message):
    with pytest.raises(ValueError, match=message):
        sample_grid(rows, columns, row_labels, tile=16)


def test_heat_colors_endpoints_and_monotonic_luminance():
    ramp = torch.linspace(0, 1, 257).view(1, -1)
    colours = heat_colors(ramp)
    assert colours.shape == (3, 1, 257)
    assert torch.equal(colours[:, 0, 0], torch.zeros(3))
    assert torch.equal(colours[:, 0, -1], torch.ones(3))
    luminance = _luminance(colours)[0]
    assert (luminance[1:] > luminance[:-1]).all()
    # "Hot": red comes first, then yellow (red + green), then white.
    middle = colours[:, 0, 128]
    assert middle[0] == 1 and 0 < middle[1] < 1 and middle[2] == 0


def test_normalize_maps_constant_and_ranged():
    maps = torch.stack([torch.full((4, 4), 3.0), torch.arange(16.0).view(4, 4) * 2 - 5])
    normed = normalize_maps(maps)
    assert normed.shape == maps.shape
    assert not normed.isnan().any()
    assert torch.equal(normed[0], torch.zeros(4, 4))
    assert normed[1].min() == 0 and normed[1].max() == 1
    assert torch.allclose(normed[1], torch.arange(16.0).view(4, 4) / 15)


def test_overlay_heatmap_blends_upsampled_colours():
    image = torch.full((3, 20, 30), 0.5)
    blended = overlay_heatmap(image, torch.ones(5, 5), alpha=0.25)
    assert blended.shape == (3, 20, 30)
    assert torch.allclose(blended, torch.full_like(blended, 0.75 * 0.5 + 0.25))
    assert torch.allclose(overlay_heatmap(image, torch.zeros(3, 3), alpha=0.0), image)


def test_attention_concentrated_in_a_corner_is_brightest_there():
    tile = 64
    attention = torch.full((2, 8, 8), 0.01)
    attention[1, :2, -2:] = 1.0  # second word: mass in the top-right 2x2 cells
    grid = attention_grid(torch.full((3, 48, 48), 0.5), attention, ["flat", "corner"], tile=tile)
    word_tile = grid[:, LABEL_HEIGHT:, 2 * tile : 3 * tile]
    luminance = _luminance(word_tile)
    half = tile // 2
    quadrants = {
        "top_left": luminance[:half, :half].mean(),
        "top_right": luminance[:half, half:].mean(),
        "bottom_left": luminance[half:, :half].mean(),
        "bottom_right": luminance[half:, half:].mean(),
    }
    assert max(quadrants, key=quadrants.get) == "top_right"
    others = [value for name, value in quadrants.items() if name != "top_right"]
    # The 2x2 hot cells cover a quarter of that quadrant, which lifts its mean well above the rest.
    assert quadrants["top_right"] > max(others) + 0.1
    assert luminance[0, -1] == luminance.max()  # the very corner is the hottest pixel
    # The constant map normalises to zero attention: an even darkened overlay, no hot spot.
    flat_tile = grid[:, LABEL_HEIGHT:, tile : 2 * tile]
    assert torch.allclose(flat_tile, torch.full_like(flat_tile, 0.4 * 0.5))


def test_label_strip_text_is_white_on_black_inside_its_cell():
    width = 60
    strip = label_strip(["cat", ""], width)
    assert strip.shape == (3, LABEL_HEIGHT, 2 * width)
    ink = strip.amax(dim=0) > 0.5
    assert ink[:, :width].any()
    assert not ink[:, width:].any()  # the empty label leaves its cell black
    columns = ink.any(dim=0).nonzero().flatten()
    assert columns.min() >= 2  # left padding
    assert columns.max() < width // 2  # a short word stays on the left of its cell
    assert not ink[0].any() and not ink[-1].any()  # vertical margins stay black
    # Drawn in grey scale: text is white-ish, background exactly black.
    assert torch.equal(strip[0], strip[1]) and torch.equal(strip[1], strip[2])


def test_label_strip_truncates_long_labels_within_the_cell():
    width = 40
    strip = label_strip(["a" * 80, "b"], width)
    ink = strip.amax(dim=0) > 0.5
    long_columns = ink[:, :width].any(dim=0).nonzero().flatten()
    assert long_columns.max() < width - 1  # cut short instead of spilling over
    assert ink[:, width:].any()  # the second label is still drawn in its own cell
    assert label_strip([], width).shape == (3, LABEL_HEIGHT, 0)


def test_labels_with_the_bitmap_font(monkeypatch):
    # Pillow builds without FreeType fall back to a bitmap font; emulate one where this Pillow allows it.
    if not hasattr(ImageFont, "load_default_imagefont"):
        pytest.skip("this Pillow cannot load the bitmap font on request")
    monkeypatch.setattr(ImageFont, "load_default", ImageFont.load_default_imagefont)
    strip = label_strip(["a long prompt that does not fit", "dog"], 48)
    assert strip.shape == (3, LABEL_HEIGHT, 96)
    assert (strip[:, :, :48].amax(dim=0) > 0.5).any() and (strip[:, :, 48:].amax(dim=0) > 0.5).any()
    grid = sample_grid([torch.rand(1, 3, 8, 8)], ["p"], ["base"], tile=32)
    assert grid.shape == (3, LABEL_HEIGHT + 32, 32)


def test_to_uint8_and_save_png_round_trip(tmp_path):
    image = torch.rand(3, 12, 20)
    array = to_uint8_hwc(image)
    assert array.shape == (12, 20, 3) and array.dtype == np.uint8
    path = tmp_path / "grid.png"
    save_png(image, path)
    with Image.open(path) as loaded:
        assert loaded.mode == "RGB" and loaded.size == (20, 12)
        assert np.array_equal(np.asarray(loaded), array)
    assert np.abs(array.astype(np.float32) / 255 - image.permute(1, 2, 0).numpy()).max() <= 0.5 / 255 + 1e-6
