"""Pixel-level judge for the shapes world: which (colour, shape) objects does a generated image contain?

Model-free and exact: it shares only the palette and sizes with ``world.py`` (never the renderer), so it can
score any generator. Used as ``from judge import judge_image, summarise`` with ``benchmarks/shapes`` on sys.path.

Pipeline and thresholds (all at 32 px):

* **Input.** A uint8 (H, W, 3) array, an RGB PIL image or a path to one; anything else (greyscale, RGBA, palette
  mode, float arrays) is a ValueError. Other sizes are resized to 32x32 with PIL's BOX filter (area averaging:
  a 64 px image becomes the mean of 2x2 blocks, which also averages away a generator's pixel noise).
* **Colour.** Each pixel takes the nearest of background + the 6 palette colours by RGB distance. It is
  *off-palette* when that distance exceeds ``OFF_PALETTE_DISTANCE`` = 60: the 7 entries are >= 165 apart, so
  60 keeps noise of sigma 8/channel (norm ~14, rarely > 40) inside and flags mixed colours (the midpoint of two
  entries is >= 95 from both). Exception, the *rim*: an off-palette pixel within 60 of a blend background +
  t * (colour - background), with an on-palette pixel among its 8 neighbours, is what blurring or anti-aliasing a
  shape's edge gives; it takes the colour if t >= 0.5 (else background) and is not counted (its nearest entry
  is arbitrary: half-dimmed white is nearer green than black). Other off-palette pixels belong to no object.
* **Objects.** 8-connected components of each colour (objects in this world are >= 2 px apart, so 8-connectivity
  never merges two of them but keeps thin diagonal triangle edges in one piece; two objects of one scene never
  share a colour). Components under ``MIN_AREA`` = 12 px are noise (*stray* pixels); the smallest objects (8 px
  triangles and crosses) cover 28-32 px.
* **Shape** from the component's bounding box after trimming a one-row sliver (an edge row or column with <= 1/4
  of the next one's pixels: noise stuck to a side). None (not compact, skewed, a ring) if max(h,w)/min(h,w) > 1.6,
  the IoU with its mirror image about its centroid column < 0.6 (rendered 1, 3x3-blurred >= 0.82) or enclosed
  holes > 10% of the area. *fill* = area / (h*w); *taper* = pixels in the top half of the rows / in the bottom
  half; *corners* = the filled share of the box's four k x k corners (k = min(h, w) / 4); *arms* = the mean
  width of the outer quarter rows and columns over the widest row and column (a cross's arms are a third wide).
  Cross: corners <= 0.3 and arms + fill / 2 <= 0.83 (measured on 320 renders per shape at sizes 8-15: rendered
  crosses 0.47-0.72, blurred with noise sigma 8-12 <= 0.82; circles >= 0.85). Triangle (apex up: rows widen
  downwards; rendered: taper 0.29-0.40, fill 0.50-0.57; blurred: taper <= 0.67, fill <= 0.83): taper < 0.75 and
  0.3 <= fill <= 0.85. Otherwise taper in [0.8, 1.25] (rendered 1.0, blurred 0.92-1.09) and square: fill >= 0.91
  (rendered 1, blurred >= 0.94), circle: 0.68 <= fill <= 0.89 (rendered 0.78-0.85, blurred >= 0.74). Anything
  else is None (an unrecognised blob).

``judge_image(image, objects)`` returns ``detected`` (every component >= MIN_AREA, largest first, as (colour,
shape or None, area, (x0, y0, x1, y1) end-exclusive)), ``n_objects``, ``unrecognised`` (components with shape
None), ``stray_pixels``, ``off_palette_pixels``, and the scores below. It matches the prompt's objects to the
recognised detected objects (largest first) one-to-one in two greedy stages; greedy is optimal because each
stage's "compatible" relation (same colour and shape; same shape) splits objects into disjoint classes:

* ``correct``: prompt objects matched by a detected object of the same colour and shape; ``binding_accuracy``
  = correct / n_objects.
* then, for each unmatched prompt object, an unmatched detected object of its shape:
  ``leaked`` if its colour belongs to another prompt object (attribute leakage or swap), else ``wrong_colour``
  (a colour the prompt does not name); ``missing`` (neglected) if no unmatched detected object has its shape,
  whatever the colour.
* ``extra``: recognised detected objects left unmatched after both stages.
* ``all_correct``: every prompt object correct *and* no extra object (strict: the image shows exactly the prompt).
* ``clean``: no unrecognised component and off-palette + stray pixels < ``CLEAN_FRACTION`` (3%) of the image.

``summarise(results)`` averages these over images (rates of missing/leaked/wrong-colour are per prompt object).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from world import BACKGROUND, COLOURS, IMAGE_SIZE, PALETTE, SHAPES

OFF_PALETTE_DISTANCE = 60.0
MIN_AREA = 12
MAX_ASPECT = 1.6
MAX_HOLE_FRACTION = 0.1
MIN_SYMMETRY = 0.6
CLEAN_FRACTION = 0.03
CROSS_MAX_CORNERS = 0.3
CROSS_MAX_SCORE = 0.83

_ENTRIES = np.array([BACKGROUND] + [PALETTE[c] for c in COLOURS], np.float64)  # label 0: background, k: COLOURS[k-1]
_STEPS4 = ((-1, 0), (1, 0), (0, -1), (0, 1))
_STEPS8 = _STEPS4 + ((-1, -1), (-1, 1), (1, -1), (1, 1))


def load_image(image) -> np.ndarray:
    """A uint8 (32, 32, 3) array from an array, a PIL image or a path (see the module docstring)."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            opened.load()
            image = opened.copy()
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ValueError(f"judge needs an RGB image, got PIL mode {image.mode!r}")
        image = np.asarray(image)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"judge needs a uint8 (H, W, 3) RGB array, got {image.dtype} of shape {image.shape}")
    if image.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        image = np.asarray(Image.fromarray(image).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX))
    return image


