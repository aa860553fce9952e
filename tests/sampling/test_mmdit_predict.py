"""`train.py predict` on SD3 / FLUX.1 (tiny://sd3, tiny://flux): plain sampling equals StableDiffusion3Pipeline /
FluxPipeline images, with our exported LoRA too; concepts align with the tokenizer whose tokens are the text keys;
A-STAR / Attend-and-Excite guidance steps the latent against the gradient of the joint-attention concept maps."""

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
def test_concepts_are_key_positions_of_the_tokenizer_that_makes_the_text_keys(family, tiny_paths):
    """SD3's first 77 text keys are CLIP tokens (0 = the start token); FLUX's are T5 tokens (no start token)."""
    from comat_lightning.models.mmdit import MMDiTBackbone
    from comat_lightning.sampling.prediction import concept_positions
    from comat_lightning.text.entities import EntityParser

    backbone = MMDiTBackbone.from_pretrained(tiny_paths[family])
    keys = backbone.text_keys
    prompt = "a red car and a blue bird"
    words, positions = concept_positions({"prompt": prompt, "concepts": ["car", "bird"]}, keys, EntityParser())
    ids = keys.tokenizer(prompt).input_ids
    assert [keys.tokenizer.decode([ids[p]]).strip() for p in positions] == ["car", "bird"]
    if family == "flux":
        assert keys.tokenizer is backbone.tokenizers[-1] and (keys.first, keys.end) == (0, backbone.max_sequence_length - 1)
        assert positions == [2, 6]  # T5, no start token: "a", "red", "car", "and", "a", "blue", "bird", "</s>"
    else:
        assert keys.tokenizer is backbone.tokenizers[0] and (keys.first, keys.end) == (1, 76)
        assert positions[0] == 3  # CLIP: <start>, "a", "red", "car", ...
    with pytest.raises(ValueError, match=r"token_indices \[99\] must lie in"):
        concept_positions({"prompt": prompt, "token_indices": [99]}, keys, EntityParser())


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_guided_step_moves_the_latent_against_the_concept_map_gradient(family, tiny_paths):
    """Guided sampling on an MMDiT = the flow-matching loop started from z0 - alpha_0 * d loss / d z0, where the loss is
    A-STAR's segregation of the concept maps read from the conditional pass's joint attention (FLUX-dev: with its
    guidance embedding, no unconditional pass). Computed here step by step and compared with ``guided_sample``."""
    from comat_lightning.attention.capture import AttentionStore, install_capture, joint_attention_layers
    from comat_lightning.attention.concept_maps import average_maps, concept_maps, segregation_loss, step_sizes
    from comat_lightning.models.mmdit import MMDiTBackbone
    from comat_lightning.sampling.flow_matching import flow_denoise
    from comat_lightning.sampling.guided import AStarGuidance, guided_sample
    from comat_lightning.sampling.prediction import concept_positions
    from comat_lightning.text.entities import EntityParser

    backbone = MMDiTBackbone.from_pretrained(tiny_paths[family])
    model, keys, steps, scale = backbone.transformer, backbone.text_keys, 4, 4.0
    store, layers = AttentionStore(), joint_attention_layers(backbone.transformer, 8)
    install_capture(model, layers, store)
    names = [layer.name for layer in layers]
    prompt = "a red car and a blue bird"
    _, indices = concept_positions({"prompt": prompt, "concepts": ["car", "bird"]}, keys, EntityParser())
    cond, uncond = backbone.encode_prompts([prompt]), backbone.encode_prompts([""])
    start = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))

    guided, last_maps = guided_sample(backbone, model, backbone.make_scheduler(steps, 8, "cpu"), cond, uncond, start, scale,
                                      AStarGuidance(max_iter_to_alter=1), [indices], store, names)  # fmt: skip

    scheduler = backbone.make_scheduler(steps, 8, "cpu")
    z = start.clone().requires_grad_(True)
    with store.recording(0, part="all"):
        backbone.velocity(model, z, scheduler.timesteps[0], cond, guidance=scale)
    recorded = store.maps.pop(0)
    (maps,) = concept_maps(average_maps([recorded[n] for n in names]), [indices], first=keys.first, end=keys.end)
    (grad,) = torch.autograd.grad(segregation_loss(maps), z)  # step 0: no retention target yet
    moved = start - step_sizes(steps, 20.0)[0] * grad
    expected = flow_denoise(backbone, model, scheduler, cond, uncond, moved.detach(), scale)
    assert grad.abs().max() > 0 and (moved - start).abs().max() > 1e-4
    torch.testing.assert_close(guided, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(last_maps[0], maps.detach())


@pytest.mark.parametrize("family, guidance", [("sd3", "AStarGuidance"), ("flux", "AttendAndExciteGuidance")])
def test_guided_predict_writes_images_and_concept_maps(family, guidance, tiny_paths, tmp_path):
    model = {"pretrained_model": tiny_paths[family], "guidance": {"class_path": f"comat_lightning.{guidance}"}}
    run_cli(["predict", "--config", _config(tmp_path, model, 4.0), "--return_predictions", "false"])
    images = _pngs(tmp_path / "out")
    assert sorted(images) == ["00000-s7", "00001-s11"]
    manifest = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert all(entry["settings"]["guidance"]["class"] == guidance for entry in manifest), manifest
