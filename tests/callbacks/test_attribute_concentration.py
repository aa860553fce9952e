"""Attribute concentration: loss values against hand computation, entity filtering, gradients, the callback."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from callbacks.attribute_concentration import (
    AttributeConcentrationLoss,
    EntityTerm,
    entity_losses,
    keep_trainable_entities,
    normalized_sums,
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


def test_official_mask_resize_grows_the_mask_on_a_hand_computed_4x4():
    """torchvision's antialiased bilinear 4 -> 2 is a triangle filter of radius 2 input pixels around each output
    centre (input coordinates 1.0 and 3.0), so input row/column 2 (centre 2.5) lies inside both output cells'
    support: one inside pixel at (2, 2) marks all four 2x2 cells; the area average marks only the cell it is in."""
    mask = torch.zeros(4, 4)
    mask[2, 2] = 1
    assert resize_mask(mask, 2, "bilinear_nonzero").tolist() == [1.0, 1.0, 1.0, 1.0]
    assert resize_mask(mask, 2, "area").tolist() == [0.0, 0.0, 0.0, 0.25]
    # pixel (0, 0), centre 0.5: 0.5 from output centre 1.0, 2.5 from 3.0 (beyond the radius): the top-left cell only
    corner = torch.zeros(4, 4)
    corner[0, 0] = 1
    assert resize_mask(corner, 2, "bilinear_nonzero").tolist() == [1.0, 0.0, 0.0, 0.0]
    # pixel (0, 3): the top-right cell only (row 0 is 2.5 from the lower centre; column 3 is 2.5 from the left one)
    edge = torch.zeros(4, 4)
    edge[0, 3] = 1
    assert resize_mask(edge, 2, "bilinear_nonzero").tolist() == [0.0, 1.0, 0.0, 0.0]


def test_official_mask_resize_matches_torchvision_resize_when_it_imports():
    """Where torchvision imports (not on the build machine: see NOTES.md), its Resize is the official op."""
    transforms = pytest.importorskip("torchvision.transforms", exc_type=ImportError)
    torch.manual_seed(0)
    mask = torch.rand(1, 1, 40, 40) > 0.9
    theirs = (transforms.Resize((8, 8), antialias=True)(mask.float()) > 0).float().flatten()
    torch.testing.assert_close(resize_mask(mask[0, 0].float(), 8, "bilinear_nonzero"), theirs)


def test_entity_losses_sum_layers_and_groups():
    maps8 = torch.full((2, 1, 64, 5), 0.2)  # two layers at 8x8 (one group)
    maps4 = torch.full((1, 1, 16, 5), 0.2)  # one layer at 4x4 (another group)
    mask = torch.zeros(8, 8)
    mask[:, :4] = 1  # the left half
    groups = {("up", 8): maps8, ("mid", 4): maps4}
    token_mean, pixel = entity_losses(groups, [2], mask, "mean", "area")
    token_sum, _ = entity_losses(groups, [2], mask, "sum", "area")
    assert token_mean.item() == pytest.approx(0.25) and token_sum.item() == pytest.approx(0.75)
    # one BCE per group, summed: 2 groups x -(log 0.2 + log 0.8) / 2
    half = -(math.log(0.2) + math.log(0.8)) / 2
    assert pixel.item() == pytest.approx(2 * half, rel=1e-6)
    # bilinear_nonzero: at side 8 the mask is copied; at side 4 column 2 (centre 5.0 in input pixels) reaches input
    # column 3 (centre 3.5): 3 of 4 columns inside -> token (1 - 0.75)^2, pixel -(0.75 log 0.2 + 0.25 log 0.8)
    token_grown, pixel_grown = entity_losses(groups, [2], mask, "sum", "bilinear_nonzero")
    assert token_grown.item() == pytest.approx(0.25 + 0.25 + 0.0625)
    assert pixel_grown.item() == pytest.approx(half - (0.75 * math.log(0.2) + 0.25 * math.log(0.8)), rel=1e-6)


def test_zero_mask_loss_is_one_per_token_and_layer_and_bce_against_nothing():
    """The official code's value for an entity its detector missed: nothing inside the mask, so every token of every
    layer scores (1 - 0)^2 = 1 (constant: no gradient), and the pixel BCE pushes the map to zero everywhere."""
    maps = torch.full((3, 2, 16, 5), 0.2, requires_grad=True)  # 3 layers, 2 heads, 4x4, uniform
    token, pixel = entity_losses({("up", 4): maps}, [1, 3], torch.zeros(1, 1), "sum", "bilinear_nonzero")
    assert token.item() == pytest.approx(3.0)  # 3 layers x mean over 2 tokens of 1
    assert pixel.item() == pytest.approx(-math.log(1 - 0.4), rel=1e-6)  # the entity map is 0.2 + 0.2 = 0.4
    (grad,) = torch.autograd.grad(token + pixel, maps)
    assert grad[..., [1, 3]].gt(0).all() and grad[..., [0, 2, 4]].eq(0).all()  # pixel term only: lower the entity map


def test_normalization_per_sample_counts_a_sample_without_entities():
    """Batch of 3: sample 0 has entities with token losses 1 and 3, sample 2 one with 6, sample 1 none.
    per_sample (official): (mean(1, 3) + 6) / 3 = 8 / 3; per_entity: (1 + 3 + 6) / 3 = 10 / 3."""
    terms = [EntityTerm(0, torch.tensor(1.0), torch.tensor(10.0)), EntityTerm(0, torch.tensor(3.0), torch.tensor(20.0)),
             EntityTerm(2, torch.tensor(6.0), torch.tensor(30.0))]  # fmt: skip
    token, pixel, count = normalized_sums(terms, 3, "per_sample")
    assert (token / count).item() == pytest.approx(8 / 3) and (pixel / count).item() == pytest.approx((15 + 30) / 3)
    token, pixel, count = normalized_sums(terms, 3, "per_entity")
    assert (token / count).item() == pytest.approx(10 / 3) and (pixel / count).item() == pytest.approx(60 / 3)


def test_duplicate_nouns_and_background_words_are_dropped():
    from comat_lightning.text.entities import Entity, Word
    from comat_lightning.text.token_alignment import AlignedEntity

    def aligned(noun, start):
        return AlignedEntity(entity=Entity(noun=Word(noun, start), attributes=(Word("red", 0),)), noun_positions=(start,), attribute_positions=(1,))

    kept = keep_trainable_entities(
        [aligned("car", 1), aligned("car", 5), aligned("sky", 9), aligned("cat", 12)], frozenset({"sky"})
    )
    assert [e.entity.noun.text for e in kept] == ["cat"]


def test_official_entity_filters():
    """The official code's filters: at most 2 attributes, duplicates judged on the noun, and its background list
    also matched without the noun's last letter ("walls" -> "wall", but also "seat" -> "sea")."""
    from callbacks.attribute_concentration import OFFICIAL_BACKGROUND_WORDS
    from comat_lightning.text.entities import Entity, Word
    from comat_lightning.text.token_alignment import AlignedEntity

    def aligned(noun, *attributes, compounds=()):
        words = tuple(Word(a, 0) for a in attributes)
        entity = Entity(noun=Word(noun, 50), attributes=words, compounds=tuple(w for w in words if w.text in compounds))
        return AlignedEntity(entity=entity, noun_positions=(5,), attribute_positions=(1,))

    official = frozenset(OFFICIAL_BACKGROUND_WORDS)
    entities = [aligned("walls", "white"), aligned("seat", "red"), aligned("car", "big", "red", "shiny"), aligned("dog", "brown")]
    kept = keep_trainable_entities(entities, official, "noun", official_plural_rule=True, max_attributes=2)
    assert [e.entity.noun.text for e in kept] == ["dog"]
    kept = keep_trainable_entities(entities, official, "noun", official_plural_rule=False, max_attributes=None)
    assert [e.entity.noun.text for e in kept] == ["walls", "seat", "car", "dog"]  # "walls" is not in the list itself
    # "a teddy bear and a brown bear": the official noun-only phrase makes them duplicates; noun phrases do not
    bears = [aligned("bear", "teddy", compounds=("teddy",)), aligned("bear", "brown")]
    assert keep_trainable_entities(bears, official, "noun") == []
    assert len(keep_trainable_entities(bears, official, "noun_phrase")) == 2


