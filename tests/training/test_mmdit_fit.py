"""`train.py fit` on SD3 / FLUX.1 (tiny://sd3, tiny://flux): the CoMat losses, the A-STAR training terms and full
fine-tuning train the transformer; the gradient reaches only what should train; the exported LoRA loads with the
pipelines' load_lora_weights giving the trained transformer's output; what differs from the UNet families is
refused before loading."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import REPO, run_cli


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _config(tmp_path, family: str, callbacks: list) -> str:
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "max_epochs": -1, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "num_sanity_val_steps": 0, "enable_model_summary": False, "callbacks": callbacks},
        "model": {"pretrained_model": f"tiny://{family}", "lora": {"rank": 4}, "optimizer": {"lr": 1e-2},
                  "sampler": {"resolution": 64, "num_inference_steps": 5, "guidance_scale": 4.0}},
        "data": {"train_file": str(REPO / "data" / "demo_prompts.jsonl"), "batch_size": 2},
    }  # fmt: skip
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_concept_matching_trains_the_transformer_lora_and_exports_it(family, tmp_path):
    from diffusers import DiffusionPipeline

    from comat_lightning.tiny.zoo import resolve_model_path

    callbacks = [{"class_path": "callbacks.ConceptMatchingLoss", "init_args": {"captioner": "tiny://blip"}},
                 {"class_path": "callbacks.ExportLoRA", "init_args": {"dirpath": str(tmp_path / "lora"), "at_checkpoints": False}}]  # fmt: skip
    cli = run_cli(["fit", "--config", _config(tmp_path, family, callbacks)])
    module = cli.model
    transformer = module.backbone.unet
    trainable = {n for n, p in transformer.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any(p.abs().max() > 0 for n, p in transformer.named_parameters() if "lora_B" in n)  # B left zero: it trained

    pipe = DiffusionPipeline.from_pretrained(resolve_model_path(f"tiny://{family}"))
    pipe.load_lora_weights(str(tmp_path / "lora"))
    backbone = module.backbone.eval()
    cond = backbone.encode_prompts(["a red car"])
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    t = backbone.make_scheduler(5, 8, "cpu").timesteps[2]
    with torch.no_grad():
        ours = backbone.velocity(transformer, latents, t, cond, guidance=4.0)
        theirs = backbone.velocity(pipe.transformer, latents, t, cond, guidance=4.0)
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_tiny_demo_config_trains_all_three_losses_with_its_monitors(family, tmp_path):
    """configs/tiny_demo_<family>.yaml as shipped (loggers, validation metrics, checkpoints, export), 2 steps: every
    CoMat term is finite, the generator's LoRA and the discriminator (its LoRA on the same transformer and its head)
    train, nothing else does, and the maps come from every joint attention layer."""
    from conftest import tensorboard_scalars

    cli = run_cli(["fit", "--config", str(REPO / "configs" / f"tiny_demo_{family}.yaml"), "--trainer.max_steps=2", "--trainer.val_check_interval=2",
                   f"--data.train_file={REPO / 'data' / 'demo_prompts.jsonl'}", f"--data.val_file={REPO / 'data' / 'demo_val_prompts.jsonl'}",
                   "--trainer.logger.init_args.save_dir=runs"])  # fmt: skip
    module = cli.model
    transformer = module.backbone.unet
    assert {layer.block for layer in module.attention_store.layers.values()} == {"joint"}
    assert len(module.attention_store.layers) == len(transformer.transformer_blocks)
    trainable = {n for n, p in transformer.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".discriminator." in n for n in trainable) and any(".default." in n for n in trainable)
    for adapter in ("default", "discriminator"):  # B starts at zero: moved means trained
        assert any(p.abs().max() > 0 for n, p in transformer.named_parameters() if "lora_B" in n and f".{adapter}." in n), adapter
    logged = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    for key in ("train/concept_matching", "train/attribute_concentration/token", "train/attribute_concentration/pixel",
                "train/fidelity_preservation", "train/fidelity_preservation/discriminator"):  # fmt: skip
        assert 0 < logged[key] < float("inf"), (key, logged)
    run = tmp_path / "runs" / f"tiny_demo_{family}" / "version_0"
    scalars = tensorboard_scalars(run)
    assert "val/metrics/concept_overlap" in scalars and "val/metrics/caption_nll" in scalars
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_the_astar_training_terms_read_flux_t5_tokens_and_train_its_lora(tmp_path):
    """FLUX's text keys are its T5 tokens: the concepts of the A-STAR terms are aligned with the T5 tokenizer (no
    start token) and the terms' gradient reaches the LoRA."""
    terms = {"blocks": ["joint"], "resolution": 4, "weight": 1.0}
    callbacks = [{"class_path": "callbacks.AttentionSegregationLoss", "init_args": terms},
                 {"class_path": "callbacks.AttentionRetentionLoss", "init_args": terms}]  # fmt: skip
    cli = run_cli(["fit", "--config", _config(tmp_path, "flux", callbacks), "--trainer.max_steps=1"])
    logged = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert 0 < logged["train/attention_segregation"] < 1 and 0 < logged["train/attention_retention"] < float("inf"), logged
    assert any(p.abs().max() > 0 for n, p in cli.model.backbone.unet.named_parameters() if "lora_B" in n)


