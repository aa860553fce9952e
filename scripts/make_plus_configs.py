"""Write our "plus" recipes (configs/comat_plus_sd15.yaml, configs/comat_plus_sdxl.yaml) from the faithful ones
(configs/comat_sd15.yaml, configs/comat_sdxl.yaml) by changing only the options in PLUS_OPTIONS: each plus recipe
differs from its faithful recipe in exactly those values (tests/test_paper_recipes.py checks that on the parsed
configs, and that docs/paper.md's table names every one). Rerun after editing a faithful recipe.

    python scripts/make_plus_configs.py
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FAMILIES = {"sd15": "comat_sd15.yaml", "sdxl": "comat_sdxl.yaml"}

# class_path of the component -> option -> (our value, why). "families" limits an entry to some recipes.
PLUS_OPTIONS: dict[str, dict[str, tuple[Any, str]]] = {
    "callbacks.ConceptMatchingLoss": {
        "label_smoothing": (0.0, "the caption likelihood itself, not a smoothed target"),
        "first_token": ("dec", "BLIP writes (and was trained on) captions that start with [DEC]"),
        "reduction": ("sample_mean", "each prompt weighs the same, short prompts are not drowned"),
        "crop_per": ("image", "one crop per image: more augmentation, independent of the batch"),
    },
    "callbacks.AttributeConcentrationLoss": {
        "capture_with_replacement": (False, "always 2 distinct steps: the loss scale does not vary at random"),
        "mask_resize": ("area", "masks do not grow by a map cell per side (a large share of an 8x8 map)"),
        "normalization": ("per_entity", "each entity weighs the same; prompts without entities do not dilute"),
        "missed_entities": ("skip", "a detector miss is often the detector's fault, not a missing object"),
        "detector_phrase": ("noun_phrase", "the detector looks for 'teddy bear', not any 'bear'"),
        "max_attributes": (None, "nouns with 3+ modifiers are trained too"),
        "background_words": ("extended", "whole-word matches ('seat' is not 'sea') and spatial words"),
    },
    "comat_lightning.EvenlySpacedSteps": {
        "fill_to_end": (False, "exactly K gradient steps for any step count (the same at 50 / 5)"),
    },
}
PLUS_OPTIONS_BY_FAMILY: dict[str, dict[str, dict[str, tuple[Any, str]]]] = {
    "sdxl": {
        "callbacks.FidelityPreservationLoss": {
            "discriminator_model": (None, "the SDXL base under a second LoRA: no SD1.5 UNet held (~1.6 GiB in bf16)"),
        },
    },
}


def plus_options(family: str) -> dict[str, dict[str, tuple[Any, str]]]:
    """Every plus option of one recipe family: {class_path: {option: (value, why)}}."""
    merged = {cls: dict(options) for cls, options in PLUS_OPTIONS.items()}
    for cls, options in PLUS_OPTIONS_BY_FAMILY.get(family, {}).items():
        merged.setdefault(cls, {}).update(options)
    return merged


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def rewrite(lines: list[str], options: dict[str, dict[str, tuple[Any, str]]]) -> list[str]:
    """Set each option's value on its line inside the block of its class_path (the line must exist: the faithful
    recipes list every option explicitly). The comment becomes "plus: <why> (official: <old value>)"."""
    out, pending = [], {cls: set(opts) for cls, opts in options.items()}
    scopes: list[tuple[int, str]] = []  # (least indent of the lines inside, class_path), innermost last
    for line in lines:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if stripped and not stripped.startswith("#"):
            while scopes and indent < scopes[-1][0]:
                scopes.pop()
        if stripped.startswith("- class_path:"):  # a list item: its lines are indented past the dash
            scopes.append((indent + 1, stripped.split("class_path:", 1)[1].split("#")[0].strip()))
        elif stripped.startswith("class_path:"):  # a nested component: its init_args sit at the same indent
            scopes.append((indent, stripped.split("class_path:", 1)[1].split("#")[0].strip()))
        current = scopes[-1][1] if scopes else None
        match = re.match(r"^(\s+)([A-Za-z_]+):\s*([^#]*?)\s*(#.*)?$", line)
        if match and current in options and match.group(2) in options[current]:
            key, old = match.group(2), match.group(3)
            value, why = options[current][key]
            line = f"{match.group(1)}{key}: {_yaml_value(value)}   # plus: {why} (official: {old})"
            pending[current].discard(key)
        out.append(line)
    missing = {cls: sorted(keys) for cls, keys in pending.items() if keys}
    if missing:
        raise SystemExit(f"options not found in the faithful recipe (list them there explicitly): {missing}")
    return out


def main() -> None:
    for family, source in FAMILIES.items():
        lines = (REPO / "configs" / source).read_text().splitlines()
        body = [line for line in lines if not line.startswith("#")]
        header = [
            f"# CoMat on {'SDXL' if family == 'sdxl' else 'Stable Diffusion 1.5'}, plus: configs/{source} with our variants of the",
            "# options marked 'plus' (docs/paper.md). Generated by scripts/make_plus_configs.py; differs",
            "# from the faithful recipe only in those options. Real latents: the faithful recipe's (same base model).",
            f"#   python train.py fit --config configs/comat_plus_{family}.yaml",
        ]
        path = REPO / "configs" / f"comat_plus_{family}.yaml"
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(header + rewrite(body, plus_options(family))) + "\n")
        tmp.replace(path)
        print("wrote", path.relative_to(REPO))


if __name__ == "__main__":
    main()
