"""Test-only guard: make any loading of model weights fail the test, to prove a check runs before it."""

from __future__ import annotations

import pytest


def refuse_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``from_pretrained`` a run loads weights through (the pipeline, a UNet, a VAE) fails the test."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from comat_lightning.models.backbone import DiffusionBackbone

    refuse = classmethod(lambda *args, **kwargs: pytest.fail("a model was loaded"))
    for cls in (DiffusionBackbone, UNet2DConditionModel, AutoencoderKL):
        monkeypatch.setattr(cls, "from_pretrained", refuse)
