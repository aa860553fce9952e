"""`train.py predict`: plain sampling equals diffusers' pipelines, guided sampling writes images + manifest and skips
finished ones, LoRA files load, bad concepts are refused."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    """LightningCLI saves the resolved config.yaml to the working folder when there is no logger: keep it out of
    the repository."""
    monkeypatch.chdir(tmp_path)


def _config(tmp_path, model: dict, out: str = "out", extra_callbacks=()) -> str:
    import yaml

    config = {
        "trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                    "callbacks": [{"class_path": "callbacks.ImageWriter", "init_args": {"output_dir": str(tmp_path / out), "write_concept_maps": True}}, *extra_callbacks]},
        "model": {"sampler": {"resolution": 64, "num_inference_steps": 5, "scheduler": "DDIMScheduler"}, **model},
        "data": {"train_file": str(tmp_path / "prompts.jsonl"), "batch_size": 2},
    }  # fmt: skip
    path = tmp_path / "predict.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _prompts(tmp_path, records):
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _predict(config: str):
    return run_cli(["predict", "--config", config, "--return_predictions", "false"])


def _pngs(folder):
    import numpy as np
    from PIL import Image

    return {p.stem: torch.from_numpy(np.asarray(Image.open(p), dtype=np.float32) / 255) for p in sorted(folder.glob("*.png"))}


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_plain_predict_equals_the_diffusers_pipeline(family, tiny_paths, tmp_path):
    from diffusers import DDIMScheduler, DiffusionPipeline

    _prompts(tmp_path, [{"prompt": "a red car and a blue bird", "seed": 7}, {"prompt": "a cat on a chair", "seed": 11}])
    _predict(_config(tmp_path, {"pretrained_model": tiny_paths[family]}))
    ours = _pngs(tmp_path / "out")
    pipe = DiffusionPipeline.from_pretrained(tiny_paths[family])
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    extra = {"negative_prompt": ["", ""]} if family == "sdxl" else {}  # our unconditional branch is the empty prompt
    images = pipe(["a red car and a blue bird", "a cat on a chair"], num_inference_steps=5, guidance_scale=7.5, height=64, width=64,
                  generator=[torch.Generator().manual_seed(7), torch.Generator().manual_seed(11)], output_type="np", **extra).images  # fmt: skip
    for key, reference in zip(["00000-s7", "00001-s11"], images):
        reference_8bit = torch.from_numpy((reference * 255).round() / 255).float()
        assert (ours[key] - reference_8bit).abs().max() <= 1 / 255 + 1e-6  # equal up to one 8-bit level


def test_guided_predict_writes_images_and_maps_and_skips_finished_ones(tiny_paths, tmp_path):
    _prompts(tmp_path, [{"prompt": "a cat and a dog"}, {"prompt": "a red car and a blue bird", "concepts": ["car", "bird"]},
                        {"prompt": "a cat and a dog", "token_indices": [2, 5], "seed": 3}])  # fmt: skip
    guidance = {"class_path": "comat_lightning.AStarGuidance"}
    config = _config(tmp_path, {"pretrained_model": tiny_paths["sd"], "guidance": guidance, "guidance_resolution": 8})
    _predict(config)
    out = tmp_path / "out"
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [m["key"] for m in manifest] == ["00000-s0", "00001-s1", "00002-s3"]
    assert manifest[0]["concepts"] == ["cat", "dog"] and manifest[1]["concepts"] == ["car", "bird"]  # parser nouns / given
    assert manifest[0]["settings"]["guidance"]["class"] == "AStarGuidance"
    assert all((out / m["file"]).is_file() for m in manifest) and len(list((out / "maps").glob("*.png"))) == 6
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    _predict(config)  # everything finished: nothing is sampled or rewritten
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == mtimes
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("guidance", ["AStarGuidance", "AttendAndExciteGuidance"])
def test_sdxl_guidance_runs(guidance, tiny_paths, tmp_path):
    _prompts(tmp_path, [{"prompt": "a cat and a dog"}])
    model = {"pretrained_model": tiny_paths["sdxl"], "guidance": {"class_path": f"comat_lightning.sampling.guided.{guidance}"}, "guidance_resolution": 4}
    _predict(_config(tmp_path, model))
    assert (tmp_path / "out" / "00000-s0.png").is_file()


def test_a_concept_not_in_the_prompt_is_refused(tiny_paths, tmp_path):
    _prompts(tmp_path, [{"prompt": "a cat and a dog", "concepts": ["cat", "zebra"]}])
    config = _config(tmp_path, {"pretrained_model": tiny_paths["sd"], "guidance": {"class_path": "comat_lightning.AStarGuidance"}, "guidance_resolution": 8})
    with pytest.raises(ValueError, match="a cat and a dog.*zebra|zebra.*a cat and a dog"):
        _predict(config)


def test_lora_weights_file_loads_and_matches_diffusers(tiny_paths, tmp_path):
    from conftest import make_module
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from comat_lightning.models.lora_files import save_denoiser_lora
    from comat_lightning.training.module import LoraConfig

    module = make_module(tiny_paths["sd"], lora=LoraConfig(rank=4, alpha=8))
    with torch.no_grad():
        for name, param in module.backbone.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    save_denoiser_lora(module.backbone.unet, "sd", tmp_path / "lora")
    _prompts(tmp_path, [{"prompt": "a red car", "seed": 5}])
    _predict(_config(tmp_path, {"pretrained_model": tiny_paths["sd"], "lora_weights": str(tmp_path / "lora")}))
    ours = _pngs(tmp_path / "out")["00000-s5"]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_paths["sd"])
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(tmp_path / "lora")
    (reference,) = pipe(["a red car"], num_inference_steps=5, guidance_scale=7.5, height=64, width=64,
                        generator=[torch.Generator().manual_seed(5)], output_type="np").images  # fmt: skip
    assert (ours - torch.from_numpy((reference * 255).round() / 255).float()).abs().max() <= 1 / 255 + 1e-6


def test_layout_mode_reads_masks_from_the_record(tiny_paths, tmp_path):
    from comat_lightning.files.mask_files import rle_encode

    left, right = torch.zeros(64, 64), torch.zeros(64, 64)
    left[:, :32], right[:, 32:] = 1, 1
    layout = {"cat": rle_encode(left, compress=True), "dog": rle_encode(right, compress=True)}
    _prompts(tmp_path, [{"prompt": "a cat and a dog", "layout": layout}])
    model = {"pretrained_model": tiny_paths["sd"], "guidance": {"class_path": "comat_lightning.AStarGuidance"}, "guidance_resolution": 8}
    _predict(_config(tmp_path, model))
    manifest = json.loads((tmp_path / "out" / "manifest.jsonl").read_text())
    assert manifest["concepts"] == ["cat", "dog"]
    _prompts(tmp_path, [{"prompt": "a cat and a dog", "layout": {"cat": layout["cat"]}}])  # no mask for the dog
    with pytest.raises(ValueError, match="no mask for concept"):
        _predict(_config(tmp_path, model, out="out2"))
