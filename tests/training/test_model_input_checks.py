"""Options checked against the model a run will load, before any weights load: its paths, the VAE factor, the
cross-attention layers that exist at the sampling resolution (for attention losses, guidance and evaluation) and the
modules LoRA targets; all read from config files (comat_lightning/training/startup_checks.py)."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import REPO, instantiate_cli, run_cli
from support.loading_guard import refuse_model_loads

from comat_lightning.errors import InputError, MissingInputFile

DEMO = REPO / "configs" / "tiny_demo.yaml"


@pytest.fixture
def no_model_loads(monkeypatch):
    refuse_model_loads(monkeypatch)


def _module(path: str = "tiny://sd", resolution: int = 64, **overrides):
    from comat_lightning.sampling.step_policies import EvenlySpacedSteps
    from comat_lightning.training.module import CoMatModule, SamplerConfig

    return CoMatModule(pretrained_model=path, sampler=SamplerConfig(resolution=resolution, num_inference_steps=4), gradient_steps=EvenlySpacedSteps(2), **overrides)


def test_module_paths_are_refused_before_any_model_loads(tmp_path, no_model_loads, tiny_paths):
    from comat_lightning.training.startup_checks import check_model_inputs

    for option, kwargs in {
        "model.pretrained_model": dict(path=str(tmp_path / "sd")),
        "model.unet_path": dict(unet_path=str(tmp_path / "unet")),
        "model.vae_path": dict(vae_path="./no_vae_here"),
        "model.lora_weights": dict(lora_weights=str(tmp_path / "lora.safetensors")),
    }.items():
        path = kwargs.pop("path", tiny_paths["sd"])
        with pytest.raises(MissingInputFile, match=rf"^{option}=.*does not exist"):
            check_model_inputs(_module(path, **kwargs), "fit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingInputFile, match=r"model.pretrained_model: .*empty is a folder but has no model_index.json"):
        check_model_inputs(_module(str(tmp_path / "empty")), "fit")


def test_a_hub_id_that_cannot_be_read_offline_is_left_to_the_loader(no_model_loads):
    from comat_lightning.training.startup_checks import check_model_inputs, read_model_layout

    module = _module("nobody-here/no-such-model")  # HF_HUB_OFFLINE=1 (conftest): its configs cannot be read
    assert read_model_layout(module.model_source) is None
    check_model_inputs(module, "fit")


# ------------------------------------------------------------------------------------------------ the model's layers


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_the_layout_from_configs_has_the_loaded_models_layers(family, tiny_paths):
    from comat_lightning.attention.capture import cross_attention_layers
    from comat_lightning.models.backbone import DiffusionBackbone
    from comat_lightning.training.startup_checks import read_model_layout

    layout = read_model_layout({"path": tiny_paths[family]})
    loaded = DiffusionBackbone.from_pretrained(tiny_paths[family])
    assert layout.vae_factor == loaded.vae_scale_factor
    assert {p.device.type for p in layout.unet.parameters()} == {"meta"}  # nothing was allocated
    for latent in (8, 16):
        assert cross_attention_layers(layout.unet, latent) == cross_attention_layers(loaded.unet, latent)
    assert [n for n, _ in layout.unet.named_modules()] == [n for n, _ in loaded.unet.named_modules()]


def test_attention_layers_the_model_lacks_are_refused_before_loading(no_model_loads):
    from callbacks import AttentionSegregationLoss, AttributeConcentrationLoss
    from comat_lightning.judges.masks import JsonlMasks
    from comat_lightning.sampling.guided import AStarGuidance
    from comat_lightning.training.startup_checks import check_model_inputs

    module = _module(guidance=AStarGuidance(), guidance_resolution=32)
    module.losses = [AttributeConcentrationLoss(masks=JsonlMasks(), resolutions=[16]), AttentionSegregationLoss(resolution=4)]
    with pytest.raises(InputError) as caught:
        check_model_inputs(module, "fit")
    message = str(caught.value)
    assert ("AttributeConcentrationLoss (name 'attribute_concentration') blocks / resolutions: blocks=['mid', 'up'] resolutions=[16] "
            "match no cross-attention layer of model.pretrained_model='tiny://sd' at model.sampler.resolution=64 (latent 8x8); "
            "its map sides are down: 4, 8; mid: 4; up: 4, 8") in message  # fmt: skip
    assert "model.guidance_blocks / model.guidance_resolution: blocks=['down', 'mid', 'up'] resolutions=[32]" in message
    assert "AttentionSegregationLoss" not in message  # its 4x4 layers exist
    module = _module(guidance=AStarGuidance())  # default: latent / 4 = 2, which the tiny UNet lacks
    with pytest.raises(InputError, match=r"model.guidance_blocks / model.guidance_resolution: .* resolutions=\[2\]"):
        check_model_inputs(module, "predict")


def test_lora_targets_the_model_lacks_are_refused_before_loading(no_model_loads):
    from callbacks import FidelityPreservationLoss
    from comat_lightning.training.options import LoraConfig
    from comat_lightning.training.startup_checks import check_model_inputs

    module = _module(lora=LoraConfig(rank=4, target_modules=["to_q", "to_query"]))
    module.losses = [FidelityPreservationLoss(real_latents="on_the_fly", target_modules=["attn1"])]  # not a Linear layer
    with pytest.raises(InputError) as caught:
        check_model_inputs(module, "fit")
    assert "model.lora.target_modules: ['to_query'] name no Linear/Conv layer" in str(caught.value)
    assert "FidelityPreservationLoss (name 'fidelity_preservation') target_modules: ['attn1']" in str(caught.value)
    assert "'to_out.0', 'to_q'" in str(caught.value)  # what the UNet has
    check_model_inputs(_module(lora=LoraConfig(rank=4, target_modules=["to_query"])), "predict")  # predict adds no LoRA


FULL_SIZE_UNETS = {  # the published UNet configs (benchmarks/full_size_models.py builds the same architectures)
    "sd15": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
    "sdxl": dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}  # fmt: skip


def _config_only_pipeline(folder: Path, family: str) -> Path:
    """A pipeline folder with the configs of a full-size model and no weights: all the checks read."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        UNet2DConditionModel(**FULL_SIZE_UNETS[family]).save_config(folder / "unet")
        AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                      block_out_channels=(128, 256, 512, 512), layers_per_block=2).save_config(folder / "vae")  # fmt: skip
    index = {"_class_name": "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline"}
    (folder / "model_index.json").write_text(json.dumps(index | ({"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]} if family == "sdxl" else {})))
    return folder


@pytest.mark.parametrize("config, family, stage", [("comat_sd15.yaml", "sd15", "fit"), ("comat_sdxl.yaml", "sdxl", "fit"), ("astar_sd15.yaml", "sd15", "predict")])
def test_the_published_recipes_pass_the_checks_at_full_size(config, family, stage, tmp_path, no_model_loads):
    from comat_lightning.training.losses import active_losses
    from comat_lightning.training.startup_checks import check_model_inputs, read_model_layout

    folder = _config_only_pipeline(tmp_path / family, family)
    cli = instantiate_cli(["--config", str(REPO / "configs" / config), "--trainer.logger=false", f"--model.pretrained_model={folder}"])
    module = cli.model
    module.trainer, module.losses = cli.trainer, active_losses(cli.trainer.callbacks)
    check_model_inputs(module, stage)
    from comat_lightning.attention.capture import cross_attention_layers

    layers = cross_attention_layers(read_model_layout(module.model_source).unet, 64)  # 512 px
    sides = {block: sorted({layer.resolution for layer in layers if layer.block == block}) for block in ("down", "mid", "up")}
    assert sides == ({"down": [16, 32, 64], "mid": [8], "up": [16, 32, 64]} if family == "sd15" else {"down": [16, 32], "mid": [16], "up": [16, 32]})


def test_sdxl_has_no_64_px_maps_at_512_px(tmp_path, no_model_loads):
    from callbacks import AttributeConcentrationLoss
    from comat_lightning.judges.masks import JsonlMasks
    from comat_lightning.training.startup_checks import check_model_inputs

    module = _module(str(_config_only_pipeline(tmp_path / "sdxl", "sdxl")), resolution=512)
    module.losses = [AttributeConcentrationLoss(masks=JsonlMasks(), resolutions=[64])]
    with pytest.raises(InputError, match=r"resolutions=\[64\] match no cross-attention layer .* \(latent 64x64\); its map sides are down: 16, 32; mid: 16; up: 16, 32"):
        check_model_inputs(module, "fit")


def test_a_resolution_the_vae_cannot_encode_is_refused_from_its_config(tmp_path, tiny_paths, no_model_loads):
    from comat_lightning.training.startup_checks import check_model_inputs

    folder = tmp_path / "sd16"
    shutil.copytree(tiny_paths["sd"], folder)
    config = json.loads((folder / "vae" / "config.json").read_text())
    config["block_out_channels"] = [8] * 5  # a VAE with factor 16
    config["down_block_types"], config["up_block_types"] = [config["down_block_types"][0]] * 5, [config["up_block_types"][0]] * 5
    (folder / "vae" / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=rf"model.sampler.resolution=72: not divisible by the VAE factor 16 of model.pretrained_model='{folder}'"):
        check_model_inputs(_module(str(folder), resolution=72), "fit")
    (folder / "unet" / "config.json").unlink()
    with pytest.raises(InputError, match=r"model.pretrained_model=.*: the folder has no readable unet/config.json"):
        check_model_inputs(_module(str(folder), resolution=64), "fit")


def test_the_module_setup_checks_the_model_before_loading(tmp_path, monkeypatch, no_model_loads):
    from comat_lightning.training.module import CoMatModule

    if "check_model_inputs" not in inspect.getsource(CoMatModule.setup):
        pytest.skip("CoMatModule.setup does not call comat_lightning.input_checks.check_model_inputs yet")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(REPO / "data")
    cfg = yaml.safe_load(DEMO.read_text())
    for callback in cfg["trainer"]["callbacks"]:
        if callback["class_path"] == "callbacks.AttributeConcentrationLoss":
            callback["init_args"]["resolutions"] = [16]  # the tiny UNet's maps are 4x4 and 8x8 at 64 px
    config = tmp_path / "sixteen.yaml"
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(InputError, match=r"AttributeConcentrationLoss \(name 'attribute_concentration'\) .* resolutions=\[16\] match no cross-attention layer"):
        run_cli(["fit", "--config", str(config), "--trainer.logger=false"])
