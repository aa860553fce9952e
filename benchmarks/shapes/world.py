"""The shapes world (v2): 32 px images of 1-3 flat shapes on black, captioned "a red circle and a blue square".

6 colours x 4 shapes = 24 kinds of object. Objects in one scene have distinct colours; their shapes may repeat
("a red circle and a blue circle": the hardest binding case, where the nouns cannot tell the objects apart and
only the colour words can). Images are 32 px and the world's VAE halves them, so latents and the finest
cross-attention maps are 16x16, as Stable Diffusion 1.5's 16x16 maps at 512 px that A&E and A-STAR read.

Everything is a pure function of a seed (``numpy.random.Generator``), so every dataset, prompt file and layout
mask in the benchmark can be regenerated exactly.

Compositions are the unit of generalisation: a *pair* is an unordered set of two (colour, shape) objects of
different colours, e.g. {red circle, blue square}: 240 of them. :func:`composition_splits` fixes which pairs the
base model sees in training (``base``, 10%), which CoMat's fine-tuning prompts use (``train``, 144), which are for
choosing settings (``val``, 24) and which are held out for the benchmark (``test``, 48): the four sets are
disjoint, so the benchmark's prompts are compositions neither the base model nor the fine-tune was trained on.

The renderer is the world's ground truth; the judge (``judge.py``) shares only the palette with it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 32
BACKGROUND = (0, 0, 0)
# Colours far apart in RGB (>= 165 apart pairwise, >= 240 from the background) so that a blurred pixel still has an
# unambiguous nearest colour.
PALETTE = {
    "red": (230, 30, 30),
    "green": (30, 200, 50),
    "blue": (40, 80, 255),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "purple": (200, 40, 220),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle", "cross")
OBJECT_TYPES = tuple(itertools.product(COLOURS, SHAPES))  # 24 (colour, shape) objects
WORDS = ("a", "and", *COLOURS, *SHAPES)  # the captions' whole vocabulary
SIZE_RANGE = {1: (10, 15), 2: (9, 13), 3: (8, 11)}  # object size (px) by the number of objects in the scene
GAP = 2  # px between objects' bounding boxes, so no two objects touch


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str
    x: int  # left edge (px)
    y: int  # top edge (px)
    size: int  # bounding box side (px)

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


def pair_compositions() -> list[frozenset]:
    """All 240 two-object compositions: two objects of different colours (60 of them share the shape)."""
    return [frozenset({a, b}) for a, b in itertools.combinations(OBJECT_TYPES, 2) if a[0] != b[0]]


SPLIT_SIZES = {"test": 48, "val": 24, "base": 24}  # the rest (144) is "train"


def composition_splits(seed: int = 0) -> dict[str, list[tuple[tuple[str, str], ...]]]:
    """Disjoint pair splits: ``base`` (the only pairs in the base model's multi-object scenes), ``train`` (CoMat's
    fine-tuning prompts), ``val`` (for choosing settings), ``test`` (held out: the benchmark). Fine-tuning prompts
    are also unseen by the base model, as in the paper, where CoMat's prompts are not the base's training captions.
    Same-shape and different-shape pairs are split separately, so each split holds a quarter of same-shape pairs.
    Each pair is a sorted tuple of (colour, shape)."""
    rng = np.random.default_rng(seed)
    splits: dict[str, list] = {name: [] for name in (*SPLIT_SIZES, "train")}
    all_pairs = sorted(tuple(sorted(p)) for p in pair_compositions())
    for same_shape in (True, False):
        group = [p for p in all_pairs if (p[0][1] == p[1][1]) == same_shape]
        shuffled = [group[i] for i in rng.permutation(len(group))]
        start = 0
        for name, size in SPLIT_SIZES.items():
            count = size * len(group) // len(all_pairs)
            splits[name] += shuffled[start : start + count]
            start += count
        splits["train"] += shuffled[start:]
    return {name: sorted(pairs) for name, pairs in splits.items()}


def _place(rng: np.random.Generator, sizes: list[int], tries: int = 1000) -> list[tuple[int, int]]:
    for _ in range(tries):
        boxes = []
        for size in sizes:
            x, y = (int(v) for v in rng.integers(1, IMAGE_SIZE - size, size=2))  # >= 1 px margin on every side
            if all(x + size + GAP <= bx or bx + bs + GAP <= x or y + size + GAP <= by or by + bs + GAP <= y for bx, by, bs in boxes):
                boxes.append((x, y, size))
        if len(boxes) == len(sizes):
            return [(x, y) for x, y, _ in boxes]
    raise RuntimeError(f"could not place objects of sizes {sizes} without overlap")  # sizes are chosen so this never happens


def scene(rng: np.random.Generator, objects: tuple[tuple[str, str], ...]) -> list[Thing]:
    """A scene of the given (colour, shape) objects in random order, sizes and non-touching positions."""
    objects = [objects[i] for i in rng.permutation(len(objects))]
    low, high = SIZE_RANGE[len(objects)]
    sizes = [int(s) for s in rng.integers(low, high + 1, size=len(objects))]
    return [Thing(c, s, x, y, size) for (c, s), (x, y), size in zip(objects, _place(rng, sizes), sizes)]


def random_objects(rng: np.random.Generator, count: int, allowed_pairs=None) -> tuple[tuple[str, str], ...]:
    """``count`` objects with distinct colours (shapes may repeat); with ``allowed_pairs`` (a set of sorted pair
    tuples), every pair of objects in the scene must be one of them."""
    while True:
        shapes = rng.choice(len(SHAPES), size=count, replace=True)
        colours = rng.choice(len(COLOURS), size=count, replace=False)
        objects = tuple((COLOURS[c], SHAPES[s]) for c, s in zip(colours, shapes))
        if allowed_pairs is None or all(tuple(sorted(p)) in allowed_pairs for p in itertools.combinations(objects, 2)):
            return objects


def caption(things: list[Thing]) -> str:
    return " and ".join(f"a {t.colour} {t.shape}" for t in things)


def thing_mask(thing: Thing, size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean (size, size) mask of one object, tested at pixel centres (hard edges, no anti-aliasing)."""
    scale = size / IMAGE_SIZE
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    px, py = (xs + 0.5) / scale, (ys + 0.5) / scale  # pixel centres in world coordinates
    x0, y0, s = thing.x, thing.y, thing.size
    if thing.shape == "square":
        return (px >= x0) & (px < x0 + s) & (py >= y0) & (py < y0 + s)
    if thing.shape == "circle":
        r = s / 2
        return (px - x0 - r) ** 2 + (py - y0 - r) ** 2 <= r * r
    if thing.shape == "triangle":  # apex up, base at the bottom
        half_width = (py - y0) / s * (s / 2)
        return (py >= y0) & (py < y0 + s) & (np.abs(px - x0 - s / 2) <= half_width)
    if thing.shape == "cross":  # an upright plus sign, arms a whole number of pixels (about a third) wide
        arm = round(s / 3)
        if (s - arm) % 2:  # the nearest width that leaves whole, equal margins: symmetric arms on whole pixels, so
            arm += 1 if s / 3 > arm else -1  # a render at any scale, box-resized to 32 px, has sharp arm edges
        lo = (s - arm) // 2
        inside = (px >= x0) & (px < x0 + s) & (py >= y0) & (py < y0 + s)
        return inside & (((px >= x0 + lo) & (px < x0 + lo + arm)) | ((py >= y0 + lo) & (py < y0 + lo + arm)))
    raise ValueError(f"unknown shape {thing.shape!r}")


