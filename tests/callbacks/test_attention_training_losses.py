"""A-STAR's losses as training callbacks (experimental): values, gradients, and a real fit without CoMat losses."""

from __future__ import annotations

import torch

from callbacks import AttentionRetentionLoss, AttentionSegregationLoss
from comat_lightning.attention.concept_maps import binarize, retention_loss, segregation_loss


def test_values_match_the_guidance_maths_and_reach_lora(tiny_paths):
    from conftest import make_module

    losses = [AttentionSegregationLoss(resolution=8), AttentionRetentionLoss(resolution=8)]
    module = make_module(tiny_paths["sd"], losses=losses)
    module.train()
    steps, capture = module.choose_steps(torch.Generator().manual_seed(0))
    assert len(capture) == 2
    generated = module.generate({"prompt": ["a cat and a dog", "a red car and a blue bird"]}, seed=0, gradient_steps=steps, capture_steps=capture)
    segregation, _ = losses[0].compute(module.loss_context, generated)
    retention, _ = losses[1].compute(module.loss_context, generated)
    per_step = losses[0].maps_per_step(module, generated)
    first, second = sorted(per_step)
    expected_seg = torch.stack([segregation_loss(m) for s in (first, second) for m in per_step[s].values()]).mean()
    expected_ret = torch.stack([retention_loss(per_step[second][b], binarize(per_step[first][b])) for b in per_step[second]]).mean()
    torch.testing.assert_close(segregation, expected_seg)
    torch.testing.assert_close(retention, expected_ret)
    assert 0 < segregation.item() < 0.5 and 1.0 <= retention.item() <= 2.0  # two concepts per prompt
    (segregation + retention).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in module.backbone.unet.named_parameters() if "lora_B" in n)


def test_fit_with_the_astar_losses_instead_of_comat(tiny_paths, tmp_path):
    from conftest import REPO
    from lightning.pytorch import Trainer

    from comat_lightning.sampling.step_policies import EvenlySpacedSteps
    from comat_lightning.training.module import CoMatModule, LoraConfig, OptimizerConfig, SamplerConfig
    from datamodules.prompts import PromptDataModule

    module = CoMatModule(pretrained_model="tiny://sd", sampler=SamplerConfig(resolution=64, num_inference_steps=4),
                         gradient_steps=EvenlySpacedSteps(2), lora=LoraConfig(rank=4), optimizer=OptimizerConfig(lr=1e-2))  # fmt: skip
    trainer = Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path,
                      callbacks=[AttentionSegregationLoss(resolution=8), AttentionRetentionLoss(resolution=8)])  # fmt: skip
    trainer.fit(module, PromptDataModule(train_file=str(REPO / "data" / "astar_prompts.jsonl"), batch_size=2))
    metrics = trainer.logged_metrics
    assert module.generator_step == 2
    assert torch.isfinite(metrics["train/attention_segregation"]) and torch.isfinite(metrics["train/attention_retention"])