def test_zero_mask_is_refused_for_masks_given_with_the_data():
    from comat_lightning.errors import InputError
    from comat_lightning.judges.masks import JsonlMasks

    with pytest.raises(InputError, match=r"missed_entities='zero_mask' .*JsonlMasks .*use missed_entities: skip"):
        AttributeConcentrationLoss(masks=JsonlMasks(), missed_entities="zero_mask")
    assert AttributeConcentrationLoss(masks=JsonlMasks()).missed_entities == "skip"
    assert AttributeConcentrationLoss().missed_entities == "zero_mask"  # GroundedSAMMasks: a detector
    with pytest.raises(InputError, match=r"normalization must be one of 'per_sample', 'per_entity', got 'per_samples' \(did you mean 'per_sample'\?\)"):
        AttributeConcentrationLoss(masks=JsonlMasks(), normalization="per_samples")


# ------------------------------------------------------------------------------------------ with the tiny model


def _box_rle(top, left, bottom, right, size=64):
    from comat_lightning.files.mask_files import rle_encode

    mask = torch.zeros(size, size)
    mask[top:bottom, left:right] = 1
    return rle_encode(mask, compress=True)


LEFT, RIGHT = _box_rle(8, 0, 56, 32), _box_rle(8, 32, 56, 64)


def _loss_and_module(tiny_paths, **loss_options):
    from conftest import make_module

    from comat_lightning.judges.masks import JsonlMasks

    loss = AttributeConcentrationLoss(masks=JsonlMasks(), **loss_options)
    module = make_module(tiny_paths["sd"], losses=[loss], gradient_checkpointing=True)
    module.train()
    return loss, module


def _generate(module, batch, seed=0):
    steps, capture = module.choose_steps(torch.Generator().manual_seed(seed))
    return module.generate(batch, seed=seed, gradient_steps=steps, capture_steps=capture)


