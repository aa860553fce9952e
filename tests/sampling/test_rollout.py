"""Gradient-step policies and the differentiable rollout's gradient semantics."""

from __future__ import annotations

import pytest
import torch
from conftest import make_module

from comat_lightning.sampling.step_policies import EvenlySpacedSteps, LastSteps, SingleRandomStep


def test_evenly_spaced_steps_covers_every_published_phase():
    policy = EvenlySpacedSteps(5)
    seen = set()
    for seed in range(300):
        steps = policy.select(50, torch.Generator().manual_seed(seed))
        assert len(steps) == 5 and all(b - a == 10 for a, b in zip(steps, steps[1:]))
        seen.add(steps[0])
    assert seen == set(range(10))  # s in [0, 50 - 10 * 4 - 1] = [0, 9], every value reachable
    # Uneven split: 10 steps, K=3 -> interval 3, phase in [0, 10 - 6 - 1] = [0, 3]; the last step stays in range.
    phases = {EvenlySpacedSteps(3).select(10, torch.Generator().manual_seed(s))[0] for s in range(200)}
    assert phases == {0, 1, 2, 3}


def test_evenly_spaced_steps_when_k_does_not_divide_the_step_count():
    """50 steps, K=3: interval 16, phase in [0, 50 - 32 - 1] = [0, 17]. Official range(s, 50, 16): phases 0 and 1
    reach a 4th step (48, 49); exactly-K keeps 3. With K dividing N (50 / 5) both give the same 5 steps."""
    official, exact = EvenlySpacedSteps(3), EvenlySpacedSteps(3, fill_to_end=False)
    by_phase = {}
    for seed in range(400):
        steps = official.select(50, torch.Generator().manual_seed(seed))
        assert steps[:3] == exact.select(50, torch.Generator().manual_seed(seed))
        assert len(steps) == (4 if steps[0] + 48 < 50 else 3)
        by_phase[steps[0]] = steps
    assert set(by_phase) == set(range(18))
    assert by_phase[0] == [0, 16, 32, 48] and by_phase[1] == [1, 17, 33, 49] and by_phase[2] == [2, 18, 34]
    for seed in range(50):
        assert EvenlySpacedSteps(5).select(50, torch.Generator().manual_seed(seed)) == EvenlySpacedSteps(5, fill_to_end=False).select(
            50, torch.Generator().manual_seed(seed)
        )


def test_last_and_single_random_steps():
    gen = torch.Generator().manual_seed(0)
    assert LastSteps(3).select(10, gen) == [7, 8, 9]
    picks = {SingleRandomStep().select(40, torch.Generator().manual_seed(s))[0] for s in range(400)}
    assert picks == set(range(30, 40))  # ReFL's window: t in [30, 39] of 40


@pytest.mark.parametrize("policy", [EvenlySpacedSteps(11), LastSteps(11)])
def test_more_gradient_steps_than_sampling_steps_is_refused(policy):
    with pytest.raises(ValueError, match="exceeds num_inference_steps=10"):
        policy.select(10, torch.Generator())


def test_module_refuses_k_above_steps_before_loading():
    from comat_lightning.training.module import CoMatModule, SamplerConfig

    with pytest.raises(ValueError, match="model.gradient_steps"):
        CoMatModule(pretrained_model="/does/not/exist", sampler=SamplerConfig(num_inference_steps=4), gradient_steps=EvenlySpacedSteps(5))


def _lora_grads(module, detach: bool, checkpointing: bool):
    module.sampler.detach_unet_input = detach
    module.backbone.unet.disable_gradient_checkpointing()
    if checkpointing:
        module.backbone.unet.enable_gradient_checkpointing()
    with torch.no_grad():  # non-zero LoRA so that every LoRA weight gets gradient
        for name, p in module.backbone.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    module.zero_grad()
    latents = module.rollout.sample(["a red car"], torch.Generator().manual_seed(3), gradient_steps=[1, 3])
    latents.square().mean().backward()
    return latents.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["sd", "sd3", "flux"])
def test_detach_flag_changes_gradient_not_values_and_checkpointing_is_exact(tiny_paths, family):
    """On a UNet and on SD3 / FLUX transformers (flow-matching rollout, checkpointed per block): the gradient reaches
    the LoRA weights only; the detach flag changes it but not the values; checkpointing changes nothing."""
    module = make_module(tiny_paths[family])
    attached, g_attached = _lora_grads(module, detach=False, checkpointing=False)
    assert g_attached and all("lora_" in name for name in g_attached), sorted(g_attached)[:5]
    detached, g_detached = _lora_grads(module, detach=True, checkpointing=False)
    torch.testing.assert_close(attached, detached)  # forward values are the same
    diff = max((g_attached[n] - g_detached[n]).abs().max().item() for n in g_attached)
    assert diff > 1e-7  # step 1's UNet sees step 3's gradient only when attached
    # Non-reentrant checkpointing recomputes the same graph: identical gradients, detached input included.
    for detach in (False, True):
        _, plain = _lora_grads(module, detach=detach, checkpointing=False)
        _, ckpt = _lora_grads(module, detach=detach, checkpointing=True)
        assert plain.keys() == ckpt.keys()
        for name in plain:
            torch.testing.assert_close(plain[name], ckpt[name], atol=1e-6, rtol=1e-5)


def test_steps_before_the_first_gradient_step_build_no_graph(tiny_paths):
    module = make_module(tiny_paths["sd"])
    calls = []

    def hook(step, carries_grad):
        calls.append((step, carries_grad, torch.is_grad_enabled()))
        import contextlib

        return contextlib.nullcontext()

    from comat_lightning.sampling.denoising import denoise, initial_noise

    scheduler = module.rollout.make_scheduler()
    scheduler.set_timesteps(4)
    cond = module.backbone.encode_prompts(["a cat"], 64)
    noise = initial_noise(1, 4, 8, torch.Generator().manual_seed(0), "cpu", scheduler.init_noise_sigma)
    out = denoise(module.backbone.unet, scheduler, cond, module.rollout.empty_prompt(), noise, 7.5, gradient_steps=[2], step_hook=hook)
    assert [(s, g) for s, g, _ in calls] == [(0, False), (1, False), (2, True), (3, False)]
    assert out.requires_grad


def test_noise_differs_per_step_and_sample_but_not_across_resume_or_batching(tiny_paths):
    from comat_lightning.sampling.seeds import step_seed

    module = make_module(tiny_paths["sd"])
    seeds = {step_seed(module.seed, module.generator_step) + i for i in range(4)}
    module.generator_step = 1
    seeds |= {step_seed(module.seed, module.generator_step) + i for i in range(4)}
    assert len(seeds) == 8
    module.generator_step = 0
    other = make_module(tiny_paths["sd"])
    assert step_seed(module.seed, module.generator_step) == step_seed(other.seed, other.generator_step)
    # A sample's noise depends on its global index only, not on the batch it is drawn in: rank 1 of two drawing
    # items 1 and 3 of a global batch of 4 gets what one process drawing all four gets for them.
    with torch.no_grad():
        prompts = ["a red car", "a cat", "a blue bird", "a dog"]
        whole = module.generate({"prompt": prompts}, seed=7)
        part = module.generate({"prompt": prompts[1::2]}, seed=7, sample_ids=[1, 3])
    assert part.seeds == whole.seeds[1::2]
    # Same noise; only float rounding of batch-size-dependent kernels differs (measured ~2e-5 over 10 steps).
    torch.testing.assert_close(part.latents, whole.latents[1::2], rtol=0, atol=1e-4)