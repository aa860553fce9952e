"""Fidelity preservation: the shared-UNet discriminator, adapter-correct checkpoint re-runs, alternating G/D steps,
LoRA export with two adapters."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from callbacks import FidelityPreservationLoss
from comat_lightning.judges.discriminator import DISCRIMINATOR_ADAPTER


def _module(tiny_paths, family="sd", **overrides):
    from conftest import make_module

    from comat_lightning.training.module import LoraConfig

    # Same rank for both adapters: a re-run under the wrong adapter then fails silently (wrong values), not loudly.
    loss = FidelityPreservationLoss(real_latents="on_the_fly", lora_rank=4)
    module = make_module(tiny_paths[family], losses=[loss], lora=LoraConfig(rank=4), **overrides)
    module.train()
    return loss, module


def _randomise_loras(unet, seed=0):
    """LoRA B starts at zero (the adapter is then a no-op); random weights make each adapter visible."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def _generator_term_grads(module, loss, checkpointing_func):
    """Gradients of the generator term (rollout -> discriminator) w.r.t. both adapters' LoRA weights."""
    unet = module.backbone.unet
    unet.enable_gradient_checkpointing(gradient_checkpointing_func=checkpointing_func)
    unet.zero_grad(set_to_none=True)
    generated = module.generate({"prompt": ["a red car", "a blue bird"]}, seed=5, gradient_steps=[1, 3])
    value, _ = loss.compute(module.loss_context, generated)
    value.backward()
    return {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["sd", "sd3", "flux"])
