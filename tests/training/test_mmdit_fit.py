"""`train.py fit` on SD3 / FLUX.1 (tiny://sd3, tiny://flux) with Concept Matching: the LoRA on the transformer
trains, the gradient reaches only LoRA weights, and the exported LoRA loads with the pipelines' load_lora_weights
giving the trained transformer's output. What is not built yet for these families is refused before loading."""

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
def test_losses_that_read_attention_or_a_discriminator_are_refused_before_loading(family, tmp_path, monkeypatch):
    from comat_lightning.models.mmdit import MMDiTBackbone

    monkeypatch.setattr(MMDiTBackbone, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("a model was loaded")))
    concept = {"class_path": "callbacks.ConceptMatchingLoss", "init_args": {"captioner": "tiny://blip"}}
    fidelity = {"class_path": "callbacks.FidelityPreservationLoss", "init_args": {"real_latents": "on_the_fly", "lora_rank": 4}}
    with pytest.raises(ValueError, match=r"training supports ConceptMatchingLoss.* so far; not yet: FidelityPreservationLoss \(its discriminator\)"):
        run_cli(["fit", "--config", _config(tmp_path, family, [concept, fidelity])])
    if family == "flux":  # SD3's attention readers are supported (next test); FLUX's need T5 alignment
        attribute = {"class_path": "callbacks.AttributeConcentrationLoss", "init_args": {"masks": {"class_path": "comat_lightning.JsonlMasks"}, "blocks": ["joint"]}}
        with pytest.raises(ValueError, match=r"not yet: AttributeConcentrationLoss .*FLUX's text keys are T5 tokens"):
            run_cli(["fit", "--config", _config(tmp_path, family, [concept, attribute])])


def test_attribute_concentration_trains_sd3_through_its_joint_attention_maps(tmp_path):
    """SD3's first 77 text keys are its CLIP tokens, so concepts align as in the UNet path: the attribute loss reads
    the captured joint-attention maps (block joint) and its gradient reaches the transformer's LoRA."""
    callbacks = [{"class_path": "callbacks.ConceptMatchingLoss", "init_args": {"captioner": "tiny://blip"}},
                 {"class_path": "callbacks.AttributeConcentrationLoss",
                  "init_args": {"masks": {"class_path": "comat_lightning.JsonlMasks"}, "blocks": ["joint"], "token_weight": 1.0, "pixel_weight": 1.0}}]  # fmt: skip
    cli = run_cli(["fit", "--config", _config(tmp_path, "sd3", callbacks), "--trainer.max_steps=1"])
    module = cli.model
    store = module.attention_store
    assert store.layers and all(layer.block == "joint" for layer in store.layers.values())
    assert len(store.layers) == len(module.backbone.unet.transformer_blocks)
    logged = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    for key in ("train/attribute_concentration", "train/attribute_concentration/token", "train/attribute_concentration/pixel"):
        assert 0 < logged[key] < float("inf"), logged
    assert any(p.abs().max() > 0 for n, p in module.backbone.unet.named_parameters() if "lora_B" in n)


def test_a_unet_block_selection_on_sd3_names_the_joint_layers(tmp_path, monkeypatch):
    from comat_lightning.models.mmdit import MMDiTBackbone

    monkeypatch.setattr(MMDiTBackbone, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("a model was loaded")))
    callbacks = [{"class_path": "callbacks.AttributeConcentrationLoss", "init_args": {"masks": {"class_path": "comat_lightning.JsonlMasks"}}}]
    with pytest.raises(ValueError, match=r"blocks=\['mid', 'up'\] .* match no layer of this SD3 / SD3.5 model; its maps are block joint, side 4"):
        run_cli(["fit", "--config", _config(tmp_path, "sd3", callbacks)])
