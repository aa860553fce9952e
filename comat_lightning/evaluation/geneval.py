"""GenEval's scoring rules (Ghosh et al. 2023), as its official code computes them.

Read from github djghosh13/geneval at af4902f (``evaluation/evaluate_images.py``, ``evaluation/summary_scores.py``,
``prompts/evaluation_metadata.jsonl``); docs/evaluation.md lists where ours can differ (the official detector is
mmdet 2.x's Mask2Former Swin-S; the colour classifier is open_clip's ViT-L/14 "openai"). The models that produce the
inputs (instance detections, colour predictions) are elsewhere; this module holds the rules on their outputs:

- detections of a class are kept with score > 0.3 (> 0.9 for every class of a ``counting`` prompt), best first, at
  most 16 per class, no further suppression;
- an image is correct when every ``include`` clause holds (its class found at least ``count`` times; the top
  ``count`` objects all of its ``color``; each of them in ``position`` to each object of the clause it names) and no
  ``exclude`` clause does (``count`` or more detections of its class: counting asks for exactly N);
- positions compare box centres after shrinking each offset by 0.1 x the two boxes' summed size, direction cut 0.5;
- a tag's score is the fraction of its images that are correct; the overall score is the mean of the tags' scores.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from comat_lightning.errors import InputError

# GenEval's class names (evaluation/object_names.txt): COCO's 80 instance classes in the detector's index order.
OBJECT_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light", "fire hydrant",
    "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
    "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse",
    "tv remote", "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
POSITIONS = ("left of", "right of", "above", "below")
COLOUR_TEMPLATES = ("a photo of a {c} {classname}", "a photo of a {c}-colored {classname}", "a photo of a {c} object")
THRESHOLD, COUNTING_THRESHOLD = 0.3, 0.9
MAX_OBJECTS = 16  # per class
POSITION_THRESHOLD = 0.1
BACKGROUND_GREY = (153, 153, 153)  # #999: what surrounds an object's mask when its colour is classified


@dataclass(frozen=True)
class Clause:
    """One ``include`` / ``exclude`` entry: ``count`` objects of ``cls`` (optionally of ``color``, optionally in
    ``position`` = (relation, index of the include clause it is relative to))."""

    cls: str
    count: int = 1
    color: Optional[str] = None
    position: Optional[tuple[str, int]] = None


@dataclass(frozen=True)
class Prompt:
    tag: str
    prompt: str
    include: tuple[Clause, ...]
    exclude: tuple[Clause, ...] = ()


@dataclass(frozen=True)
class Detection:
    """An instance: its class, score and (x0, y0, x1, y1) box in pixels (``mask`` optional, for colour)."""

    cls: str
    score: float
    box: tuple[float, float, float, float]
    mask: object = field(default=None, compare=False)


def _clause(raw, where: str, n_include: Optional[int]) -> Clause:
    if not isinstance(raw, dict) or not isinstance(raw.get("class"), str):
        raise InputError(f"{where}: a clause needs a \"class\" name, got {raw!r}")
    count = raw.get("count", 1)
    if not isinstance(count, int) or count < 1:
        raise InputError(f"{where}: \"count\" must be a positive integer, got {count!r}")
    color = raw.get("color")
    if color is not None and color not in COLOURS:
        raise InputError(f"{where}: unknown color {color!r}; GenEval's colours are {', '.join(COLOURS)}")
    position = raw.get("position")
    if position is not None:
        ok = isinstance(position, list) and len(position) == 2 and position[0] in POSITIONS and isinstance(position[1], int)
        if not ok or n_include is None or not 0 <= position[1] < n_include:
            raise InputError(f"{where}: \"position\" must be [one of {', '.join(POSITIONS)}, the index of another include clause], got {position!r}")
        position = (position[0], position[1])
    return Clause(raw["class"], count, color, position)


def read_metadata(path: Path) -> list[Prompt]:
    """GenEval's ``evaluation_metadata.jsonl`` (one JSON object per line: tag, prompt, include, exclude); a bad line
    is refused with its file:line."""
    prompts = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: not a JSON object ({err.msg})") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("prompt"), str) or raw.get("tag") not in TAGS:
            raise InputError(f"{where}: needs a \"prompt\" and a \"tag\" (one of {', '.join(TAGS)})")
        include = raw.get("include")
        if not isinstance(include, list) or not include:
            raise InputError(f"{where}: \"include\" must be a non-empty list of clauses")
        clauses = tuple(_clause(c, where, len(include)) for c in include)
        exclude = tuple(_clause(c, where, None) for c in raw.get("exclude", []))
        prompts.append(Prompt(raw["tag"], raw["prompt"], clauses, exclude))
    if not prompts:
        raise InputError(f"{path}: no prompts")
    return prompts


def kept_detections(detections: Sequence[Detection], tag: str) -> dict[str, list[Detection]]:
    """Detections by class, as GenEval keeps them: score above the tag's threshold, best first, at most 16."""
    threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    by_class: dict[str, list[Detection]] = defaultdict(list)
    for d in sorted(detections, key=lambda d: -d.score):
        if d.score > threshold and len(by_class[d.cls]) < MAX_OBJECTS:
            by_class[d.cls].append(d)
    return dict(by_class)