def test_checkpoint_reruns_use_the_adapter_of_their_forward(tiny_paths, family):
    """One backward crosses the discriminator's denoiser pass (adapter 'discriminator') and the rollout (adapter
    'default'), on a UNet and on SD3 / FLUX transformers (checkpointed per block). Gradients with checkpointing must
    equal those without; a re-run under the wrong adapter changes them."""
    from comat_lightning.models.adapters import checkpoint_keeping_adapters

    loss, module = _module(tiny_paths, family, gradient_checkpointing=True)
    unet = module.backbone.unet
    for param in loss.discriminator_parameters(module.loss_context):  # as Lightning's toggled_optimizer does for the G phase
        param.requires_grad_(False)
    assert set(unet.peft_config) == {"default", DISCRIMINATOR_ADAPTER}
    _randomise_loras(unet)

    def naive(block, *args):  # what a plain checkpoint does: re-runs with whatever adapter is active in backward
        return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)

    unet.disable_gradient_checkpointing()
    unet.zero_grad(set_to_none=True)
    generated = module.generate({"prompt": ["a red car", "a blue bird"]}, seed=5, gradient_steps=[1, 3])
    loss.compute(module.loss_context, generated)[0].backward()
    reference = {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
    # the generator's LoRA gets gradient; the discriminator is frozen during the generator term
    assert reference and not any(f".{DISCRIMINATOR_ADAPTER}." in n for n in reference)

    kept = _generator_term_grads(module, loss, checkpoint_keeping_adapters)
    assert kept.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(kept[name], reference[name], atol=1e-6, rtol=1e-5)

    # The control: a plain checkpoint re-runs the discriminator's blocks under the generator's adapter. Depending on
    # which weights require grad, torch notices (different saved tensors) or the gradients are silently wrong.
    try:
        wrong = _generator_term_grads(module, loss, naive)
    except torch.utils.checkpoint.CheckpointError:
        return
    assert max((wrong[n] - reference[n]).abs().max().item() for n in reference) > 1e-4


def test_generator_term_leaves_the_discriminator_frozen_and_only_generator_lora_is_exported(tiny_paths, tmp_path):
    from diffusers import StableDiffusionPipeline

    from comat_lightning.models.lora_files import save_denoiser_lora

    loss, module = _module(tiny_paths)
    unet = module.backbone.unet
    _randomise_loras(unet, seed=3)
    critic = loss.discriminator_parameters(module.loss_context)
    assert critic and all(p.requires_grad for p in critic)
    assert len(critic) == sum(1 for n, _ in unet.named_parameters() if f".{DISCRIMINATOR_ADAPTER}." in n) + 2  # + head

    save_denoiser_lora(unet, "sd", tmp_path / "lora")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_paths["sd"])
    pipe.load_lora_weights(tmp_path / "lora")
    x, cond = torch.randn(1, 4, 8, 8), module.backbone.encode_prompts(["a red car"], 64)
    with torch.no_grad():
        ours = unet(x, 10, encoder_hidden_states=cond.embeds).sample  # generator adapter active
        theirs = pipe.unet(x, 10, encoder_hidden_states=cond.embeds).sample
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_all_three_losses_alternate_generator_and_discriminator_steps(tiny_paths, tmp_path):
    from conftest import REPO
    from lightning.pytorch import Callback, Trainer

    from callbacks import AttributeConcentrationLoss, ConceptMatchingLoss
    from comat_lightning.judges.masks import JsonlMasks
    from comat_lightning.sampling.step_policies import EvenlySpacedSteps
    from comat_lightning.training.module import CoMatModule, LoraConfig, OptimizerConfig, SamplerConfig
    from datamodules.prompts import PromptDataModule

    class PhaseWatcher(Callback):
        """Snapshots both parameter groups around every optimizer step (torch's step hooks), and their gradients
        after each backward: the generator's backward runs first, then the discriminator's, then both steps."""

        def __init__(self):
            self.events, self.backwards = [], []

        def on_train_start(self, trainer, pl_module):
            generator_opt, critic_opt = trainer.optimizers
            self.groups = {"generator": _params(generator_opt), "discriminator": _params(critic_opt)}
            for phase, opt in (("generator", generator_opt), ("discriminator", critic_opt)):
                opt.register_step_pre_hook(lambda o, a, k, phase=phase: self._before(phase))
                opt.register_step_post_hook(lambda o, a, k, phase=phase: self._after(phase))

        def on_before_backward(self, trainer, pl_module, loss):
            self.backwards.append(("before", self._gradients()))

        def on_after_backward(self, trainer, pl_module):
            self.backwards.append(("after", self._gradients()))

        def _gradients(self):
            return {name: [None if p.grad is None else p.grad.clone() for p in params] for name, params in self.groups.items()}

        def _before(self, phase):
            self.snapshot = {name: [p.detach().clone() for p in params] for name, params in self.groups.items()}

        def _after(self, phase):
            changed = {
                name: any(not torch.equal(before, p) for before, p in zip(self.snapshot[name], params))
                for name, params in self.groups.items()
            }
            self.events.append((phase, changed))

    watcher = PhaseWatcher()
    losses = [
        ConceptMatchingLoss("tiny://blip"),
        AttributeConcentrationLoss(masks=JsonlMasks()),
        FidelityPreservationLoss(real_latents="on_the_fly", lora_rank=4, lr=1e-3),
    ]
    module = CoMatModule(
        pretrained_model="tiny://sd",
        sampler=SamplerConfig(resolution=64, num_inference_steps=4),
        gradient_steps=EvenlySpacedSteps(2),
        lora=LoraConfig(rank=4),
        optimizer=OptimizerConfig(lr=1e-2),
    )
    data = PromptDataModule(train_file=str(REPO / "data" / "demo_prompts.jsonl"), batch_size=2)
    trainer = Trainer(
        accelerator="cpu", max_steps=3, callbacks=[*losses, watcher], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, data)

    assert module.generator_step == 3 and trainer.global_step == 3  # max_steps counts generator steps
    assert [phase for phase, _ in watcher.events] == ["generator", "discriminator"] * 3
    for phase, changed in watcher.events:
        other = "discriminator" if phase == "generator" else "generator"
        assert changed[phase] and not changed[other], (phase, changed)
    # Per step: before/after the generator's backward, then before/after the discriminator's.
    assert [when for when, _ in watcher.backwards] == ["before", "after"] * 6
    grads = [g for _, g in watcher.backwards]
    for _, after_generator, before_discriminator, after_discriminator in zip(*(grads[i::4] for i in range(4))):
        # No gradient leaks across: the generator's loss leaves the discriminator without gradient, and the
        # discriminator's backward leaves the generator's (clipped) gradient exactly as it was.
        assert all(g is None or not g.any() for g in after_generator["discriminator"])
        assert any(g is not None and g.any() for g in after_generator["generator"])
        pairs = zip(before_discriminator["generator"], after_discriminator["generator"])
        assert all(a is b or (a is not None and b is not None and torch.equal(a, b)) for a, b in pairs)
        assert any(g is not None and g.any() for g in after_discriminator["discriminator"])
    metrics = trainer.logged_metrics
    for name in ("concept_matching", "attribute_concentration", "fidelity_preservation", "fidelity_preservation/discriminator"):
        assert torch.isfinite(metrics[f"train/{name}"]), name


