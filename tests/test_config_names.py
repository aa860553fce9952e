"""Names a YAML config may use: the package's short names are the classes themselves, the shipped configs use
them, and module paths of earlier releases still work with a warning that names the new place."""

from __future__ import annotations

import importlib

import pytest
import yaml
from conftest import REPO, instantiate_cli

CONFIGS = sorted((REPO / "configs").glob("**/*.yaml")) + sorted((REPO / "benchmarks" / "shapes" / "configs").glob("*.yaml"))


def test_short_names_are_the_classes_of_their_modules():
    import comat_lightning

    for name, module in comat_lightning.SHORT_NAMES.items():
        assert getattr(comat_lightning, name) is getattr(importlib.import_module(module), name), name
    with pytest.raises(AttributeError, match="no attribute 'EvenlySpacedStep'"):
        comat_lightning.EvenlySpacedStep  # noqa: B018


def _class_paths(node):
    if isinstance(node, dict):
        if "class_path" in node:
            yield node["class_path"]
        for value in node.values():
            yield from _class_paths(value)
    elif isinstance(node, list):
        for value in node:
            yield from _class_paths(value)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_configs_name_core_classes_by_their_short_names(config):
    long = [path for path in _class_paths(yaml.safe_load(config.read_text())) if path.startswith("comat_lightning.") and path.count(".") > 1]
    assert not long, f"use comat_lightning.<Name> for {long}"


def test_old_module_paths_still_import_with_a_warning_naming_the_new_place(monkeypatch):
    import comat_lightning
    from comat_lightning.models.backbone import DiffusionBackbone

    with pytest.warns(FutureWarning, match=r"comat_lightning\.rollout\.EvenlySpacedSteps moved to comat_lightning\.EvenlySpacedSteps"):
        old = importlib.import_module("comat_lightning.rollout").EvenlySpacedSteps
    assert old is comat_lightning.EvenlySpacedSteps
    with pytest.warns(FutureWarning, match=r"comat_lightning\.tiny_zoo\.clip_tokenizer moved to comat_lightning\.tiny\.tokenizers\.clip_tokenizer"):
        importlib.import_module("comat_lightning.tiny_zoo").clip_tokenizer  # noqa: B018 (a split module: found in its successor)
    # a config that names the old path still instantiates
    monkeypatch.setattr(DiffusionBackbone, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("a model was loaded")))
    cli = instantiate_cli(["--config", str(REPO / "configs" / "tiny_demo.yaml"), "--trainer.logger=false",
                           "--model.gradient_steps.class_path=comat_lightning.rollout.EvenlySpacedSteps",
                           "--model.gradient_steps.init_args.num_gradient_steps=3"])  # fmt: skip
    assert isinstance(cli.model.gradient_steps, comat_lightning.EvenlySpacedSteps) and cli.model.gradient_steps.num_gradient_steps == 3
