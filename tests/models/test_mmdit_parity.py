"""SD3 and FLUX.1 through comat_lightning.models.mmdit + sampling.flow_matching equal diffusers'
StableDiffusion3Pipeline / FluxPipeline latents on the tiny models (same seeds, per-prompt generators), and
gradients of the flow-matching rollout reach exactly the steps the policy picks."""

from __future__ import annotations

import contextlib

import pytest
import torch

PROMPTS = ["a red car and a blue bus", "a dog"]
STEPS = 4


def _ours(path: str, guidance: float) -> tuple[torch.Tensor, object]:
    from comat_lightning.models.mmdit import MMDiTBackbone
    from comat_lightning.sampling.denoising import initial_noise
    from comat_lightning.sampling.flow_matching import flow_denoise

    backbone = MMDiTBackbone.from_pretrained(path, max_sequence_length=32).eval()
    size = 64 // backbone.vae_scale_factor
    scheduler = backbone.make_scheduler(STEPS, size, "cpu")
    generators = [torch.Generator().manual_seed(10 + i) for i in range(len(PROMPTS))]
    noise = initial_noise(len(PROMPTS), backbone.latent_channels, size, generators, "cpu", 1.0)
    cond = backbone.encode_prompts(PROMPTS)
    uncond = None if backbone.guidance_distilled else backbone.encode_prompts([""]).expand(len(PROMPTS))
    with torch.no_grad():
        return flow_denoise(backbone, backbone.transformer, scheduler, cond, uncond, noise, guidance), backbone


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    return (ours - theirs).abs().max().item() <= 5e-5 * max(1.0, theirs.abs().max().item())


def test_sd3_rollout_equals_stable_diffusion_3_pipeline(tiny_paths):
    from diffusers import StableDiffusion3Pipeline

    ours, backbone = _ours(tiny_paths["sd3"], guidance=5.0)
    assert backbone.family == "sd3" and ours.shape == (2, 16, 8, 8)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_paths["sd3"])
    generators = [torch.Generator().manual_seed(10 + i) for i in range(len(PROMPTS))]
    theirs = pipe(PROMPTS, height=64, width=64, num_inference_steps=STEPS, guidance_scale=5.0, max_sequence_length=32,
                  generator=generators, output_type="latent").images  # fmt: skip
    assert _close(ours, theirs), (ours - theirs).abs().max()


def test_flux_rollout_equals_flux_pipeline(tiny_paths):
    from diffusers import FluxPipeline

    ours, backbone = _ours(tiny_paths["flux"], guidance=3.5)
    assert backbone.family == "flux" and backbone.guidance_distilled and ours.shape == (2, 16, 8, 8)
    pipe = FluxPipeline.from_pretrained(tiny_paths["flux"])
    generators = [torch.Generator().manual_seed(10 + i) for i in range(len(PROMPTS))]
    packed = pipe(PROMPTS, height=64, width=64, num_inference_steps=STEPS, guidance_scale=3.5, max_sequence_length=32,
                  generator=generators, output_type="latent").images  # fmt: skip
    theirs = FluxPipeline._unpack_latents(packed, 64, 64, pipe.vae_scale_factor)
    assert _close(ours, theirs), (ours - theirs).abs().max()
    # The decode scaling is the pipeline's too.
    assert torch.equal(backbone.latents_for_vae(ours), ours / 0.3611 + 0.1159)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_gradient_reaches_the_transformer_only_through_gradient_steps(tiny_paths, name):
    from comat_lightning.models.mmdit import MMDiTBackbone
    from comat_lightning.sampling.denoising import initial_noise
    from comat_lightning.sampling.flow_matching import flow_denoise

    backbone = MMDiTBackbone.from_pretrained(tiny_paths[name], max_sequence_length=32)
    backbone.requires_grad_(False)
    backbone.transformer.requires_grad_(True)
    scheduler = backbone.make_scheduler(STEPS, 8, "cpu")
    noise = initial_noise(1, backbone.latent_channels, 8, torch.Generator().manual_seed(0), "cpu", 1.0)
    cond = backbone.encode_prompts(["a cat"])
    uncond = backbone.encode_prompts([""])
    calls = []

    @contextlib.contextmanager
    def hook(step, carries_grad):  # entered around each transformer call: is a graph being built there?
        calls.append((step, carries_grad, torch.is_grad_enabled()))
        yield

    final = flow_denoise(backbone, backbone.transformer, scheduler, cond, uncond, noise, 4.0, gradient_steps=[2], step_hook=hook)
    assert calls == [(0, False, False), (1, False, False), (2, True, True), (3, False, False)]
    final.square().mean().backward()
    grads = [p.grad for p in backbone.transformer.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in backbone.vae.parameters())