def segment(image: np.ndarray) -> np.ndarray:
    """(H, W) int labels: 0 background, k for COLOURS[k-1], -1 off-palette (no object)."""
    pixels = image.astype(np.float64)
    distance = np.linalg.norm(pixels[:, :, None, :] - _ENTRIES, axis=-1)
    labels = distance.argmin(-1)
    far = distance.min(-1) > OFF_PALETTE_DISTANCE
    # Best blend base + t * (colour - base), t in [0, 1]: what blurring a shape's rim onto the background gives.
    base, colours = _ENTRIES[0], _ENTRIES[1:] - _ENTRIES[0]
    t = np.clip((pixels - base) @ colours.T / (colours**2).sum(1), 0.0, 1.0)
    residual = np.linalg.norm(pixels[:, :, None, :] - base - t[..., None] * colours, axis=-1)
    best = residual.argmin(-1)
    blend_t = np.take_along_axis(t, best[..., None], -1)[..., 0]
    # A rim pixel touches (8-neighbourhood) an on-palette pixel: the solid inside or the clean background.
    h, w = labels.shape
    padded = np.zeros((h + 2, w + 2), bool)
    padded[1:-1, 1:-1] = ~far
    touches = np.zeros_like(far)
    for dy, dx in _STEPS8:
        touches |= padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
    rim = far & touches & (residual.min(-1) <= OFF_PALETTE_DISTANCE)
    labels[rim] = np.where(blend_t[rim] >= 0.5, best[rim] + 1, 0)  # mostly colour -> the colour, else background
    labels[far & ~rim] = -1
    return labels


