"""Write the demo's JSONL prompt files with layout masks (data/demo_prompts.jsonl, data/demo_val_prompts.jsonl).

The demo trains attribute concentration with ``JsonlMasks``: each prompt names two objects and carries a mask per
object as COCO compressed RLE at the demo's 64 px: the first object left, the second right, or for "X on Y" the
first on top and the second below. Deterministic; rerun after editing the prompt lists below.

    python scripts/make_demo_data.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from comat_lightning.files.mask_files import rle_encode  # noqa: E402

SIZE = 64  # the demo's image resolution
# prompt -> the noun phrases that get a mask, in layout order
TRAIN = {
    "a red car and a blue bus": ["car", "bus"],
    "a green apple on a wooden table": ["apple", "table"],
    "a black cat sitting on a white chair": ["cat", "chair"],
    "a yellow bird and a purple flower": ["bird", "flower"],
    "a brown dog next to a red ball": ["dog", "ball"],
    "a blue cup on a pink plate": ["cup", "plate"],
    "a white horse in a green field": ["horse"],
    "a golden clock on a gray wall": ["clock"],
    "a striped zebra and a tall giraffe": ["zebra", "giraffe"],
    "an orange kite over the sea": ["kite"],
    "a small boat on a blue river": ["boat", "river"],
    "a red umbrella and a yellow hat": ["umbrella", "hat"],
}
VALIDATION = {
    "a pink flower in a glass vase": ["flower", "vase"],
    "a green bus and a red bike": ["bus", "bike"],
    "a white cat on a black sofa": ["cat", "sofa"],
    "a blue bird over a yellow field": ["bird"],
}


def box(top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[top:bottom, left:right] = 1
    return mask


def layout(prompt: str, phrases: list[str]) -> dict[str, dict]:
    if len(phrases) == 1:
        boxes = [box(12, 12, 52, 52)]
    elif " on " in prompt or " over " in prompt:
        boxes = [box(6, 16, 30, 48), box(34, 4, 60, 60)]  # first on top of the second
    else:
        boxes = [box(14, 2, 50, 30), box(14, 34, 50, 62)]  # side by side
    return {phrase: rle_encode(mask, compress=True) for phrase, mask in zip(phrases, boxes)}


def write(path: Path, prompts: dict[str, list[str]]) -> None:
    lines = [json.dumps({"prompt": p, "masks": layout(p, phrases)}) for p, phrases in prompts.items()]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    print(f"wrote {path} ({len(lines)} prompts)")


if __name__ == "__main__":
    write(REPO / "data" / "demo_prompts.jsonl", TRAIN)
    write(REPO / "data" / "demo_val_prompts.jsonl", VALIDATION)