def render(things: list[Thing], size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 (size, size, 3) image."""
    image = np.empty((size, size, 3), np.uint8)
    image[:] = BACKGROUND
    for thing in things:
        image[thing_mask(thing, size)] = PALETTE[thing.colour]
    return image


def sample_base_scene(rng: np.random.Generator, multi_object_rate: float, allowed_pairs) -> list[Thing]:
    """A base-model training scene: one object, or (with ``multi_object_rate``) two objects whose pair is one of
    ``allowed_pairs``. Mostly single objects, as real captions mostly name one main subject: this is what makes
    the base model weak at binding attributes in multi-object prompts."""
    if rng.random() >= multi_object_rate:
        return scene(rng, (OBJECT_TYPES[int(rng.integers(len(OBJECT_TYPES)))],))
    pairs = sorted(allowed_pairs)
    return scene(rng, pairs[int(rng.integers(len(pairs)))])


def sample_any_scene(rng: np.random.Generator) -> list[Thing]:
    """Any scene of 1-3 objects (the captioner's training data: it must know every composition)."""
    count = int(rng.choice([1, 2, 3], p=[0.2, 0.5, 0.3]))
    return scene(rng, random_objects(rng, count))


def prompt_record(things: list[Thing], seed: int | None = None, layout: bool = True) -> dict:
    """A JSONL record for the framework: the prompt, per-noun layout masks (COCO RLE, the rendered objects: what
    attribute concentration's JsonlMasks reads; only with ``layout``), the guidance concepts (the nouns), and the
    objects for the judge."""
    from comat_lightning.files.mask_files import rle_encode

    record = {"prompt": caption(things)}
    if layout:  # by noun; a shape named twice has no mask (attribute concentration drops such nouns anyway)
        shapes = [t.shape for t in things]
        record["masks"] = {t.shape: rle_encode(thing_mask(t), compress=True) for t in things if shapes.count(t.shape) == 1}
    record.update(concepts=[t.shape for t in things], objects=[[t.colour, t.shape] for t in things])
    if seed is not None:
        record["seed"] = seed
    return record


def parse_caption(text: str) -> list[tuple[str, str]]:
    """The objects of a caption in the world's grammar, "a <colour> <shape>" joined by "and" (case and spacing
    free). Raises ValueError naming the first unknown word (with the closest world word) or the broken rule."""
    import difflib

    words = text.lower().split()
    for word in words:
        if word not in WORDS:
            close = difflib.get_close_matches(word, WORDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown word {word!r}{hint} (the world's words: {', '.join(WORDS)})")
    objects, i = [], 0
    while i < len(words):
        if words[i] != "a" or len(words) - i < 3:
            raise ValueError(f"expected 'a <colour> <shape>' at word {i + 1} of {text!r}")
        colour, shape = words[i + 1], words[i + 2]
        if colour not in COLOURS or shape not in SHAPES:
            raise ValueError(f"expected 'a <colour> <shape>', got 'a {colour} {shape}' in {text!r}")
        objects.append((colour, shape))
        i += 3
        if i < len(words):
            if words[i] != "and" or i + 1 == len(words):
                raise ValueError(f"expected 'and a <colour> <shape>' after {' '.join(words[:i])!r} in {text!r}")
            i += 1
    if not objects:
        raise ValueError("an empty caption")
    colours = [c for c, _ in objects]
    repeated = sorted({c for c in colours if colours.count(c) > 1})
    if repeated:
        raise ValueError(f"two objects share the colour {repeated[0]!r} (the world's objects have distinct colours)")
    if len(objects) > 3:
        raise ValueError(f"{len(objects)} objects; the world's scenes hold 1 to 3")
    return objects
