"""`train.py predict` on SD3 / FLUX.1 (tiny://sd3, tiny://flux): plain sampling equals StableDiffusion3Pipeline /
FluxPipeline images, with our exported LoRA too; guidance (not built yet for these families) is refused before any weight
loads."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import run_cli

PROMPTS = [{"prompt": "a red car and a blue bird", "seed": 7}, {"prompt": "a cat on a chair", "seed": 11}]


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # LightningCLI writes config.yaml to the working folder without a logger


def _config(tmp_path, model: dict, guidance_scale: float) -> str:
    config = {
        "trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                    "callbacks": [{"class_path": "callbacks.ImageWriter", "init_args": {"output_dir": str(tmp_path / "out")}}]},
        "model": {"sampler": {"resolution": 64, "num_inference_steps": 5, "guidance_scale": guidance_scale}, **model},
        "data": {"train_file": str(tmp_path / "prompts.jsonl"), "batch_size": 2},
    }  # fmt: skip
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    path = tmp_path / "predict.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _pngs(folder):
    import numpy as np
    from PIL import Image

    return {p.stem: torch.from_numpy(np.asarray(Image.open(p), dtype=np.float32) / 255) for p in sorted(folder.glob("*.png"))}


def _reference(pipe, guidance_scale: float):
    generators = [torch.Generator().manual_seed(r["seed"]) for r in PROMPTS]
    return pipe([r["prompt"] for r in PROMPTS], num_inference_steps=5, guidance_scale=guidance_scale, height=64, width=64,
                max_sequence_length=32, generator=generators, output_type="np").images  # fmt: skip


def _assert_same_images(ours, reference):
    for key, image in zip(["00000-s7", "00001-s11"], reference):
        reference_8bit = torch.from_numpy((image * 255).round() / 255).float()
        assert (ours[key] - reference_8bit).abs().max() <= 1 / 255 + 1e-6  # equal up to one 8-bit level


@pytest.mark.parametrize("family, guidance_scale", [("sd3", 5.0), ("flux", 3.5)])
def test_plain_predict_equals_the_diffusers_pipeline_with_and_without_lora(family, guidance_scale, tiny_paths, tmp_path):
    from diffusers import DiffusionPipeline
    from peft import LoraConfig

    from comat_lightning.models.lora_files import save_denoiser_lora

    run_cli(["predict", "--config", _config(tmp_path, {"pretrained_model": tiny_paths[family]}, guidance_scale), "--return_predictions", "false"])
    pipe = DiffusionPipeline.from_pretrained(tiny_paths[family])
    _assert_same_images(_pngs(tmp_path / "out"), _reference(pipe, guidance_scale))

    # A LoRA of ours on the transformer: predict with model.lora_weights equals the pipeline after load_lora_weights.
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights="gaussian"))
    with torch.no_grad():
        for name, param in pipe.transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(3)) * 0.3)
    folder = save_denoiser_lora(pipe.transformer, family, tmp_path / "lora")
    fresh = DiffusionPipeline.from_pretrained(tiny_paths[family])
    fresh.load_lora_weights(str(folder))
    (tmp_path / "out").rename(tmp_path / "plain")
    model = {"pretrained_model": tiny_paths[family], "lora_weights": str(folder)}
    run_cli(["predict", "--config", _config(tmp_path, model, guidance_scale), "--return_predictions", "false"])
    with_lora = _pngs(tmp_path / "out")
    _assert_same_images(with_lora, _reference(fresh, guidance_scale))
    assert any((with_lora[k] - v).abs().max() > 2 / 255 for k, v in _pngs(tmp_path / "plain").items())  # the LoRA acts


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_guidance_is_refused_before_loading(family, tiny_paths, tmp_path, monkeypatch):
    from comat_lightning.models.mmdit import MMDiTBackbone

    monkeypatch.setattr(MMDiTBackbone, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("a model was loaded")))
    guided = _config(tmp_path, {"pretrained_model": tiny_paths[family], "guidance": {"class_path": "comat_lightning.AStarGuidance"}}, 4.0)
    with pytest.raises(ValueError, match="AStarGuidance on .* is not supported yet"):
        run_cli(["predict", "--config", guided])