def _params(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


def test_separate_discriminator_backbone_for_sdxl(tiny_paths):
    """Official SDXL setting: an SD1.5-style UNet (its own empty prompt, its own LoRA) judges SDXL latents."""
    from conftest import make_module

    from comat_lightning.training.module import LoraConfig

    loss = FidelityPreservationLoss(real_latents="on_the_fly", lora_rank=4, discriminator_model=tiny_paths["sd"])
    module = make_module(tiny_paths["sdxl"], losses=[loss], lora=LoraConfig(rank=4))
    module.train()
    discriminator = module.loss_modules[loss.name]
    assert discriminator.unet is not module.backbone.unet and DISCRIMINATOR_ADAPTER not in module.backbone.unet.peft_config
    assert discriminator.empty_prompt.embeds.shape[-1] == discriminator.unet.config.cross_attention_dim != module.backbone.unet.config.cross_attention_dim
    generated = module.generate({"prompt": ["a red car", "a cat"]}, seed=1, gradient_steps=[3])
    d_loss, logs = loss.discriminator_loss(module.loss_context, generated)
    d_loss.backward()
    critic = loss.discriminator_parameters(module.loss_context)
    assert all(p.grad is not None for p in critic) and 0 < logs["real_score"] < 1
    trainable = module.trainable_state_keys()
    assert any(k.startswith(f"loss_modules.{loss.name}.backbone.") and ".discriminator." in k for k in trainable)
    assert not any(".discriminator." in k for k in trainable if k.startswith("backbone."))


@pytest.mark.parametrize("reduction, factor", [("concat_mean", 0.5), ("sum_of_means", 1.0)])
def test_discriminator_loss_reductions_on_hand_computed_logits(tiny_paths, reduction, factor):
    """Head weights 0, bias ln 3: every logit is ln 3, sigmoid 0.75. Fake (target 0) costs -ln 0.25 = ln 4 per pixel,
    real (target 1) -ln 0.75. Official: one mean over [fake; real] = (ln 4 + ln 4/3) / 2; ours: their sum."""
    import math

    from conftest import make_module

    from comat_lightning.training.module import LoraConfig

    loss = FidelityPreservationLoss(real_latents="on_the_fly", lora_rank=4, discriminator_reduction=reduction)
    module = make_module(tiny_paths["sd"], losses=[loss], lora=LoraConfig(rank=4))
    head = module.loss_modules[loss.name].head
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(math.log(3))
    generated = module.generate({"prompt": ["a red car", "a cat", "a dog"]}, seed=2)
    value, logs = loss.discriminator_loss(module.loss_context, generated)
    assert value.item() == pytest.approx(factor * (math.log(4) + math.log(4 / 3)), rel=1e-6)
    assert logs["real_score"].item() == pytest.approx(0.75) and logs["fake_accuracy"].item() == 0.0
    value.backward()
    assert head.bias.grad.item() == pytest.approx(factor * 2 * ((0.75 - 0) + (0.75 - 1)) / 2, rel=1e-5)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_on_a_transformer_the_discriminator_is_its_second_lora_at_the_last_step(tiny_paths, family):
    """On SD3 / FLUX the logits are Linear(16, 1) of the transformer's velocity per latent pixel, computed with only
    the 'discriminator' adapter active, at the sampler's last timestep, on the empty prompt (FLUX-dev: with the
    sampler's guidance value); the generator term is BCE(logits, 1). Recomputed here from those pieces."""
    import torch.nn.functional as F

    from comat_lightning.models.adapters import using_adapter

    loss, module = _module(tiny_paths, family)
    transformer, backbone = module.backbone.unet, module.backbone
    assert set(transformer.peft_config) == {"default", DISCRIMINATOR_ADAPTER}
    _randomise_loras(transformer)
    discriminator = module.loss_modules[loss.name]
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    last = backbone.make_scheduler(module.sampler.num_inference_steps, 8, "cpu").timesteps[-1]
    with torch.no_grad():
        with using_adapter(transformer, DISCRIMINATOR_ADAPTER):
            velocity = backbone.velocity(transformer, latents, last, module.rollout.empty_prompt().expand(2), guidance=module.sampler.guidance_scale)
        expected = discriminator.head(velocity.permute(0, 2, 3, 1)).squeeze(-1)  # (B, h, w)
        with using_adapter(transformer, "default"):
            generator_view = backbone.velocity(transformer, latents, last, module.rollout.empty_prompt().expand(2), guidance=module.sampler.guidance_scale)
        logits = discriminator(latents)
    assert logits.shape == (2, 8, 8) and (generator_view - velocity).abs().max() > 1e-3  # the adapters differ
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)

    value, _ = loss.compute(module.loss_context, SimpleNamespace(latents=latents))  # compute reads the latents only
    assert value.item() == pytest.approx(F.binary_cross_entropy_with_logits(expected, torch.ones_like(expected)).item(), rel=1e-5)
