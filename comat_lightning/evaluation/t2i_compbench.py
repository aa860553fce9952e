"""T2I-CompBench's scoring rules (Huang et al. 2023), as its official code computes them.

Read from github Karine-Huang/T2I-CompBench at 1b70949 (``BLIPvqa_eval/BLIP_vqa.py``, ``BLIPvqa_eval/models/
blip_vqa.py``, ``CLIPScore_eval/CLIP_similarity.py``, ``UniDet_eval/2D_spatial_eval.py``, ``3_in_1_eval/3_in_1.py``);
docs/evaluation.md lists where ours can differ. The models that produce the inputs (BLIP-VQA's yes/no logits,
CLIP embeddings, detections) are elsewhere; this module holds the rules on their outputs:

- attribute binding (colour, shape, texture): every spaCy noun chunk of the prompt becomes the question
  "<chunk>?", BLIP-VQA's P(yes) = p_yes / (p_yes + p_no) at the decoder's first step, and an image scores the
  product of its questions' P(yes) (each rounded to 4 decimals, as the official script writes them);
- non-spatial: the cosine similarity of CLIP ViT-B/32 image and prompt embeddings (no x100, x2.5 or clipping);
- spatial: the first and last noun of the prompt are detected (highest-confidence box of each, score > 0.5), and
  0.25 conf1 + 0.25 conf2 + 0.5 position scores the image, set to 0 below 0.5; the position rules work on box
  centres in a 479-pixel frame (the official detector's input size);
- complex: per image, the mean of the attribute score and the spatial and/or action (CLIP without adjectives) score.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

# Noun chunks the official script drops (exact, case-sensitive text of the chunk).
DROPPED_CHUNKS = frozenset({"top", "the side", "the left", "the right"})
# BLIP's question cleaning (BLIPvqa_eval/data/utils.py pre_question): these characters are deleted, "?" is kept.
_QUESTION_DELETE = re.compile(r"[.!\"()*#:;~]")
# Relation keywords, searched in this order (the first one found in the prompt wins).
RELATIONS = ("on side of", "next to", "near", "on the left of", "on the right of", "on the bottom of", "on the top of", "on top of")
NEAR_RELATIONS = frozenset({"on side of", "next to", "near"})
PERSON_WORDS = {"girl": "person", "boy": "person", "man": "person", "woman": "person"}
DETECTION_THRESHOLD = 0.5  # UniDet's score threshold in the official spatial script
FRAME = 479  # the official detector sees the image resized to 479 px: its pixel thresholds are in that frame
IOU_THRESHOLD = 0.1
DISTANCE_THRESHOLD = 150.0  # pixels of the 479-px frame


def noun_chunk_questions(prompt: str, nlp) -> list[str]:
    """The BLIP-VQA questions of ``prompt``: one per spaCy noun chunk (in order, minus :data:`DROPPED_CHUNKS`),
    "<chunk>?" lowercased with ``.!"()*#:;~`` deleted, as the official script asks them. ``nlp``: a spaCy
    pipeline with a parser (the benchmark pins en_core_web_sm 3.5.0)."""
    chunks = [chunk.text for chunk in nlp(prompt).noun_chunks if chunk.text not in DROPPED_CHUNKS]
    return [clean_question(f"{chunk}?") for chunk in chunks]


def clean_question(question: str) -> str:
    return " ".join(_QUESTION_DELETE.sub("", question.lower()).rstrip().split(" ")[:50])


def yes_probability(yes_logit: float, no_logit: float) -> float:
    """p(yes) / (p(yes) + p(no)) of a softmax over the vocabulary = a 2-way softmax of the two logits."""
    return 1.0 / (1.0 + math.exp(no_logit - yes_logit))


def attribute_binding_score(yes_probabilities: Iterable[float]) -> float:
    """An image's score: the product of its questions' P(yes), each rounded to 4 decimals first (the official
    script writes them as "%.4f" strings and multiplies those); the product is rounded to 4 decimals too."""
    product = 1.0
    for p in yes_probabilities:
        product *= round(float(p), 4)
    return round(product, 4)


def relation_of(prompt: str) -> Optional[str]:
    """The spatial relation keyword of ``prompt``: the first of :data:`RELATIONS` that occurs in it, or None."""
    return next((r for r in RELATIONS if r in prompt), None)


def spatial_objects(prompt: str, nlp) -> tuple[Optional[str], Optional[str]]:
    """The two objects the spatial rule detects: the first and the last token tagged NOUN (single words;
    girl/boy/man/woman -> person, the detector's class)."""
    nouns = [token.text for token in nlp(prompt) if token.pos_ == "NOUN"]
    if not nouns:
        return None, None
    return PERSON_WORDS.get(nouns[0], nouns[0]), PERSON_WORDS.get(nouns[-1], nouns[-1])


COMPLEX_RELATION_PHRASES = ("on top of", "on bottom of", "on the left", "on the right", "next to", "on side of", "near")


def complex_spatial_objects(prompt: str, nlp) -> tuple[Optional[str], Optional[str]]:
    """The two objects of a complex prompt's spatial clause: around the first of :data:`COMPLEX_RELATION_PHRASES`
    found, the nearest noun (or proper noun) before it and the first noun after it (a proper noun if none); both
    None when either is missing."""
    doc = nlp(prompt)
    words = [token.text.lower() for token in doc]
    for phrase in COMPLEX_RELATION_PHRASES:
        span = phrase.split()
        for start in range(len(words) - len(span) + 1):
            if words[start : start + len(span)] != span:
                continue
            before = [t.text for t in doc[:start] if t.pos_ in ("NOUN", "PROPN")]
            after = [t for t in doc[start + len(span) :]]
            following = [t.text for t in after if t.pos_ == "NOUN"] or [t.text for t in after if t.pos_ == "PROPN"]
            if before and following:
                first, second = before[-1], following[0]
                return PERSON_WORDS.get(first, first), PERSON_WORDS.get(second, second)
            return None, None
    return None, None


@dataclass(frozen=True)
class Box:
    """A detection: (x0, y0, x1, y1) in pixels of an image ``size`` pixels wide and high, and its confidence."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float = 1.0

    def centre(self) -> tuple[float, float]:
        return (self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2

    def scaled(self, factor: float) -> "Box":
        return Box(self.x0 * factor, self.y0 * factor, self.x1 * factor, self.y1 * factor, self.score)


def iou(a: Box, b: Box) -> float:
    w = max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0))
    h = max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))
    inter = w * h
    union = (a.x1 - a.x0) * (a.y1 - a.y0) + (b.x1 - b.x0) * (b.y1 - b.y0) - inter
    return inter / union if union > 0 else 0.0


def position_score(relation: Optional[str], first: Box, second: Box) -> float:
    """How well ``first`` stands in ``relation`` to ``second`` (boxes in the 479-px frame; image y points down).
    near / next to / on side of: 1 if the centres are within 150 px on either axis, else 150 / the larger offset.
    left / right / top / bottom: 0 unless the offset points that way along its dominant axis; then 1 if the boxes
    overlap less than IoU 0.1, else 0.1 / IoU. Any other relation (including "on top of"): 0."""
    (x1, y1), (x2, y2) = first.centre(), second.centre()
    dx, dy = x2 - x1, y2 - y1
    if relation in NEAR_RELATIONS:
        if abs(dx) < DISTANCE_THRESHOLD or abs(dy) < DISTANCE_THRESHOLD:
            return 1.0
        return DISTANCE_THRESHOLD / max(abs(dx), abs(dy))
    direction = {"on the left of": dx > 0 and abs(dx) > abs(dy), "on the right of": dx < 0 and abs(dx) > abs(dy),
                 "on the top of": dy > 0 and abs(dy) > abs(dx), "on the bottom of": dy < 0 and abs(dy) > abs(dx)}  # fmt: skip
    if not direction.get(relation, False):
        return 0.0
    overlap = iou(first, second)
    return 1.0 if overlap < IOU_THRESHOLD else IOU_THRESHOLD / overlap


def best_box(detections: Sequence[tuple[str, Box]], name: Optional[str], threshold: float = DETECTION_THRESHOLD) -> Optional[Box]:
    """The highest-confidence box labelled exactly ``name`` with a score above ``threshold``."""
    boxes = [box for label, box in detections if label == name and box.score > threshold]
    return max(boxes, key=lambda b: b.score) if boxes else None


def spatial_score(prompt: str, nlp, detections: Sequence[tuple[str, Box]], image_size: int,
                  threshold: float = DETECTION_THRESHOLD, complex_prompt: bool = False) -> float:  # fmt: skip
    """An image's spatial score from its (label, box) detections in pixels of an ``image_size`` image (``threshold``:
    the detector's score threshold, 0.5 for the official UniDet; ``complex_prompt``: objects found around the
    relation phrase, as the official script's complex mode)."""
    first_name, second_name = (complex_spatial_objects if complex_prompt else spatial_objects)(prompt, nlp)
    scale = FRAME / image_size
    first, second = best_box(detections, first_name, threshold), best_box(detections, second_name, threshold)
    if first is not None and second is not None:
        score = 0.25 * first.score + 0.25 * second.score + 0.5 * position_score(relation_of(prompt), first.scaled(scale), second.scaled(scale))
    elif first is not None or second is not None:
        score = 0.25 * (first or second).score
    else:
        score = 0.0
    return score if score >= 0.5 else 0.0


def without_adjectives(prompt: str, nlp) -> str:
    """The complex category's action text for CLIPScore: the prompt's tokens minus those tagged ADJ, joined by spaces."""
    return " ".join(token.text for token in nlp(prompt) if token.pos_ != "ADJ")


def complex_score(attribute: float, spatial: Optional[float] = None, action: Optional[float] = None) -> float:
    """The 3-in-1 rule: the mean of the attribute score and whichever of spatial and action the prompt has."""
    parts = [attribute] + [s for s in (spatial, action) if s is not None]
    return sum(parts) / len(parts)