def test_gradient_reaches_lora_through_the_maps_only(tiny_paths):
    loss, module = _loss_and_module(tiny_paths, capture_with_replacement=False)  # always 2 distinct steps
    assert module.needs.decoded_image is False  # JsonlMasks needs no pixels: no VAE decode at all
    batch = {"prompt": ["a red car and a blue bus"], "masks": [{"car": LEFT, "bus": RIGHT}]}
    generated = _generate(module, batch)
    assert generated.images is None and len(generated.attention.steps) == 2
    value, logs = loss.compute(module.loss_context, generated)
    assert value.requires_grad and logs["entities"].item() == 2 and logs["missed"].item() == 0
    value.backward()
    unet = module.backbone.unet
    lora_b = [p.grad for n, p in unet.named_parameters() if "lora_B" in n and p.grad is not None]
    assert lora_b and sum(g.abs().sum() for g in lora_b) > 0
    frozen = [n for n, p in module.named_parameters() if "lora" not in n and (p.requires_grad or p.grad is not None)]
    assert frozen == []


def test_missed_entities_are_skipped_counted_and_the_mean_is_over_contributors(tiny_paths):
    loss, module = _loss_and_module(tiny_paths, normalization="per_entity", missed_entities="skip", mask_resize="area")
    batch = {
        "prompt": ["a red car and a blue bus", "a black cat and a white dog"],
        "masks": [{"car": LEFT, "bus": RIGHT}, {"cat": LEFT}],  # no mask for the dog
    }
    with torch.no_grad():
        generated = _generate(module, batch, seed=4)
        value, logs = loss.compute(module.loss_context, generated)
    assert logs["entities"].item() == 3 and logs["missed"].item() == 1
    # Recompute from the stored maps: mean over the three contributing entities (the dog contributes nothing) of
    # the sums over the captured steps.
    from comat_lightning.files.mask_files import rle_decode

    expected_token, expected_pixel = [], []
    for b, noun, rle in [(0, "car", LEFT), (0, "bus", RIGHT), (1, "cat", LEFT)]:
        positions = _positions(loss, module, generated.records()[b], noun)
        mask = torch.from_numpy(rle_decode(rle)).float()
        per_step = [entity_losses(_sample_groups(generated, loss, step, b), positions, mask, "sum", "area") for step in generated.attention.steps]
        expected_token.append(sum(t for t, _ in per_step))
        expected_pixel.append(sum(p for _, p in per_step))
    token, pixel = sum(expected_token) / 3, sum(expected_pixel) / 3
    torch.testing.assert_close(logs["token"], token)
    torch.testing.assert_close(logs["pixel"], pixel)
    torch.testing.assert_close(value, 1e-3 * token + 5e-5 * pixel)


def _positions(loss, module, record, noun):
    (entity,) = [e for e in loss.trainable_entities(record, module.backbone.tokenizers[0]) if e.entity.noun.text == noun]
    return list(entity.positions)


def _sample_groups(generated, loss, step, b):
    from callbacks.attribute_concentration import _stack_by_group

    return {key: m[:, b] for key, m in _stack_by_group(generated.attention, step, loss.selection, loss.pixel_layer_groups).items()}


def test_hand_written_entities_win_and_prompts_without_entities_give_no_loss(tiny_paths):
    loss, module = _loss_and_module(tiny_paths)
    batch = {
        "prompt": ["a red car and a blue bus", "a car"],
        "masks": [{"car": LEFT, "bus": RIGHT}, {"car": LEFT}],
        "entities": [[{"noun": "bus", "attributes": ["blue"]}], None],
    }
    with torch.no_grad():
        _, logs = loss.compute(module.loss_context, _generate(module, batch))
    assert logs["entities"].item() == 1  # only the hand-written bus; "a car" has no attributed noun
    with torch.no_grad():
        value, logs = loss.compute(module.loss_context, _generate(module, {"prompt": ["a car", "two dogs"]}))
    assert value.item() == 0 and not value.requires_grad and logs["entities"].item() == 0


def test_official_layer_sum_scales_the_token_loss_by_the_layer_count(tiny_paths):
    batch = {"prompt": ["a red car and a blue bus"], "masks": [{"car": LEFT, "bus": RIGHT}]}
    results = {}
    for reduction in ("mean", "sum"):
        loss, module = _loss_and_module(tiny_paths, token_layer_reduction=reduction, resolutions=[4])
        with torch.no_grad():
            results[reduction] = loss.compute(module.loss_context, _generate(module, batch))[1]["token"]
    # at map side 4 the tiny SD UNet has 3 mid/up cross-attention layers, one value each: sum = 3 x mean
    torch.testing.assert_close(results["sum"], 3 * results["mean"])


def test_fit_with_the_tiny_grounded_sam(tiny_paths, tmp_path):
    """The default provider inside a real Trainer.fit: detector + segmenter on the decoded images."""
    from conftest import REPO
    from lightning.pytorch import Trainer

    from comat_lightning.judges.grounded_sam import GroundedSAMMasks
    from comat_lightning.sampling.step_policies import EvenlySpacedSteps
    from comat_lightning.training.module import CoMatModule, OptimizerConfig, SamplerConfig
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
