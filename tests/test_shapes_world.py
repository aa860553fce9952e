"""The shapes world benchmark's plumbing (benchmarks/shapes): held-out compositions really are unseen, the committed
prompt files are what the generator gives, the CoMat ablation configs differ only by removed losses, the committed
models load through the framework's from_pretrained path, and the benchmark's interval arithmetic."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import yaml

from conftest import REPO

SHAPES = REPO / "benchmarks" / "shapes"
sys.path.insert(0, str(SHAPES))

import run  # noqa: E402
import world  # noqa: E402


def pairs_of(objects) -> set:
    objects = [tuple(o) for o in objects]
    return {tuple(sorted((a, b))) for i, a in enumerate(objects) for b in objects[i + 1 :]}


def test_splits_are_disjoint_and_held_out_pairs_never_appear_in_training():
    splits = world.composition_splits()
    sets = {name: set(pairs) for name, pairs in splits.items()}
    assert sum(len(s) for s in sets.values()) == len(world.pair_compositions()) == 60
    assert all(not (sets[a] & sets[b]) for a in sets for b in sets if a < b)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(3000):  # base-model training scenes, as train_models.py draws them
        things = world.sample_base_scene(rng, multi_object_rate=0.2, allowed_pairs=sets["base"])
        seen |= pairs_of((t.colour, t.shape) for t in things)
    assert seen == sets["base"]  # every base pair is seen, and nothing else
    finetune = set().union(*(pairs_of(r["objects"]) for r in run.training_records()))
    assert finetune == sets["train"]
    for split in ("val", "test"):
        held_out = set().union(*(pairs_of(r["objects"]) for r in run.evaluation_records(split, 0)))
        assert held_out == sets[split] and not held_out & (seen | finetune)


def test_committed_prompt_files_are_the_generators_output():
    expected = {"train": run.training_records(), "val": run.evaluation_records("val", 0), "test": run.evaluation_records("test", 0)}
    for split, records in expected.items():
        lines = (SHAPES / "data" / f"{split}_prompts.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == records, split


def test_training_masks_are_the_rendered_objects():
    from comat_lightning.masks import rle_decode

    record = run.training_records()[0]
    colours = {shape: colour for colour, shape in record["objects"]}
    rendered = np.asarray(world.render(world.scene(np.random.default_rng(0), world.composition_splits()["train"][0])))
    for shape, rle in record["masks"].items():
        mask = rle_decode(rle).astype(bool)
        assert (rendered[mask] == world.PALETTE[colours[shape]]).all() and mask.sum() >= 28


def test_seed_sets_share_prompts_but_not_noise():
    a, b = run.evaluation_records("test", 0), run.evaluation_records("test", 1)
    assert [r["prompt"] for r in a] == [r["prompt"] for r in b]
    assert len({r["seed"] for r in a} | {r["seed"] for r in b}) == len(a) + len(b)


@pytest.mark.parametrize("variant, kept", [("comat_concept", {"ConceptMatchingLoss"}), ("comat_attribute", {"ConceptMatchingLoss", "AttributeConcentrationLoss"})])
def test_ablation_configs_differ_from_the_full_config_only_by_removed_losses(variant, kept):
    full = yaml.safe_load((SHAPES / "configs" / "comat_full.yaml").read_text())
    ablation = yaml.safe_load((SHAPES / "configs" / f"{variant}.yaml").read_text())
    expected = [c for c in full["trainer"]["callbacks"] if not c["class_path"].endswith("Loss") or c["class_path"].split(".")[-1] in kept]
    assert ablation["trainer"].pop("callbacks") == expected
    full["trainer"].pop("callbacks")
    assert ablation == full


def test_committed_models_load_like_hub_checkpoints():
    from diffusers import StableDiffusionPipeline
    from transformers import BlipForConditionalGeneration

    pipe = StableDiffusionPipeline.from_pretrained(SHAPES / "models" / "sd")
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 8 and pipe.tokenizer.model_max_length == 32
    assert pipe.vae.config.scaling_factor != 0.18215  # measured on the world's latents, not copied
    assert BlipForConditionalGeneration.from_pretrained(SHAPES / "models" / "blip").config.vision_config.image_size == world.IMAGE_SIZE
    report = json.loads((SHAPES / "models" / "training.json").read_text())
    assert set(report) == {"vae", "t2i", "captioner"}


def test_mean_and_interval_over_seeds():
    mean, half = run.mean_ci([0.5, 0.7, 0.6])
    assert mean == pytest.approx(0.6) and half == pytest.approx(4.303 * 0.1 / 3**0.5)
    assert np.isnan(run.mean_ci([0.4])[1])
