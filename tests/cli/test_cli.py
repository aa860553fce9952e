"""The real entry point: every shipped config parses; the demo trains, logs, checkpoints and resumes."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, instantiate_cli, run_cli
from conftest import tensorboard_scalars as _scalars

CONFIGS = sorted((REPO / "configs").glob("**/*.yaml")) + sorted((REPO / "benchmarks" / "shapes" / "configs").glob("*.yaml"))


def test_configs_exist():
    assert {p.name for p in CONFIGS} >= {"tiny_demo.yaml", "tiny_demo_no_attribute.yaml", "tiny_demo_no_fidelity.yaml", "demo_sdxl.yaml", "comat_sd15.yaml", "comat_sdxl.yaml"}


@pytest.mark.parametrize("ablation, loss", [("tiny_demo_no_attribute", "AttributeConcentrationLoss"), ("tiny_demo_no_fidelity", "FidelityPreservationLoss")])
def test_demo_ablations_differ_from_the_demo_only_by_the_removed_callback_lines(ablation, loss):
    import difflib

    demo = (REPO / "configs" / "tiny_demo.yaml").read_text().splitlines()
    lines = (REPO / "configs" / f"{ablation}.yaml").read_text().splitlines()
    diff = [line for line in difflib.ndiff(demo, lines) if line[:2] in ("- ", "+ ")]
    assert diff and all(line.startswith("- ") for line in diff)  # only removals
    removed = yaml.safe_load("\n".join(line[2:] for line in diff))
    assert len(removed) == 1 and removed[0]["class_path"] == f"callbacks.{loss}"


@pytest.mark.parametrize("config", CONFIGS, ids=[str(p.relative_to(REPO)) for p in CONFIGS])
def test_every_shipped_config_instantiates_without_loading_models(config, monkeypatch):
    from callbacks import LossCallback
    from comat_lightning.models.backbone import DiffusionBackbone
    from comat_lightning.training.module import CoMatModule

    monkeypatch.setattr(DiffusionBackbone, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("a model was loaded")))
    cli = _instantiate(config)
    assert isinstance(cli.model, CoMatModule) and cli.model.backbone is None
    assert cli.datamodule.latent_resolution == cli.model.sampler.resolution  # real latents checked against the model
    from callbacks import ImageWriter

    sampling_only = any(isinstance(cb, ImageWriter) for cb in cli.trainer.callbacks)  # predict configs
    assert sampling_only or any(isinstance(cb, LossCallback) for cb in cli.trainer.callbacks)


def _instantiate(config: Path):
    return instantiate_cli(["--config", str(config), "--trainer.logger=false"])


ABLATIONS = {"cm": {"ConceptMatchingLoss"}, "cm_ac": {"ConceptMatchingLoss", "AttributeConcentrationLoss"},
             "cm_fp": {"ConceptMatchingLoss", "FidelityPreservationLoss"},
             "all": {"ConceptMatchingLoss", "AttributeConcentrationLoss", "FidelityPreservationLoss"}}  # fmt: skip


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("variant", sorted(ABLATIONS))
def test_ablation_configs_differ_from_the_full_config_only_by_removed_loss_callbacks(family, variant):
    full = yaml.safe_load((REPO / "configs" / f"comat_{family}.yaml").read_text())
    ablation = yaml.safe_load((REPO / "configs" / "ablations" / f"{family}_{variant}.yaml").read_text())

    def is_loss(callback):
        return callback["class_path"].endswith("Loss")

    kept = [c for c in full["trainer"]["callbacks"] if not is_loss(c) or c["class_path"].split(".")[-1] in ABLATIONS[variant]]
    assert ablation["trainer"]["callbacks"] == kept
    for config in (full, ablation):
        config["trainer"].pop("callbacks")
    assert ablation == full


@pytest.mark.parametrize("name, lr, batch, detach", [("comat_sd15", 5e-5, 4, False), ("comat_sdxl", 2e-5, 6, True)])
def test_published_configs_carry_the_published_hyperparameters(name, lr, batch, detach):
    cfg = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    model, trainer = cfg["model"], cfg["trainer"]
    assert model["optimizer"]["lr"] == lr and model["optimizer"]["grad_clip"] == 0.1
    assert model["optimizer"]["betas"] == [0.9, 0.999] and model["optimizer"]["weight_decay"] == 0.01
    assert model["lora"] == {"rank": 128, "alpha": 128, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"], "init": "gaussian"}
    assert model["sampler"] == {
        "resolution": 512,
        "num_inference_steps": 50,
        "guidance_scale": 7.5,
        "scheduler": "DDPMScheduler",
        "detach_unet_input": detach,
    }
    assert model["gradient_steps"]["init_args"]["num_gradient_steps"] == 5
    assert model["gradient_checkpointing"] is True
    assert trainer["precision"] == "bf16-mixed" and trainer["max_steps"] == 2000
    assert cfg["data"]["batch_size"] == batch
    captioner = [c for c in trainer["callbacks"] if c["class_path"].endswith("ConceptMatchingLoss")]
    assert captioner[0]["init_args"]["captioner"] == "Salesforce/blip-image-captioning-large"
    (attribute,) = [c["init_args"] for c in trainer["callbacks"] if c["class_path"].endswith("AttributeConcentrationLoss")]
    assert attribute["token_weight"] == 1e-3 and attribute["pixel_weight"] == 5e-5 and attribute["num_capture_steps"] == 2
    assert attribute["masks"]["init_args"]["box_threshold"] == 0.3 and attribute["masks"]["init_args"]["text_threshold"] == 0.25
    (fidelity,) = [c["init_args"] for c in trainer["callbacks"] if c["class_path"].endswith("FidelityPreservationLoss")]
    sd15 = name == "comat_sd15"
    assert fidelity["weight"] == (1.0 if sd15 else 0.5) and fidelity["lr"] == (2e-5 if sd15 else 5e-5)
    assert fidelity["betas"] == [0.0, 0.999] and fidelity["grad_clip"] == 1.0
    # the official SDXL run judges its latents with an SD1.5 UNet (scripts/sdxl.sh: --gan_model_arch gansd_1_5)
    assert fidelity["discriminator_model"] == (None if sd15 else "stable-diffusion-v1-5/stable-diffusion-v1-5")


def _train_py(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(REPO / "train.py"), "fit", "--config", str(REPO / "configs" / "tiny_demo.yaml"), *args]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.mark.slow  # end-to-end, in subprocesses
def test_train_py_demo_logs_checkpoints_and_resumes(tmp_path):
    (tmp_path / "data").symlink_to(REPO / "data")  # the config's relative prompt paths
    _train_py(tmp_path, "--trainer.max_steps=10", "--trainer.val_check_interval=5")
    first = _scalars(tmp_path / "runs" / "tiny_demo" / "version_0")
    tags = ("train/loss", "train/concept_matching", "train/lr", "train/generator_step", "val/concept_matching",
            "train/attribute_concentration", "train/attribute_concentration/token", "train/attribute_concentration/pixel",
            "val/attribute_concentration")  # fmt: skip
    for tag in tags:
        assert tag in first and all(math.isfinite(v) for _, v in first[tag]), tag
    losses = [v for _, v in first["train/concept_matching"]]
    assert len(losses) == 10 and len(set(losses)) > 1
    val = [v for _, v in sorted(first["val/concept_matching"])]
    assert len(val) == 2 and val[1] != val[0]  # same validation seeds, so the change is the model's
    assert [v for _, v in first["train/generator_step"]] == [float(i) for i in range(1, 11)]
    assert all(v > 0 for _, v in first["train/attribute_concentration/entities"])  # the demo's masks are found

    ckpt_dir = tmp_path / "runs" / "tiny_demo" / "version_0" / "checkpoints"  # one run, one folder
    last = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["comat"]["generator_step"] == 10
    # no frozen weights: generator LoRA, discriminator LoRA and the discriminator's head only
    assert last["state_dict"] and all(".lora_" in k or ".fidelity_preservation.head." in k for k in last["state_dict"])
    assert len(last["optimizer_states"]) == 2 and len(last["lr_schedulers"]) == 2
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in last["state_dict"].items())  # LoRA moved
    assert (tmp_path / "runs" / "tiny_demo" / "version_0" / "config.yaml").is_file()
    assert (tmp_path / "runs" / "tiny_demo" / "version_0" / "lora" / "pytorch_lora_weights.safetensors").is_file()  # ExportLoRA
    assert (tmp_path / "runs" / "tiny_demo" / "version_0" / "lora_checkpoints" / "step_10" / "pytorch_lora_weights.safetensors").is_file()

    _train_py(tmp_path, "--trainer.max_steps=12", "--trainer.val_check_interval=5", "--ckpt_path=last")
    assert not (tmp_path / "runs" / "tiny_demo" / "version_1").exists()  # the resumed run continues in its folder
    resumed = _scalars(tmp_path / "runs" / "tiny_demo" / "version_0")
    assert [v for _, v in sorted(resumed["train/generator_step"])] == [float(i) for i in range(1, 13)]


@pytest.mark.slow  # end-to-end, in subprocesses
def test_sdxl_demo_trains_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(REPO / "data")
    cli = run_cli(["fit", "--config", str(REPO / "configs" / "demo_sdxl.yaml"), "--trainer.max_steps=2", "--trainer.val_check_interval=2"])
    assert cli.model.generator_step == 2 and cli.model.backbone.family == "sdxl"
    scalars = _scalars(tmp_path / "runs" / "demo_sdxl" / "version_0")
    assert len(scalars["train/concept_matching"]) == 2 and len(scalars["train/attribute_concentration/token"]) == 2
    assert all(math.isfinite(v) for _, v in scalars["train/concept_matching"] + scalars["val/concept_matching"])


def test_fit_without_a_loss_callback_is_refused_before_loading(tmp_path, monkeypatch):
    from comat_lightning.models.backbone import DiffusionBackbone

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(REPO / "data")
    cfg = yaml.safe_load((REPO / "configs" / "tiny_demo.yaml").read_text())
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if "Loss" not in c["class_path"]]
    config = tmp_path / "no_loss.yaml"
    config.write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(DiffusionBackbone, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("a model was loaded")))
    with pytest.raises(ValueError, match="no loss callback is active"):
        run_cli(["fit", "--config", str(config), "--trainer.logger=false"])


def test_bad_option_values_are_refused_with_the_option_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"model.sampler.resolution=100: must be a positive multiple of 8"):
        _instantiate_with(["--model.sampler.resolution=100"])
    with pytest.raises(ValueError, match=r"ConceptMatchingLoss: weight must be >= 0"):
        _instantiate_with(["--trainer.callbacks=[{class_path: callbacks.ConceptMatchingLoss, init_args: {weight: -1}}]"])


def _instantiate_with(extra: list[str]):
    return instantiate_cli(["--config", str(REPO / "configs" / "tiny_demo.yaml"), "--trainer.logger=false", *extra])


@pytest.mark.slow  # end-to-end, in a subprocess
def test_the_shapes_demo_trains_validates_with_the_judge_and_logs_images(tmp_path):
    """configs/demo.yaml as the README runs it (shortened): the shapes models load by short name, the judge's
    binding accuracy and the caption NLL are logged at validation, and the image grids are written."""
    from conftest import tensorboard_images

    (tmp_path / "data").symlink_to(REPO / "data")
    (tmp_path / "benchmarks").symlink_to(REPO / "benchmarks")
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "fit", "--config", str(REPO / "configs" / "demo.yaml"),
         "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1"],
        cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    run = tmp_path / "runs" / "demo" / "version_0"
    scalars = _scalars(run)
    binding = [v for _, v in scalars["val/shapes/binding_accuracy"]]
    assert len(binding) == 1 and 0.0 <= binding[0] <= 1.0
    assert len(scalars["val/metrics/caption_nll"]) == 1
    tags = set(tensorboard_images(run))
    assert any(t.startswith("attention/") for t in tags) and any(t.startswith("samples") for t in tags), tags
