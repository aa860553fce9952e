"""Cross-attention capture: shapes, normalisation, no change to the UNet's output, checkpoint re-runs ignored."""

from __future__ import annotations

import pytest
import torch

from comat_lightning.attention.capture import (
    AttentionCaptureProcessor,
    AttentionStore,
    CaptureRequest,
    LayerSelection,
    choose_capture_steps,
    cross_attention_layers,
    install_capture,
    select_layers,
)

# Cross-attention layers of the tiny models at 64 px (8x8 latents): (block, map side) -> number of layers.
TINY_LAYOUT = {
    "sd": {("down", 8): 1, ("down", 4): 1, ("mid", 4): 1, ("up", 4): 2, ("up", 8): 2},
    "sdxl": {("down", 4): 2, ("mid", 4): 2, ("up", 4): 4},
}
HEADS = {"sd": 8, "sdxl": 4}


def _backbone(path):
    from comat_lightning.models.backbone import DiffusionBackbone

    return DiffusionBackbone.from_pretrained(path)


def _unet_call(backbone, latents, prompts):
    cond = backbone.encode_prompts(prompts, 64)
    return backbone.unet(latents, 10, encoder_hidden_states=cond.embeds, added_cond_kwargs=cond.added_cond_kwargs()).sample


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_layers_maps_shapes_rows_and_output_unchanged(family, tiny_paths):
    from diffusers.models.attention_processor import AttnProcessor2_0

    backbone = _backbone(tiny_paths[family])
    layers = cross_attention_layers(backbone.unet, latent_size=8)
    layout: dict = {}
    for layer in layers:
        layout[(layer.block, layer.resolution)] = layout.get((layer.block, layer.resolution), 0) + 1
    assert layout == TINY_LAYOUT[family]

    latents = torch.randn(2, 4, 8, 8)
    prompts = ["a red car", "a black cat and a white dog"]
    with torch.no_grad():
        reference = _unet_call(backbone, latents, prompts)
    chosen = select_layers(backbone.unet, LayerSelection(blocks=("mid", "up")), latent_size=8)
    store = AttentionStore()
    install_capture(backbone.unet, chosen, store)
    # Only the chosen layers leave SDPA.
    processors = backbone.unet.attn_processors
    names = {layer.name for layer in chosen}
    for key, processor in processors.items():
        expected = AttentionCaptureProcessor if key.removesuffix(".processor") in names else AttnProcessor2_0
        assert isinstance(processor, expected), key
    with torch.no_grad(), store.recording(step=7, part="all"):
        captured = _unet_call(backbone, latents, prompts)
    torch.testing.assert_close(captured, reference, atol=1e-5, rtol=1e-5)
    assert store.steps == [7] and set(store.maps[7]) == names
    for name, probs in store.maps[7].items():
        side = store.layers[name].resolution
        assert probs.shape == (2, HEADS[family], side * side, 77) and probs.dtype == torch.float32
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-5, rtol=0)


def test_cond_part_keeps_the_second_half_and_outside_windows_nothing_is_kept(tiny_paths):
    backbone = _backbone(tiny_paths["sd"])
    store = AttentionStore()
    install_capture(backbone.unet, select_layers(backbone.unet, LayerSelection(("mid",)), 8), store)
    latents = torch.randn(1, 4, 8, 8).repeat(2, 1, 1, 1)
    with torch.no_grad():
        _unet_call(backbone, latents, ["a cat", "a cat"])  # outside a window: ignored
        assert store.maps == {} and store.ignored_calls == 1
        with store.recording(step=0, part="all"):
            _unet_call(backbone, latents, ["", "a red car"])
        with store.recording(step=1, part="cond"):
            _unet_call(backbone, latents, ["", "a red car"])
    (name,) = store.maps[1]
    assert store.maps[1][name].shape[0] == 1
    torch.testing.assert_close(store.maps[1][name][0], store.maps[0][name][1])
    assert not torch.allclose(store.maps[0][name][0], store.maps[0][name][1])


def test_selection_errors_name_what_exists(tiny_paths):
    backbone = _backbone(tiny_paths["sd"])
    with pytest.raises(ValueError, match=r"resolutions=\(16,\).*\('mid', 4\)"):
        select_layers(backbone.unet, LayerSelection(("mid",), resolutions=(16,)), 8)
    with pytest.raises(ValueError, match="blocks"):
        LayerSelection(("middle",))


def test_checkpoint_recompute_is_ignored_and_maps_carry_gradient_into_lora(tiny_paths):
    from conftest import make_module

    module = make_module(tiny_paths["sd"], gradient_checkpointing=True)
    module.train()
    unet = module.backbone.unet
    layers = select_layers(unet, LayerSelection(("mid", "up")), 8)
    install_capture(unet, layers, module.attention_store)
    module.needs = type(module.needs)(attention=CaptureRequest(LayerSelection(("mid", "up"))))  # generate() exposes the store
    generated = module.generate({"prompt": ["a red car", "a blue cat"]}, seed=3, gradient_steps=[1, 3], capture_steps=[1, 3])
    store = generated.attention
    assert store.steps == [1, 3] and store.recorded_calls == 2 * len(layers)
    assert all(set(store.maps[s]) == {layer.name for layer in layers} for s in store.steps)
    assert all(m.requires_grad for s in store.steps for m in store.maps[s].values())
    ignored_before = store.ignored_calls
    # A loss on the maps alone; its backward re-runs the checkpointed blocks (the processor fires again) while a
    # recording window is open: those calls must be ignored, not recorded or refused.
    loss = sum(m[..., 2].mean() for s in store.steps for m in store.maps[s].values())
    with store.recording(step=99):
        loss.backward()
    assert store.maps[99] == {} and store.recorded_calls == 2 * len(layers)
    assert store.ignored_calls - ignored_before >= 2 * len(layers)  # the re-runs happened and were ignored
    lora_grads = [p.grad for n, p in unet.named_parameters() if "lora_B" in n and p.grad is not None]
    assert lora_grads and any(g.abs().sum() > 0 for g in lora_grads)
    assert all(p.grad is None for n, p in unet.named_parameters() if "lora" not in n)


def test_recording_twice_in_one_window_is_refused(tiny_paths):
    backbone = _backbone(tiny_paths["sd"])
    store = AttentionStore()
    install_capture(backbone.unet, select_layers(backbone.unet, LayerSelection(("mid",)), 8), store)
    latents = torch.randn(2, 4, 8, 8)
    with torch.no_grad(), store.recording(step=0, part="all"):
        _unet_call(backbone, latents, ["a", "b"])
        with pytest.raises(RuntimeError, match="recorded twice"):
            _unet_call(backbone, latents, ["a", "b"])


def test_choose_capture_steps():
    steps = [3, 13, 23, 33, 43]
    for seed in range(20):
        chosen = choose_capture_steps(steps, 2, with_replacement=False, generator=torch.Generator().manual_seed(seed))
        assert len(chosen) == 2 and set(chosen) <= set(steps) and chosen == sorted(chosen)
    with_replacement = [
        choose_capture_steps(steps, 2, with_replacement=True, generator=torch.Generator().manual_seed(seed)) for seed in range(40)
    ]
    assert {len(c) for c in with_replacement} == {1, 2}  # a repeated draw records one step only
    assert choose_capture_steps(steps, 9, False, torch.Generator().manual_seed(0)) == steps
    assert choose_capture_steps([], 2, False, torch.Generator()) == []
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert choose_capture_steps(steps, 2, False, g1) == choose_capture_steps(steps, 2, False, g2)
