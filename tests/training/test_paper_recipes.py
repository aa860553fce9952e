"""The faithful recipes compute what the official CoMat code computes; the plus recipes differ only in named options.

The loss formulas themselves are checked against the official code's formulas on identical tensors in
test_attribute_concentration.py (attribute concentration), test_parity.py (concept matching),
test_fidelity_preservation.py (discriminator reduction) and test_rollout.py (gradient steps), each with the
callbacks' default options; this file ties those defaults to the shipped recipes.
"""

from __future__ import annotations

import importlib.util
import inspect
import re

import pytest
import torch
import yaml
from conftest import REPO


def _plus_script():
    spec = importlib.util.spec_from_file_location("make_plus_configs", REPO / "scripts" / "make_plus_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _components(config: dict):
    """(class_path, init_args) of every component of a parsed recipe: callbacks, nested masks, model policies."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if "class_path" in node:
                found.append((node["class_path"], node.get("init_args") or {}))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config)
    return found


def _load(name: str) -> dict:
    return yaml.safe_load((REPO / "configs" / name).read_text())


def _apply(config: dict, options: dict) -> dict:
    for class_path, init_args in _components(config):
        for key, (value, _) in options.get(class_path, {}).items():
            init_args[key] = value
    return config


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_plus_recipes_differ_from_the_faithful_ones_only_in_the_documented_options(family):
    script = _plus_script()
    options = script.plus_options(family)
    faithful, plus = _load(f"comat_{family}.yaml"), _load(f"comat_plus_{family}.yaml")
    assert plus != faithful
    assert plus == _apply(faithful, options)
    # and every changed option really changes something
    for class_path, init_args in _components(_load(f"comat_{family}.yaml")):
        for key, (value, _) in options.get(class_path, {}).items():
            assert init_args[key] != value, (class_path, key)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_faithful_recipes_use_the_official_defaults_that_the_parity_tests_check(family):
    """Every option the plus recipes change is set in the faithful recipe to the component's default, and the
    defaults are what the parity tests prove equal to the official formulas."""
    import importlib

    options = _plus_script().plus_options(family)
    for class_path, init_args in _components(_load(f"comat_{family}.yaml")):
        if class_path not in options:
            continue
        module_name, class_name = class_path.rsplit(".", 1)
        cls = getattr(importlib.import_module(module_name), class_name)
        parameters = inspect.signature(cls).parameters
        for key in options[class_path]:
            if key == "discriminator_model":  # a model path, not a formula: the recipe names the official model
                continue
            default = parameters[key].default
            if key == "missed_entities":  # None: decided by the mask provider (the default one is a detector)
                default = cls().missed_entities
            assert init_args[key] == default, (class_path, key)


def test_docs_reproducing_the_paper_names_every_option():
    section = (REPO / "docs" / "paper.md").read_text()
    script = _plus_script()
    for family in ("sd15", "sdxl"):
        for class_path, options in script.plus_options(family).items():
            for key in options:
                assert re.search(rf"`[\w.]*\b{key}`", section), key
    for key in ("max_caption_tokens", "pixel_layer_groups", "token_layer_reduction", "discriminator_reduction", "lora_init", "max_crop"):
        assert re.search(rf"`[\w.]*\b{key}`", section), key


@pytest.mark.parametrize("name", ["comat_sd15.yaml", "comat_sdxl.yaml", "comat_plus_sd15.yaml", "comat_plus_sdxl.yaml"])
def test_recipes_instantiate_with_their_settings(name, monkeypatch):
    from conftest import instantiate_cli

    from callbacks import AttributeConcentrationLoss, ConceptMatchingLoss, FidelityPreservationLoss
    from comat_lightning.models.backbone import DiffusionBackbone

    monkeypatch.setattr(DiffusionBackbone, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("a model was loaded")))
    cli = instantiate_cli(["--config", str(REPO / "configs" / name), "--trainer.logger=false"])
    losses = {type(cb): cb for cb in cli.trainer.callbacks}
    attribute, concept = losses[AttributeConcentrationLoss], losses[ConceptMatchingLoss]
    faithful = "plus" not in name
    assert attribute.normalization == ("per_sample" if faithful else "per_entity")
    assert attribute.missed_entities == ("zero_mask" if faithful else "skip")
    assert concept.crop_pixels(cli.model.sampler.resolution) == 2
    assert losses[FidelityPreservationLoss].discriminator_reduction == "concat_mean"
    assert cli.model.lora.init == "gaussian"


def test_gaussian_lora_init_is_the_official_layers(tiny_paths):
    """The official code's diffusers LoRALinearLayer draws A ~ N(0, 1/rank) and sets B = 0; PEFT's "gaussian" init
    does the same (checked against that layer's own init on the same shapes); PEFT's default is kaiming-uniform."""
    from conftest import make_module
    from diffusers.models.lora import LoRALinearLayer

    from comat_lightning.training.module import LoraConfig

    for init, rank in (("gaussian", 4), ("kaiming", 4)):
        module = make_module(tiny_paths["sd"], lora=LoraConfig(rank=rank, init=init))
        a = torch.cat([p.flatten() for n, p in module.backbone.unet.named_parameters() if "lora_A" in n])
        b = torch.cat([p.flatten() for n, p in module.backbone.unet.named_parameters() if "lora_B" in n])
        assert b.abs().max() == 0
        if init == "gaussian":
            official = torch.cat([LoRALinearLayer(32, 32, rank=rank).down.weight.flatten() for _ in range(50)])
            assert a.std().item() == pytest.approx(1 / rank, rel=0.05) and official.std().item() == pytest.approx(1 / rank, rel=0.05)
            assert abs(a.mean().item()) < 0.01
        else:
            assert a.std().item() < 0.5 / rank  # kaiming-uniform on these widths: far below 1 / rank
