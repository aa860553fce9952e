"""Attribute concentration: loss values against hand computation, entity filtering, gradients, the callback."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from callbacks.attribute_concentration import (
    AttributeConcentrationLoss,
    entity_losses,
    keep_trainable_entities,
    pixel_loss,
    resize_mask,
    token_loss,
)


def _maps(probs_for_token: torch.Tensor, tokens: int = 5, position: int = 2) -> torch.Tensor:
    """(L, heads, HW, T) maps whose token ``position`` has the given (L, heads, HW) probabilities and the rest of
    each row spread evenly over the other tokens."""
    rest = (1 - probs_for_token)[..., None] / (tokens - 1)
    maps = rest.expand(*probs_for_token.shape, tokens).clone()
    maps[..., position] = probs_for_token
    return maps


def test_map_fully_inside_its_mask_gives_zero_token_loss():
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0])
    maps = _maps(torch.tensor([[[0.9, 0.3, 0.0, 0.0], [0.2, 0.6, 0.0, 0.0]]]))  # (L=1, heads=2, HW=4)
    assert token_loss(maps, [2], mask).item() == pytest.approx(0.0, abs=1e-7)


def test_uniform_map_gives_the_hand_computed_token_loss():
    maps = torch.full((1, 2, 4, 5), 0.2)  # every pixel attends to every token equally
    # binary mask over half the pixels: inside share 1/2 for every head -> (1 - 1/2)^2
    assert token_loss(maps, [2], torch.tensor([1.0, 1.0, 0.0, 0.0])).item() == pytest.approx(0.25)
    # soft mask: inside share (1 + 0.5) / 4 = 0.375 -> 0.625^2
    assert token_loss(maps, [2], torch.tensor([1.0, 0.5, 0.0, 0.0])).item() == pytest.approx(0.390625)
    # two tokens of the entity, two layers: still the same value (means over tokens and per layer)
    two_layers = torch.full((2, 2, 4, 5), 0.2)
    torch.testing.assert_close(token_loss(two_layers, [1, 3], torch.tensor([1.0, 1.0, 0.0, 0.0])), torch.tensor([0.25, 0.25]))


def test_head_mean_is_taken_inside_the_square():
    # head 0 attends only inside, head 1 only outside: mean share 0.5 -> (1 - 0.5)^2 = 0.25 (not mean of 0 and 1)
    maps = _maps(torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]]]))
    assert token_loss(maps, [2], torch.tensor([1.0, 1.0, 0.0, 0.0])).item() == pytest.approx(0.25)


def test_pixel_loss_is_bce_of_the_summed_head_and_layer_averaged_map():
    torch.manual_seed(0)
    maps = torch.rand(3, 2, 16, 7).softmax(-1)  # (L, heads, HW, T)
    mask = (torch.rand(16) > 0.5).float()
    expected = F.binary_cross_entropy(maps[..., [1, 4]].sum(-1).mean(dim=(0, 1)), mask)
    torch.testing.assert_close(pixel_loss(maps, [1, 4], mask), expected)
    # hand value: uniform 0.2 against a half mask = -(log 0.2 + log 0.8) / 2
    uniform = torch.full((1, 1, 4, 5), 0.2)
    hand = -(math.log(0.2) + math.log(0.8)) / 2
    assert pixel_loss(uniform, [0], torch.tensor([1.0, 0.0, 1.0, 0.0])).item() == pytest.approx(hand, rel=1e-6)


def test_pixel_loss_runs_in_fp32_under_autocast():
    maps = torch.full((1, 1, 4, 5), 0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = pixel_loss(maps, [0], torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert value.dtype == torch.float32


def test_resize_mask_is_the_covered_fraction():
    mask = torch.zeros(8, 8)
    mask[:4, :2] = 1  # top-left quarter cell of 4x4 blocks: columns 0-1 of rows 0-3
    small = resize_mask(mask, 2)
    torch.testing.assert_close(small, torch.tensor([0.5, 0.0, 0.0, 0.0]))


def test_entity_losses_layer_reduction_and_resolution_average():
    maps8 = torch.full((2, 1, 64, 5), 0.2)  # two layers at 8x8
    maps4 = torch.full((1, 1, 16, 5), 0.2)  # one layer at 4x4
    mask = torch.zeros(8, 8)
    mask[:, :4] = 1  # half the image
    token_mean, pixel = entity_losses({8: maps8, 4: maps4}, [2], mask, "mean")
    token_sum, _ = entity_losses({8: maps8, 4: maps4}, [2], mask, "sum")
    assert token_mean.item() == pytest.approx(0.25) and token_sum.item() == pytest.approx(0.75)
    assert pixel.item() == pytest.approx(-(math.log(0.2) + math.log(0.8)) / 2, rel=1e-6)


def test_duplicate_nouns_and_background_words_are_dropped():
    from comat_lightning.prompt_parsing import Entity, Word
    from comat_lightning.token_alignment import AlignedEntity

    def aligned(noun, start):
        return AlignedEntity(entity=Entity(noun=Word(noun, start), attributes=(Word("red", 0),)), noun_positions=(start,), attribute_positions=(1,))

    kept = keep_trainable_entities(
        [aligned("car", 1), aligned("car", 5), aligned("sky", 9), aligned("cat", 12)], frozenset({"sky"})
    )
    assert [e.entity.noun.text for e in kept] == ["cat"]


# ------------------------------------------------------------------------------------------ with the tiny model


def _box_rle(top, left, bottom, right, size=64):
    from comat_lightning.masks import rle_encode

    mask = torch.zeros(size, size)
    mask[top:bottom, left:right] = 1
    return rle_encode(mask, compress=True)


LEFT, RIGHT = _box_rle(8, 0, 56, 32), _box_rle(8, 32, 56, 64)


def _loss_and_module(tiny_paths, **loss_options):
    from comat_lightning.masks import JsonlMasks
    from conftest import make_module

    loss = AttributeConcentrationLoss(masks=JsonlMasks(), **loss_options)
    module = make_module(tiny_paths["sd"], losses=[loss], gradient_checkpointing=True)
    module.train()
    return loss, module


def _generate(module, batch, seed=0):
    steps, capture = module.choose_steps(torch.Generator().manual_seed(seed))
    return module.generate(batch, seed=seed, gradient_steps=steps, capture_steps=capture)


def test_gradient_reaches_lora_through_the_maps_only(tiny_paths):
    loss, module = _loss_and_module(tiny_paths)
    assert module.needs.decoded_image is False  # JsonlMasks needs no pixels: no VAE decode at all
    batch = {"prompt": ["a red car and a blue bus"], "masks": [{"car": LEFT, "bus": RIGHT}]}
    generated = _generate(module, batch)
    assert generated.images is None and len(generated.attention.steps) == 2
    value, logs = loss.compute(module, generated)
    assert value.requires_grad and logs["entities"].item() == 2 and logs["missed"].item() == 0
    value.backward()
    unet = module.backbone.unet
    lora_b = [p.grad for n, p in unet.named_parameters() if "lora_B" in n and p.grad is not None]
    assert lora_b and sum(g.abs().sum() for g in lora_b) > 0
    frozen = [n for n, p in module.named_parameters() if "lora" not in n and (p.requires_grad or p.grad is not None)]
    assert frozen == []


def test_missed_entities_are_skipped_counted_and_the_mean_is_over_contributors(tiny_paths):
    loss, module = _loss_and_module(tiny_paths)
    batch = {
        "prompt": ["a red car and a blue bus", "a black cat and a white dog"],
        "masks": [{"car": LEFT, "bus": RIGHT}, {"cat": LEFT}],  # no mask for the dog
    }
    with torch.no_grad():
        generated = _generate(module, batch, seed=4)
        value, logs = loss.compute(module, generated)
    assert logs["entities"].item() == 3 and logs["missed"].item() == 1
    # Recompute from the stored maps: mean over the three contributing entities (the dog contributes nothing).
    from callbacks.attribute_concentration import _stack_by_resolution
    from comat_lightning.masks import rle_decode

    tokenizer = module.backbone.tokenizers[0]
    records = generated.records()
    expected_token, expected_pixel = [], []
    for b, noun, rle in [(0, "car", LEFT), (0, "bus", RIGHT), (1, "cat", LEFT)]:
        (entity,) = [e for e in loss.trainable_entities(records[b], tokenizer) if e.entity.noun.text == noun]
        mask = torch.from_numpy(rle_decode(rle)).float()
        per_step = [
            entity_losses({s: m[:, b] for s, m in _stack_by_resolution(generated.attention, step, loss.selection).items()},
                          list(entity.positions), mask, "mean")
            for step in generated.attention.steps
        ]  # fmt: skip
        expected_token.append(sum(t for t, _ in per_step) / len(per_step))
        expected_pixel.append(sum(p for _, p in per_step) / len(per_step))
    token, pixel = sum(expected_token) / 3, sum(expected_pixel) / 3
    torch.testing.assert_close(logs["token"], token)
    torch.testing.assert_close(logs["pixel"], pixel)
    torch.testing.assert_close(value, 1e-3 * token + 5e-5 * pixel)


def test_hand_written_entities_win_and_prompts_without_entities_give_no_loss(tiny_paths):
    loss, module = _loss_and_module(tiny_paths)
    batch = {
        "prompt": ["a red car and a blue bus", "a car"],
        "masks": [{"car": LEFT, "bus": RIGHT}, {"car": LEFT}],
        "entities": [[{"noun": "bus", "attributes": ["blue"]}], None],
    }
    with torch.no_grad():
        _, logs = loss.compute(module, _generate(module, batch))
    assert logs["entities"].item() == 1  # only the hand-written bus; "a car" has no attributed noun
    with torch.no_grad():
        value, logs = loss.compute(module, _generate(module, {"prompt": ["a car", "two dogs"]}))
    assert value.item() == 0 and not value.requires_grad and logs["entities"].item() == 0


def test_official_layer_sum_scales_the_token_loss_by_the_layer_count(tiny_paths):
    batch = {"prompt": ["a red car and a blue bus"], "masks": [{"car": LEFT, "bus": RIGHT}]}
    results = {}
    for reduction in ("mean", "sum"):
        loss, module = _loss_and_module(tiny_paths, token_layer_reduction=reduction, resolutions=[4])
        with torch.no_grad():
            results[reduction] = loss.compute(module, _generate(module, batch))[1]["token"]
    # at map side 4 the tiny SD UNet has 3 mid/up cross-attention layers, one value each: sum = 3 x mean
    torch.testing.assert_close(results["sum"], 3 * results["mean"])


def test_fit_with_the_tiny_grounded_sam(tiny_paths, tmp_path):
    """The default provider inside a real Trainer.fit: detector + segmenter on the decoded images."""
    from lightning.pytorch import Trainer

    from comat_lightning.grounded_sam import GroundedSAMMasks
    from comat_lightning.module import CoMatModule, OptimizerConfig, SamplerConfig
    from comat_lightning.rollout import EvenlySpacedSteps
    from conftest import REPO
    from datamodules.prompts import PromptDataModule

    # Low thresholds: a random tiny detector rarely clears the published 0.3 / 0.25 with an exact phrase.
    loss = AttributeConcentrationLoss(masks=GroundedSAMMasks("tiny://grounding-dino", "tiny://sam", box_threshold=0.0, text_threshold=0.7))
    module = CoMatModule(
        pretrained_model="tiny://sd",
        sampler=SamplerConfig(resolution=64, num_inference_steps=4),
        gradient_steps=EvenlySpacedSteps(2),
        optimizer=OptimizerConfig(lr=1e-2),
    )
    data = PromptDataModule(train_file=str(REPO / "data" / "demo_prompts.jsonl"), batch_size=2)
    trainer = Trainer(
        accelerator="cpu", max_steps=2, callbacks=[loss], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, data)
    metrics = trainer.logged_metrics
    assert module.generator_step == 2 and module.needs.decoded_image
    assert metrics["train/attribute_concentration/entities"] + metrics["train/attribute_concentration/missed"] > 0
    assert torch.isfinite(metrics["train/attribute_concentration"])
    assert module.attention_store.maps == {}  # cleared after every step
