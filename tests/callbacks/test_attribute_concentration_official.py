"""Attribute concentration against the official CoMat code's formula (CaraJ7/CoMat at 5eadcce), re-written here in
its loop form and fed the same maps and masks as our vectorised loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_attribute_concentration import LEFT, _generate

from callbacks.attribute_concentration import AttributeConcentrationLoss
from comat_lightning.judges.masks import MaskProvider


class _GivenMasks(MaskProvider):
    """A detector-like provider (a missing mask = the object was not found) that returns fixed masks by phrase, so
    that the official formulas can be fed exactly the masks our loss sees."""

    needs_images = False

    def __init__(self, by_phrase: dict[str, torch.Tensor]):
        super().__init__()
        self.by_phrase = by_phrase

    def forward(self, images, phrases, records):
        return [[self.by_phrase.get(p) for p in sample] for sample in phrases]


def _official_reference(store, steps, samples, batch_size):
    """The official attribute concentration loss, written from its formulas (attn_utils/tc_loss_utils.py
    get_grounding_loss_by_layer and attr_concen_utils/gsam_interface.py get_mask_loss at 5eadcce) in their loop
    form, independently of our vectorised code. samples[b] = list of (token positions, (H, W) mask or None)."""
    token_total, pixel_total = 0.0, 0.0
    for b, entities in enumerate(samples):
        if not entities:
            continue
        for step in steps:
            groups: dict = {}
            for name, probs in store.maps[step].items():  # per layer: (B, heads, HW, T)
                layer = store.layers[name]
                groups.setdefault(f"{layer.block}_{layer.resolution}", []).append((layer.resolution, probs[b]))
            for key, layers in groups.items():
                res = layers[0][0]
                masks = []
                for _, mask in entities:  # torchvision Resize((res, res), antialias=True), then > 0
                    full = torch.zeros(1, 1, 8, 8) if mask is None else mask[None, None].float()
                    masks.append((F.interpolate(full, size=(res, res), mode="bilinear", antialias=True) > 0).float()[0])
                token_loss_value = 0.0
                for _, probs in layers:
                    heads = probs.shape[0]
                    attn = probs.reshape(heads, res, res, probs.shape[-1])
                    for (positions, _), mask in zip(entities, masks):
                        obj = 0.0
                        for k in positions:
                            ca = attn[..., k]
                            act = (ca * mask).reshape(heads, -1).sum(-1) / ca.reshape(heads, -1).sum(-1)
                            obj = obj + (1.0 - act.mean()) ** 2
                        token_loss_value = token_loss_value + obj / len(positions)
                token_loss_value = token_loss_value / len(entities)
                avg = torch.stack([p.reshape(-1, res, res, p.shape[-1]).mean(0) for _, p in layers]).mean(0)
                pixel_loss_value = 0.0
                for (positions, _), mask in zip(entities, masks):
                    word = torch.stack([avg[..., k] for k in positions]).sum(0)[None]
                    pixel_loss_value = pixel_loss_value + torch.nn.BCELoss()(word, mask)
                pixel_loss_value = pixel_loss_value / len(entities)
                token_total, pixel_total = token_total + token_loss_value, pixel_total + pixel_loss_value
    return token_total / batch_size, pixel_total / batch_size


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_default_options_compute_the_official_formula(tiny_paths, family):
    """With the recipes' (official) settings, on the same maps and masks, our loss equals the official formula:
    masks grown by bilinear-nonzero, layer sums, mid and up groups apart, missed entities as zero masks, sums over
    steps and groups, mean over a sample's entities, divided by the batch size (the 3rd sample has no entity).
    Tolerance: float32 reassociation only (rtol 1e-5)."""
    from conftest import make_module

    from comat_lightning.files.mask_files import rle_decode

    car = torch.from_numpy(rle_decode(LEFT)).float()
    cat = torch.zeros(64, 64)
    cat[3:30, 37:61] = 1  # a box whose edges cut map cells at every resolution (bilinear_nonzero grows it)
    loss = AttributeConcentrationLoss(masks=_GivenMasks({"car": car, "cat": cat}))
    assert (loss.token_layer_reduction, loss.pixel_layer_groups, loss.mask_resize, loss.normalization, loss.missed_entities) == (
        "sum", "block_and_resolution", "bilinear_nonzero", "per_sample", "zero_mask")  # fmt: skip
    module = make_module(tiny_paths[family], losses=[loss])
    module.loss_modules[loss.name] = loss.build(module.loss_context)
    batch = {"prompt": ["a red car and a blue bus", "a black cat and a white dog", "two dogs"]}
    generated = _generate(module, batch, seed=3)
    value, logs = loss.compute(module.loss_context, generated)
    assert logs["entities"].item() == 4 and logs["missed"].item() == 2  # bus and dog: no mask, trained towards zero
    samples = []
    for record in generated.records():
        entities = loss.trainable_entities(record, module.backbone.tokenizers[0])
        samples.append([(list(e.positions), {"car": car, "cat": cat}.get(e.entity.noun.text)) for e in entities])
    blocks = {store_layer.block for store_layer in generated.attention.layers.values()}
    assert blocks == {"mid", "up"}  # both groups at the mid block's side are really there
    token, pixel = _official_reference(generated.attention, generated.attention.steps, samples, batch_size=3)
    torch.testing.assert_close(logs["token"], token.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(logs["pixel"], pixel.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(value, 1e-3 * token + 5e-5 * pixel, rtol=1e-5, atol=1e-9)
    # and the gradient reaches the LoRA through the maps
    value.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in module.backbone.unet.named_parameters() if "lora_B" in n)


