"""Capture on MMDiT joint attention (tiny SD3 and FLUX): the transformer's output is unchanged, one map per layer
per recorded step (none from gradient-checkpoint re-runs), rows are distributions over the text tokens equal to the
renormalised image x text block of the full joint softmax, and gradients reach the transformer through the maps."""

from __future__ import annotations

import pytest
import torch

from comat_lightning.attention.capture import AttentionStore, install_capture, joint_attention_layers


@pytest.fixture(scope="module", params=["sd3", "flux"])
def setup(request, tiny_paths):
    from comat_lightning.models.mmdit import MMDiTBackbone

    backbone = MMDiTBackbone.from_pretrained(tiny_paths[request.param], max_sequence_length=32)
    backbone.requires_grad_(False)
    cond = backbone.encode_prompts(["a red car and a blue bus", "a dog"])
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    t = backbone.make_scheduler(4, 8, "cpu").timesteps[1]
    return backbone, cond, latents, t


def _velocity(backbone, latents, t, cond):
    return backbone.velocity(backbone.transformer, latents, t, cond, guidance=3.5)


def test_capture_leaves_the_output_unchanged_and_records_one_map_per_layer(setup):
    backbone, cond, latents, t = setup
    with torch.no_grad():
        plain = _velocity(backbone, latents, t, cond)
    previous = {name: m.processor for name, m in backbone.transformer.named_modules() if hasattr(m, "processor")}
    store = AttentionStore()
    layers = joint_attention_layers(backbone.transformer, 8)
    install_capture(backbone.transformer, layers, store)
    try:
        with torch.no_grad(), store.recording(0, part="all"):
            captured = _velocity(backbone, latents, t, cond)
        assert torch.allclose(captured, plain, atol=1e-6, rtol=0), (captured - plain).abs().max()
        maps = store.maps[0]
        assert sorted(maps) == sorted(layer.name for layer in layers) and store.recorded_calls == len(layers)
        tokens = cond.embeds.shape[1]
        for probs in maps.values():
            assert probs.shape == (2, backbone.transformer.config.num_attention_heads, 16, tokens)
            assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
    finally:
        for name, module in backbone.transformer.named_modules():
            if name in previous:
                module.set_processor(previous[name])


def test_maps_equal_the_renormalised_block_of_the_full_joint_softmax(setup):
    """Independent of the processor: record the layer's q/k inputs through forward hooks on its projections and
    compute the full (N, N) joint softmax by hand."""
    backbone, cond, latents, t = setup
    attn = backbone.transformer.transformer_blocks[0].attn
    seen = {}
    hooks = [getattr(attn, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
             for name in ("to_q", "to_k", "add_q_proj", "add_k_proj")]  # fmt: skip
    store = AttentionStore()
    previous = attn.processor
    install_capture(backbone.transformer, joint_attention_layers(backbone.transformer, 8)[:1], store)
    try:
        with torch.no_grad(), store.recording(0, part="all"):
            _velocity(backbone, latents, t, cond)
    finally:
        attn.set_processor(previous)
        for h in hooks:
            h.remove()
    heads, d = attn.heads, attn.to_q.out_features // attn.heads

    def split(x):
        return x.view(x.shape[0], -1, heads, d)

    def norm(name, x):  # SD3 without qk-norm has None there
        return getattr(attn, name)(x) if getattr(attn, name) is not None else x

    q, k = norm("norm_q", split(seen["to_q"])), norm("norm_k", split(seen["to_k"]))
    tq, tk = norm("norm_added_q", split(seen["add_q_proj"])), norm("norm_added_k", split(seen["add_k_proj"]))
    n_text = tq.shape[1]
    if backbone.family == "sd3":
        query, key = torch.cat([q, tq], 1), torch.cat([k, tk], 1)
        image, text = slice(0, q.shape[1]), slice(q.shape[1], None)
    else:  # text first, RoPE on (text ids 0, image ids (row, column)) as FluxTransformer2DModel builds them
        from diffusers.models.embeddings import apply_rotary_emb

        ids = torch.cat([torch.zeros(n_text, 3), torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(-1, 3)])
        rope = backbone.transformer.pos_embed(ids)
        query = apply_rotary_emb(torch.cat([tq, q], 1), rope, sequence_dim=1)
        key = apply_rotary_emb(torch.cat([tk, k], 1), rope, sequence_dim=1)
        image, text = slice(n_text, None), slice(0, n_text)
    full = (query.transpose(1, 2) @ key.transpose(1, 2).transpose(-1, -2) * d**-0.5).softmax(-1)  # (B, heads, N, N)
    block = full[:, :, image, text]
    expected = block / block.sum(-1, keepdim=True)
    got = next(iter(store.maps[0].values()))
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_gradients_reach_the_transformer_through_the_maps_and_checkpoint_reruns_add_none(setup):
    backbone, cond, latents, t = setup
    transformer = backbone.transformer
    previous = {name: m.processor for name, m in transformer.named_modules() if hasattr(m, "processor")}
    store = AttentionStore()
    layers = joint_attention_layers(transformer, 8)
    install_capture(transformer, layers, store)
    transformer.enable_gradient_checkpointing()
    transformer.train()
    params = [p for n, p in transformer.named_parameters() if "transformer_blocks.0." in n]
    for p in params:
        p.requires_grad_(True)
    try:
        with store.recording(0, part="all"):
            _velocity(backbone, latents, t, cond)
        first = store.maps[0][layers[0].name]
        first[..., 3].sum().backward()  # one text token's attention mass over the image
        assert store.recorded_calls == len(layers) and store.ignored_calls >= 1  # the re-runs were not recorded
        grads = [p.grad for p in params if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads) and all(torch.isfinite(g).all() for g in grads)
    finally:
        transformer.disable_gradient_checkpointing()
        transformer.eval()
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for name, module in transformer.named_modules():
            if name in previous:
                module.set_processor(previous[name])


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_rollout_records_each_prompt_s_own_maps_with_and_without_a_cfg_batch(family, tiny_paths):
    """SD3 runs [uncond, cond] (the maps kept are the second half); FLUX-dev runs the conditional batch alone (all of
    it is kept). Either way a prompt's recorded maps are those it gets when rolled out alone."""
    from comat_lightning.models.mmdit import MMDiTBackbone
    from comat_lightning.sampling.rollout import Rollout
    from comat_lightning.training.options import SamplerConfig

    backbone = MMDiTBackbone.from_pretrained(tiny_paths[family])
    store, layers = AttentionStore(), joint_attention_layers(backbone.transformer, 8)
    install_capture(backbone.transformer, layers, store)
    rollout = Rollout(backbone, SamplerConfig(resolution=64, num_inference_steps=3, guidance_scale=4.0), store, None, device=lambda: torch.device("cpu"))
    assert rollout.cfg_batch == (family == "sd3")
    prompts = ["a red car and a blue bird", "a cat on a chair"]
    with torch.no_grad():
        both = rollout.generate({"prompt": prompts}, seed=5, capture_steps=[1], keep_attention=True).attention.select(1)
        both = {name: maps.clone() for name, maps in both.items()}
        second = rollout.generate({"prompt": prompts[1:]}, seed=5, capture_steps=[1], keep_attention=True, sample_ids=[1]).attention.select(1)
    for name in both:
        assert both[name].shape[0] == 2
        torch.testing.assert_close(both[name][1:], second[name], rtol=0, atol=1e-5)
