"""The shapes world: 32 px images of 1-3 flat shapes on black, with captions like "a red circle and a blue square".

Everything is a pure function of a seed (``numpy.random.Generator``), so every dataset, prompt file and layout
mask in the benchmark can be regenerated exactly. Objects in one scene have distinct shapes and distinct colours,
so a prompt names each object by its shape alone ("the circle"): that is what lets attention-mask losses and
guidance address each object by its noun, as they would "dog" and "cat" in a real prompt.

Compositions are the unit of generalisation: a *pair* is an unordered set of two (colour, shape) objects, e.g.
{red circle, blue square}. :func:`composition_splits` fixes which pairs the base model may see in training, which
the fine-tuning prompts use, which are for choosing settings (val) and which are held out for the benchmark
(test): the four sets are disjoint, so the benchmark's prompts are compositions no model was trained on.

The renderer is the world's ground truth; the judge (``judge.py``) shares only the palette with it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 32
BACKGROUND = (0, 0, 0)
# Colours far apart in RGB (>= 150 apart pairwise) so that a blurred pixel still has an unambiguous nearest colour.
PALETTE = {
    "red": (230, 30, 30),
    "green": (30, 200, 50),
    "blue": (40, 80, 255),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
OBJECT_TYPES = tuple(itertools.product(COLOURS, SHAPES))  # 15 (colour, shape) objects
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
    """All 60 two-object compositions: two distinct shapes, two distinct colours."""
    pairs = []
    for (c1, s1), (c2, s2) in itertools.combinations(OBJECT_TYPES, 2):
        if c1 != c2 and s1 != s2:
            pairs.append(frozenset({(c1, s1), (c2, s2)}))
    return pairs


def composition_splits(seed: int = 0) -> dict[str, list[tuple[tuple[str, str], ...]]]:
    """Disjoint pair splits: ``base`` (may appear in the base model's few multi-object scenes), ``train`` (CoMat's
    fine-tuning prompts), ``val`` (for choosing settings), ``test`` (held out: the benchmark). Fine-tuning prompts
    are also unseen by the base model, as in the paper, where CoMat's prompts are not the base's training captions.
    Each pair is a sorted tuple of (colour, shape)."""
    pairs = sorted(tuple(sorted(p)) for p in pair_compositions())
    order = np.random.default_rng(seed).permutation(len(pairs))
    shuffled = [pairs[i] for i in order]
    return {"test": shuffled[:16], "val": shuffled[16:24], "train": shuffled[24:42], "base": shuffled[42:]}


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
    """``count`` objects with distinct colours and shapes; with ``allowed_pairs`` (a set of sorted pair tuples),
    every pair of objects in the scene must be one of them."""
    while True:
        shapes = rng.choice(len(SHAPES), size=count, replace=False)
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
    raise ValueError(f"unknown shape {thing.shape!r}")


def render(things: list[Thing], size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 (size, size, 3) image."""
    image = np.empty((size, size, 3), np.uint8)
    image[:] = BACKGROUND
    for thing in things:
        image[thing_mask(thing, size)] = PALETTE[thing.colour]
    return image


def sample_base_scene(rng: np.random.Generator, multi_object_rate: float, allowed_pairs) -> list[Thing]:
    """A base-model training scene: one object, or (with ``multi_object_rate``) two objects whose pair is in
    ``allowed_pairs``. Mostly single objects, as real captions mostly name one main subject: this is
    what makes the base model weak at binding attributes in multi-object prompts."""
    if rng.random() >= multi_object_rate:
        return scene(rng, (OBJECT_TYPES[int(rng.integers(len(OBJECT_TYPES)))],))
    return scene(rng, random_objects(rng, 2, allowed_pairs))


def sample_any_scene(rng: np.random.Generator) -> list[Thing]:
    """Any scene of 1-3 objects (the captioner's training data: it must know every composition)."""
    count = int(rng.choice([1, 2, 3], p=[0.2, 0.5, 0.3]))
    return scene(rng, random_objects(rng, count))


def prompt_record(things: list[Thing], seed: int | None = None, layout: bool = True) -> dict:
    """A JSONL record for the framework: the prompt, per-noun layout masks (COCO RLE, the rendered objects: what
    attribute concentration's JsonlMasks reads; only with ``layout``), the guidance concepts (the nouns), and the
    objects for the judge."""
    from comat_lightning.masks import rle_encode

    record = {"prompt": caption(things)}
    if layout:
        record["masks"] = {t.shape: rle_encode(thing_mask(t), compress=True) for t in things}
    record.update(concepts=[t.shape for t in things], objects=[[t.colour, t.shape] for t in things])
    if seed is not None:
        record["seed"] = seed
    return record