def relations(a: Sequence[float], b: Sequence[float]) -> set[str]:
    """Where box ``a`` is relative to box ``b`` (boxes (x0, y0, x1, y1), image y down): the offset of the centres,
    each axis shrunk by 0.1 x (a's + b's size) towards 0, divided by the unshrunk offset's length; left of / right
    of / above / below where that component is beyond -0.5 / 0.5 (several can hold)."""
    centre = lambda box: ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)  # noqa: E731
    size = lambda box: (abs(box[2] - box[0]), abs(box[3] - box[1]))  # noqa: E731
    (ax, ay), (bx, by), (aw, ah), (bw, bh) = centre(a), centre(b), size(a), size(b)
    offset = (ax - bx, ay - by)
    shrunk = [max(abs(o) - POSITION_THRESHOLD * (da + db), 0.0) * math.copysign(1.0, o) if o else 0.0
              for o, da, db in zip(offset, (aw, ah), (bw, bh))]  # fmt: skip
    if abs(shrunk[0]) < 1e-3 and abs(shrunk[1]) < 1e-3:
        return set()
    norm = math.hypot(*offset)
    dx, dy = shrunk[0] / norm, shrunk[1] / norm
    found = set()
    if dx < -0.5:
        found.add("left of")
    if dx > 0.5:
        found.add("right of")
    if dy < -0.5:
        found.add("above")
    if dy > 0.5:
        found.add("below")
    return found


def judge(prompt: Prompt, detections: Sequence[Detection], colour_of: Callable[[Detection], str]) -> tuple[bool, str]:
    """Whether an image with ``detections`` is correct for ``prompt``, and why not. ``colour_of`` classifies one
    object (called only for clauses with a colour)."""
    kept = kept_detections(detections, prompt.tag)
    matched: list[Optional[list[Detection]]] = []
    reason = ""
    for clause in prompt.include:
        found = kept.get(clause.cls, [])[: clause.count]
        if len(found) < clause.count:
            reason = reason or f"expected {clause.cls} >= {clause.count}, found {len(kept.get(clause.cls, []))}"
            matched.append(None)
            continue
        if clause.color is not None:
            colours = [colour_of(d) for d in found]
            if sum(c == clause.color for c in colours) < clause.count:
                reason = reason or f"expected {clause.color} {clause.cls}, found {', '.join(colours)}"
                matched.append(None)
                continue
        if clause.position is not None:
            relation, target = clause.position
            targets = matched[target] if target < len(matched) else None
            if targets is None or not all(relation in relations(d.box, t.box) for d in found for t in targets):
                reason = reason or f"expected {clause.cls} {relation} {prompt.include[target].cls}"
                matched.append(None)
                continue
        matched.append(found)
    for clause in prompt.exclude:
        if len(kept.get(clause.cls, [])) >= clause.count:
            reason = reason or f"expected {clause.cls} < {clause.count}, found {len(kept[clause.cls])}"
    return not reason, reason


def summarise(results: Sequence[tuple[str, bool]]) -> dict:
    """(tag, correct) per image -> each tag's fraction of correct images (tags in order of first appearance),
    the number of images per tag, and the overall score: the unweighted mean of the tags' scores."""
    by_tag: dict[str, list[bool]] = {}
    for tag, correct in results:
        by_tag.setdefault(tag, []).append(bool(correct))
    scores = {tag: sum(v) / len(v) for tag, v in by_tag.items()}
    return {"tags": scores, "images": {tag: len(v) for tag, v in by_tag.items()},
            "overall": sum(scores.values()) / len(scores) if scores else float("nan")}  # fmt: skip


def colour_prompts(classname: str) -> dict[str, list[str]]:
    """The zero-shot colour classifier's texts for one class: per colour, the three templates (their embeddings are
    normalised, averaged and renormalised; the object takes the colour of the highest 100 x cosine)."""
    return {c: [t.format(c=c, classname=classname) for t in COLOUR_TEMPLATES] for c in COLOURS}