def components(mask: np.ndarray, steps=_STEPS8) -> list[np.ndarray]:
    """Connected components (8-connected by default) of a boolean mask, in raster order, each an (n, 2) (y, x)."""
    padded = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), bool)  # a False frame: no bounds checks
    padded[1:-1, 1:-1] = mask
    width, padded = padded.shape[1], padded.ravel()
    grid, offsets, found = padded.tolist(), [dy * width + dx for dy, dx in steps], []  # grid: cleared once visited
    for start in np.flatnonzero(padded).tolist():
        if grid[start]:
            grid[start], stack, pixels = False, [start], []
            while stack:
                i = stack.pop()
                pixels.append(i)
                for o in offsets:
                    j = i + o
                    if grid[j]:
                        grid[j] = False
                        stack.append(j)
            found.append(np.stack(np.divmod(np.array(pixels), width), 1) - 1)
    return found


def _trim(mask: np.ndarray) -> np.ndarray:
    """Drop edge rows, then edge columns, holding <= 1/4 of the pixels of the row (column) next to them: a noise
    pixel stuck to a square's side would otherwise widen its box and lower its fill. A shape's own edge rows hold
    more (a circle's cap >= 1/2 of the next row; a rendered triangle's apex row as many as the next)."""
    for _ in range(2):  # rows, then (transposed) columns
        counts = mask.sum(1)
        if len(counts) >= 3:
            mask = mask[int(counts[0] <= counts[1] / 4) : len(counts) - int(counts[-1] <= counts[-2] / 4)]
        mask = mask.T
    ys, xs = np.nonzero(mask)
    return mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def classify_shape(mask: np.ndarray) -> str | None:
    """"circle", "square", "triangle" (apex up), "cross" or None for a component cropped to its bounding box."""
    mask = _trim(mask)
    h, w = mask.shape
    area = int(mask.sum())
    # All four shapes are left-right symmetric (an L, a skewed or right triangle is not): mirror x -> 2c - x about
    # the centroid column c (to the nearest half pixel, so a noise pixel widening the box does not shift the axis).
    d = int(round(2 * np.nonzero(mask)[1].mean())) - (w - 1)  # the mirror is mask[:, ::-1] shifted d columns right
    overlap = (mask[:, max(d, 0) : w + min(d, 0)] & mask[:, ::-1][:, max(-d, 0) : w - max(d, 0)]).sum()
    if max(h, w) / min(h, w) > MAX_ASPECT or overlap < MIN_SYMMETRY * (2 * area - overlap):
        return None
    # Holes: background in the box that a 1 px frame around it cannot reach (4-connected: the object is 8-connected).
    outside = np.ones((h + 2, w + 2), bool)
    outside[1:-1, 1:-1] = ~mask
    holes = int(outside.sum()) - len(components(outside, _STEPS4)[0])
    if holes > MAX_HOLE_FRACTION * area:
        return None
    fill = area / (h * w)
    rows = mask.sum(1)
    taper = rows[: h // 2].sum() / max(rows[h - h // 2 :].sum(), 1)  # the middle row of an odd height is skipped
    k = max(1, round(min(h, w) / 4))  # the four k x k corners of the box: empty in a cross, full in a square
    corners = (mask[:k, :k].sum() + mask[:k, -k:].sum() + mask[-k:, :k].sum() + mask[-k:, -k:].sum()) / (4 * k * k)
    cols, t, u = mask.sum(0), max(1, h // 4), max(1, w // 4)
    arms = (rows[:t].mean() + rows[-t:].mean() + cols[:u].mean() + cols[-u:].mean()) / (2 * (rows.max() + cols.max()))
    if corners <= CROSS_MAX_CORNERS and arms + fill / 2 <= CROSS_MAX_SCORE:
        return "cross"
    if taper < 0.75 and 0.3 <= fill <= 0.85:
        return "triangle"
    if 0.8 <= taper <= 1.25:
        if fill >= 0.91:
            return "square"
        if 0.68 <= fill <= 0.89:
            return "circle"
    return None


def segment_objects(image) -> tuple[list[tuple], int, int]:
    """(objects, stray pixels, off-palette pixels); objects = every component >= MIN_AREA, largest first, as
    (colour, shape or None, area, (x0, y0, x1, y1) end-exclusive, (n, 2) pixel coordinates (y, x))."""
    labels = segment(load_image(image))
    found, stray = [], 0
    for k, colour in enumerate(COLOURS, start=1):
        for pixels in components(labels == k):
            if len(pixels) < MIN_AREA:
                stray += len(pixels)
                continue
            (y0, x0), (y1, x1) = pixels.min(0), pixels.max(0) + 1
            crop = np.zeros((y1 - y0, x1 - x0), bool)
            crop[pixels[:, 0] - y0, pixels[:, 1] - x0] = True
            found.append((colour, classify_shape(crop), len(pixels), (int(x0), int(y0), int(x1), int(y1)), pixels))
    found.sort(key=lambda d: -d[2])
    return found, stray, int((labels == -1).sum())


def detect(image) -> tuple[list[tuple], int, int]:
    """(detected objects as in judge_image, stray pixels, off-palette pixels)."""
    found, stray, off_palette = segment_objects(image)
    return [d[:4] for d in found], stray, off_palette


def judge_image(image, objects) -> dict:
    """Score one image against its prompt's objects, a list of (colour, shape); keys in the module docstring."""
    objects = [tuple(o) for o in objects]
    if not objects:
        raise ValueError("judge_image needs at least one prompt object")
    for o in objects:
        if len(o) != 2 or o[0] not in COLOURS or o[1] not in SHAPES:
            raise ValueError(f"bad object {o!r}: want (colour, shape), colours {COLOURS}, shapes {SHAPES}")
    detected, stray, off_palette = detect(image)
    free = [d for d in detected if d[1] is not None]  # recognised and not yet matched

    def take(accept):
        for i, d in enumerate(free):
            if accept(d):
                return free.pop(i)
        return None

    unmatched = [o for o in objects if take(lambda d, o=o: (d[0], d[1]) == o) is None]
    prompt_colours = {c for c, _ in objects}
    missing, leaked, wrong_colour = [], [], []
    for colour, shape in unmatched:
        if take(lambda d: d[1] == shape and d[0] in prompt_colours and d[0] != colour) is not None:
            leaked.append((colour, shape))
        elif take(lambda d: d[1] == shape and d[0] not in prompt_colours) is not None:
            wrong_colour.append((colour, shape))
        else:
            missing.append((colour, shape))
    correct = len(objects) - len(unmatched)
    unrecognised = sum(d[1] is None for d in detected)
    return {
        "detected": detected,
        "n_objects": len(objects),
        "correct": correct,
        "binding_accuracy": correct / len(objects),
        "all_correct": correct == len(objects) and not free,
        "missing": missing,
        "leaked": leaked,
        "wrong_colour": wrong_colour,
        "extra": free,
        "unrecognised": unrecognised,
        "stray_pixels": stray,
        "off_palette_pixels": off_palette,
        "clean": unrecognised == 0 and stray + off_palette < CLEAN_FRACTION * IMAGE_SIZE * IMAGE_SIZE,
    }


def summarise(results: list[dict]) -> dict:
    """Means over images of judge_image results; missing/leakage/wrong-colour rates are per prompt object."""
    if not results:
        raise ValueError("summarise needs at least one result")
    n = len(results)
    n_objects = sum(r["n_objects"] for r in results)
    return {
        "count": n,
        "binding_accuracy": sum(r["binding_accuracy"] for r in results) / n,
        "all_correct_rate": sum(r["all_correct"] for r in results) / n,
        "missing_rate": sum(len(r["missing"]) for r in results) / n_objects,
        "leakage_rate": sum(len(r["leaked"]) for r in results) / n_objects,
        "wrong_colour_rate": sum(len(r["wrong_colour"]) for r in results) / n_objects,
        "extra_per_image": sum(len(r["extra"]) for r in results) / n,
        "clean_rate": sum(r["clean"] for r in results) / n,
    }
