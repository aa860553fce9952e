"""The shapes world benchmark's plumbing (benchmarks/shapes, v2): held-out compositions really are unseen, the
committed prompt files and configs are what their generators give, the committed models load through the
framework's from_pretrained path by their short names, the caption grammar, and the interval arithmetic."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import yaml
from conftest import REPO

SHAPES = REPO / "benchmarks" / "shapes"
sys.path.insert(0, str(SHAPES))

import make_configs  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
import world  # noqa: E402


def pairs_of(objects) -> set:
    objects = [tuple(o) for o in objects]
    return {tuple(sorted((a, b))) for i, a in enumerate(objects) for b in objects[i + 1 :]}


def test_composition_space_and_disjoint_splits():
    splits = world.composition_splits()
    sets = {name: set(pairs) for name, pairs in splits.items()}
    assert len(world.OBJECT_TYPES) == 24 and len(world.pair_compositions()) == 240 == sum(len(s) for s in sets.values())
    assert {name: len(s) for name, s in sets.items()} == {"test": 48, "val": 24, "base": 24, "train": 144}
    assert all(not (sets[a] & sets[b]) for a in sets for b in sets if a < b)
    for name, pairs in sets.items():  # every split holds same-shape pairs, the hardest binding case
        assert sum(a[1] == b[1] for a, b in pairs) == len(pairs) // 4, name


def test_held_out_pairs_never_appear_in_training():
    sets = {name: set(pairs) for name, pairs in world.composition_splits().items()}
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(3000):  # base-model training scenes, as train_models.py draws them
        seen |= pairs_of((t.colour, t.shape) for t in world.sample_base_scene(rng, multi_object_rate=0.2, allowed_pairs=sets["base"]))
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
    demo = [json.loads(line) for line in (REPO / "data" / "shapes_demo_val_prompts.jsonl").read_text().splitlines()]
    assert demo == run.demo_validation_records()


def test_the_demo_validates_on_training_compositions_in_both_orders():
    """configs/demo.yaml's validation prompts: 72 of CoMat's training compositions, each in both word orders."""
    demo = run.demo_validation_records()
    pairs = [pairs_of(r["objects"]) for r in demo]
    assert len(demo) == 144 and set().union(*pairs) <= set(world.composition_splits()["train"])
    assert len(set().union(*pairs)) == 72 and len({r["prompt"] for r in demo}) == 144
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    assert config["data"]["val_file"] == "data/shapes_demo_val_prompts.jsonl"


def test_training_prompts_come_in_both_word_orders():
    records = run.training_records()
    assert len(records) == 144 * 2 * 8 and all("masks" not in r for r in records)  # masks come from the images
    first, second = records[0], records[8]  # one pair in its two word orders
    assert first["objects"] == second["objects"][::-1] and world.parse_caption(first["prompt"]) == [tuple(o) for o in first["objects"]]


def test_shape_masks_find_each_noun_in_the_image():
    """The world's detector for attribute concentration finds each shape's pixels in a rendered scene, by noun or by
    colour and noun, and None (an object looked for and not found) otherwise."""
    import torch

    from benchmarks.shapes.shape_masks import ShapeMasks

    things = [world.Thing("red", "circle", 2, 2, 12), world.Thing("blue", "cross", 17, 16, 12)]
    image = torch.from_numpy(world.render(things)).permute(2, 0, 1)[None].float() / 255
    (masks,) = ShapeMasks()(image, [["circle", "cross", "blue circle", "square"]], [{}])
    for mask, thing in zip(masks[:2], things):
        assert torch.equal(mask.bool(), torch.from_numpy(world.thing_mask(thing)))
    assert masks[2] is None and masks[3] is None and ShapeMasks.missing_means_absent


def test_seed_sets_share_prompts_but_not_noise():
    a, b = run.evaluation_records("test", 0), run.evaluation_records("test", 1)
    assert len(a) == 48 * 2 * 4 and [r["prompt"] for r in a] == [r["prompt"] for r in b]
    assert len({r["seed"] for r in a} | {r["seed"] for r in b}) == len(a) + len(b)


def test_generated_configs_are_committed_and_differ_only_as_documented():
    for name, text in make_configs.configs().items():
        assert (SHAPES / "configs" / f"{name}.yaml").read_text() == text, f"run benchmarks/shapes/make_configs.py ({name})"
    full = yaml.safe_load((SHAPES / "configs" / "comat_full.yaml").read_text())
    for variant, kept in make_configs.LOSSES.items():
        ablation = yaml.safe_load((SHAPES / "configs" / f"{variant}.yaml").read_text())
        expected = [c for c in full["trainer"]["callbacks"] if not c["class_path"].endswith("Loss") or c["class_path"].split(".")[-1] in kept]
        assert ablation["trainer"].pop("callbacks") == expected
        assert {**ablation, "trainer": {**ablation["trainer"], "callbacks": None}} == {**full, "trainer": {**full["trainer"], "callbacks": None}}
    assert make_configs.FIT_CONFIGS["max_steps"] * make_configs.ROLLOUTS_PER_STEP >= 20_000  # rollouts per fine-tune
    assert make_configs.FIT_CONFIGS["max_steps"] // make_configs.CHECKPOINT_EVERY >= 6  # learning-curve points
    for name in [*make_configs.configs(), "comat_full"]:  # the curve samples the LoRA of every checkpoint; ExportLoRA prunes it with its checkpoint
        config = yaml.safe_load((SHAPES / "configs" / f"{name}.yaml").read_text())
        checkpoint = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint"))
        assert checkpoint["init_args"]["save_top_k"] == -1 and checkpoint["init_args"]["every_n_train_steps"] == make_configs.CHECKPOINT_EVERY


def test_caption_grammar_and_prompt_files(tmp_path):
    assert world.parse_caption("A red circle and a Blue circle") == [("red", "circle"), ("blue", "circle")]
    for text, message in (("a pink circle", "unknown word 'pink'"), ("a red circle and", "expected 'and a <colour> <shape>'"),
                          ("a red circle and a red square", "share the colour 'red'"), ("red circle", "expected 'a <colour> <shape>'"),
                          ("a red crcle", "did you mean 'circle'")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            world.parse_caption(text)
    good = tmp_path / "mine.txt"
    good.write_text("a red circle and a blue cross\n\na white square\n")
    records = run.file_records(good, 0, 2)
    assert [r["objects"] for r in records] == [[["red", "circle"], ["blue", "cross"]]] * 2 + [[["white", "square"]]] * 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a red circle"}\n{"prompt": "a red circel and a blue cross"}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: unknown word 'circel'; did you mean 'circle'"):
        run.file_records(bad, 0, 1)


def test_committed_models_load_by_short_name_like_hub_checkpoints():
    from diffusers import StableDiffusionPipeline
    from transformers import BlipForConditionalGeneration

    from comat_lightning.tiny.zoo import resolve_model_path

    pipe = StableDiffusionPipeline.from_pretrained(resolve_model_path("shapes://sd"))
    assert pipe.vae_scale_factor == 2 and pipe.unet.config.sample_size == 16 and pipe.tokenizer.model_max_length == 16
    assert pipe.vae.config.scaling_factor != 0.18215  # measured on the world's latents, not copied
    assert all(len(pipe.tokenizer.tokenize(word)) == 1 for word in world.WORDS)  # one token per world word
    blip = BlipForConditionalGeneration.from_pretrained(resolve_model_path("shapes://blip"))
    assert blip.config.vision_config.image_size == world.IMAGE_SIZE
    report_file = json.loads((SHAPES / "models" / "training.json").read_text())
    assert set(report_file) == {"vae", "t2i", "captioner", "check"}
    assert sum(f.stat().st_size for f in (SHAPES / "models").rglob("*") if f.is_file()) < 10 * 2**20  # committed: <= 10 MB


def test_mean_and_interval_over_seeds():
    mean, half = report.mean_ci([0.5, 0.7, 0.6])
    assert mean == pytest.approx(0.6) and half == pytest.approx(4.303 * 0.1 / 3**0.5)
    assert np.isnan(report.mean_ci([0.4])[1])


def test_learning_curve_plot_writes_a_png(tmp_path):
    from PIL import Image

    curve = {"comat_full": {0: [(0, 0.3), (2560, 0.35)], 1: [(0, 0.28), (2560, 0.4)]}, "comat_plus": {0: [(0, 0.3), (2560, 0.45)]}}
    report.plot_curve(curve, tmp_path / "curve.png")
    with Image.open(tmp_path / "curve.png") as image:
        assert image.size == (720, 420) and len(set(image.getdata())) > 3
    assert report.curve_lines(curve)[2].startswith("| 0 | 29.0 ± ")
