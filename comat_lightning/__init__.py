"""comat-lightning: CoMat and A-STAR for text-to-image diffusion models, as a PyTorch Lightning framework.

Stable short names for everything a YAML config may name (``class_path: comat_lightning.EvenlySpacedSteps``); they
are imported on first use, so ``import comat_lightning`` stays cheap. The packages, by concern (docs/architecture.md):
``training`` (the module, the loss contract, options, start-up checks), ``sampling``, ``attention``, ``models``,
``judges``, ``text``, ``files``, ``runtime``, ``tools`` and ``tiny``.

Module paths of earlier releases (``comat_lightning.EvenlySpacedSteps``, ...) still import, with a
warning naming the new place (:mod:`comat_lightning.legacy`).
"""

from __future__ import annotations

import importlib
from typing import Any

from comat_lightning import legacy

SHORT_NAMES = {
    # training
    "CoMatModule": "comat_lightning.training.module",
    "SamplerConfig": "comat_lightning.training.options",
    "LoraConfig": "comat_lightning.models.adapters",
    "OptimizerConfig": "comat_lightning.training.options",
    "LossCallback": "comat_lightning.training.losses",
    "AdversarialLoss": "comat_lightning.training.losses",
    "LossNeeds": "comat_lightning.training.losses",
    "GeneratedBatch": "comat_lightning.training.losses",
    # sampling
    "GradientStepPolicy": "comat_lightning.sampling.step_policies",
    "EvenlySpacedSteps": "comat_lightning.sampling.step_policies",
    "LastSteps": "comat_lightning.sampling.step_policies",
    "SingleRandomStep": "comat_lightning.sampling.step_policies",
    "AttentionGuidance": "comat_lightning.sampling.guided",
    "AStarGuidance": "comat_lightning.sampling.guided",
    "AttendAndExciteGuidance": "comat_lightning.sampling.guided",
    # judges
    "MaskProvider": "comat_lightning.judges.masks",
    "JsonlMasks": "comat_lightning.judges.masks",
    "GroundedSAMMasks": "comat_lightning.judges.grounded_sam",
    # errors
    "InputError": "comat_lightning.errors",
}

__all__ = sorted(SHORT_NAMES)


def __getattr__(name: str) -> Any:
    module = SHORT_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'comat_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(SHORT_NAMES))


legacy.install()