def test_full_fine_tuning_trains_every_transformer_weight_against_a_frozen_copy(tmp_path):
    callbacks = [{"class_path": "callbacks.ConceptMatchingLoss", "init_args": {"captioner": "tiny://blip"}}]
    cli = run_cli(["fit", "--config", _config(tmp_path, "sd3", callbacks), "--model.finetune=full", "--trainer.max_steps=1"])
    module = cli.model
    online, base = module.backbone.unet, module.base_unet
    assert all(p.requires_grad for p in online.parameters()) and not any(p.requires_grad for p in base.parameters())
    moved = [n for (n, p), q in zip(online.named_parameters(), base.parameters()) if not torch.equal(p, q)]
    assert len(moved) > len(list(online.parameters())) // 2, moved  # the update reached the transformer's weights


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_separate_discriminator_backbone_is_refused_before_loading(family, tmp_path, monkeypatch):
    from comat_lightning.models.mmdit import MMDiTBackbone

    monkeypatch.setattr(MMDiTBackbone, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("a model was loaded")))
    fidelity = {"class_path": "callbacks.FidelityPreservationLoss", "init_args": {"real_latents": "on_the_fly", "discriminator_model": "tiny://sd"}}
    with pytest.raises(ValueError, match=r"FidelityPreservationLoss.discriminator_model: a separate discriminator backbone is for the UNet families"):
        run_cli(["fit", "--config", _config(tmp_path, family, [fidelity])])


@pytest.mark.parametrize("option", ["unet_path", "vae_path"])
def test_a_replaced_component_is_refused_before_loading_and_by_the_loader(option, tmp_path, monkeypatch):
    from comat_lightning.models import loading
    from comat_lightning.tiny.zoo import resolve_model_path

    component = tmp_path / "component"
    component.mkdir()
    # library callers that skip the start-up checks get the refusal from the loader
    with pytest.raises(ValueError, match=rf"model.{option}: replacing a component is supported for the UNet families only"):
        loading._from_pretrained({"path": resolve_model_path("tiny://sd3"), option: str(component)})
    # train.py refuses in the start-up checks, before the loader is reached
    monkeypatch.setattr(loading, "_from_pretrained", lambda source: pytest.fail("the loader was reached"))
    matching = {"class_path": "callbacks.ConceptMatchingLoss", "init_args": {"captioner": "tiny://blip"}}
    with pytest.raises(ValueError, match=rf"model.{option}: replacing a component is supported for the UNet families only"):
        run_cli(["fit", "--config", _config(tmp_path, "flux", [matching]), f"--model.{option}={component}"])


def test_a_unet_block_selection_on_sd3_names_the_joint_layers(tmp_path, monkeypatch):
    from comat_lightning.models.mmdit import MMDiTBackbone

    monkeypatch.setattr(MMDiTBackbone, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("a model was loaded")))
    callbacks = [{"class_path": "callbacks.AttributeConcentrationLoss", "init_args": {"masks": {"class_path": "comat_lightning.JsonlMasks"}}}]
    with pytest.raises(ValueError, match=r"blocks=\['mid', 'up'\] .* match no layer of this SD3 / SD3.5 model; its maps are block joint, side 4"):
        run_cli(["fit", "--config", _config(tmp_path, "sd3", callbacks)])


@pytest.mark.parametrize("config, index", [
    ("comat_sd35_medium.yaml", "StableDiffusion3Pipeline"), ("astar_sd35_medium.yaml", "StableDiffusion3Pipeline"),
    ("comat_flux1_dev.yaml", "FluxPipeline"), ("astar_flux1_dev.yaml", "FluxPipeline"),
])  # fmt: skip
def test_the_mmdit_recipes_pass_the_checks_at_full_size(config, index, tmp_path, monkeypatch):
    """A pipeline folder with only model_index.json and the 16-channel VAE's config (factor 8) of SD3.5 / FLUX.1:
    every layer the recipe reads exists (joint layers: 32x32 maps at 512 px, 64x64 at 1024 px); nothing loads."""
    import json

    from conftest import instantiate_cli

    from comat_lightning.models.mmdit import MMDiTBackbone
    from comat_lightning.training.losses import active_losses
    from comat_lightning.training.startup_checks import check_model_inputs

    monkeypatch.setattr(MMDiTBackbone, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("a model was loaded")))
    folder = tmp_path / "pipeline"
    (folder / "vae").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": index, "transformer": ["diffusers", "Transformer"], "vae": ["diffusers", "AutoencoderKL"]}))
    (folder / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512], "latent_channels": 16}))
    cli = instantiate_cli(["--config", str(REPO / "configs" / config), "--trainer.logger=false", f"--model.pretrained_model={folder}"])
    module = cli.model
    module.trainer, module.losses = cli.trainer, active_losses(cli.trainer.callbacks)
    check_model_inputs(module, "predict" if config.startswith("astar") else "fit")
