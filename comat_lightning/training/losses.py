"""The contract between the training module and its loss terms.

Each loss term is a Lightning ``Callback`` listed under ``trainer.callbacks``; deleting its lines is the
ablation. A loss declares what it needs (:class:`LossNeeds`), may hand the module frozen helper models to own
(:meth:`LossCallback.build`, e.g. the captioner: the module moves them to the right device and precision), and
computes an unweighted scalar from the generated batch (:meth:`LossCallback.compute`). The module gathers the
active losses once, computes only what they need, and adds ``weight * compute(...)`` to the generator loss.

A loss sees the module only through a :class:`LossContext`: the backbone, the rollout (to sample the frozen base,
make a scheduler, encode the empty prompt), the sampler options, and the helper models the losses built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from lightning.pytorch import Callback
from torch import nn

from comat_lightning.attention.capture import CaptureRequest, LayerSelection
from comat_lightning.errors import InputError
from comat_lightning.models.backbone import DiffusionBackbone
from comat_lightning.sampling.rollout import GeneratedBatch, Rollout


@dataclass(frozen=True)
class LossNeeds:
    """What a loss reads from the rollout. The module decodes images only if some active loss asks."""

    decoded_image: bool = False
    attention: Optional[CaptureRequest] = None  # cross-attention maps to record during the rollout


@dataclass
class LossContext:
    """What a loss may use of the training module (the only module object its methods receive)."""

    backbone: DiffusionBackbone  # the loaded models; the UNet is the online model
    rollout: Rollout  # sample (the frozen base with ``frozen_base()``), make_scheduler, empty_prompt
    sampler: Any  # the rollout options (a SamplerConfig): resolution, steps, CFG scale, scheduler
    gradient_checkpointing: bool  # a loss that loads a model of its own (a discriminator) should match it
    helpers: nn.ModuleDict  # what each loss's build() returned, by loss name

    def helper(self, name: str) -> nn.Module:
        return self.helpers[name]


class LossCallback(Callback):
    """Base class of every loss term. Subclasses set ``needs`` and implement :meth:`compute`."""

    needs = LossNeeds()

    def __init__(self, weight: float = 1.0, name: Optional[str] = None):
        check_weight(type(self).__name__, "weight", weight)
        self.weight = float(weight)
        self.name = name or _snake_case(type(self).__name__)

    @property
    def state_key(self) -> str:
        return self.name

    def build(self, context: LossContext) -> Optional[nn.Module]:
        """Frozen helper model(s) this loss needs, created when the module loads its models; the module owns the
        result (device, precision, eval mode) and hands it back as ``context.helper(self.name)``."""
        return None

    def compute(self, context: LossContext, generated: GeneratedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return ``(unweighted scalar loss, extra scalars to log)``."""
        raise NotImplementedError

    def attention_requests(self, stage: str, default_layers: LayerSelection) -> list[tuple[str, LayerSelection]]:
        """(option, layers) of the cross-attention maps this loss reads, checked against the model before it loads."""
        if self.needs.attention is None:
            return []
        return [(f"{type(self).__name__} (name {self.name!r}) blocks / resolutions", self.needs.attention.layers)]

    def lora_targets(self, stage: str) -> list[tuple[str, list[str]]]:
        """(option, target modules) of LoRA adapters this loss adds to the run's UNet, checked before it loads."""
        return []

    def gradient_logs(self) -> dict[str, torch.Tensor]:
        """Scalars known only after the generator's backward (e.g. a gradient norm a tensor hook saw during
        ``compute``'s graph); the module logs them as ``train/<name>/<key>`` after each backward."""
        return {}


class AdversarialLoss(LossCallback):
    """A loss with a critic that trains too. ``compute`` is the generator's term (the module runs it with the
    critic's parameters frozen); after each generator step the module runs one critic step on
    :meth:`discriminator_loss` with the critic's own optimizer. At most one adversarial loss may be active."""

    grad_clip: Optional[float] = 1.0

    def discriminator_parameters(self, context: LossContext) -> list[nn.Parameter]:
        raise NotImplementedError

    def configure_discriminator_optimizer(self, params: list[nn.Parameter]):
        """Return ``(optimizer, lr_scheduler)`` for the critic's parameters."""
        raise NotImplementedError

    def discriminator_loss(self, context: LossContext, generated: GeneratedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


def check_weight(owner: str, option: str, value: float) -> None:
    """A loss weight must be a finite number >= 0 (a negative weight would train towards the opposite)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise InputError(f"{owner}: {option} must be >= 0 (and finite), got {value!r}")


def check_choice(owner: str, option: str, value: Any, choices: tuple) -> None:
    """Refuse a value outside ``choices``, naming the option and listing what is valid."""
    if value not in choices:
        import difflib

        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InputError(f"{owner}: {option} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}{hint}")


def _snake_case(name: str) -> str:
    out = "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")
    return out.removesuffix("_loss")


def active_losses(callbacks) -> list[LossCallback]:
    """The loss callbacks among a trainer's callbacks; refuses two with the same name or two adversarial ones."""
    losses = [cb for cb in callbacks if isinstance(cb, LossCallback)]
    names = [loss.name for loss in losses]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"two loss callbacks share the name(s) {duplicates}; give each a distinct `name`")
    adversarial = [loss.name for loss in losses if isinstance(loss, AdversarialLoss)]
    if len(adversarial) > 1:
        raise InputError(f"at most one adversarial loss can be active (one discriminator step per generator step), got {adversarial}")
    return losses


def merge_needs(losses: list[LossCallback]) -> LossNeeds:
    """What the rollout must provide for all active losses. Losses reading attention maps must agree on the
    capture steps (the maps come from one rollout); their layer selections are unioned."""
    requests = [(loss.name, loss.needs.attention) for loss in losses if loss.needs.attention is not None]
    attention = None
    if requests:
        first_name, first = requests[0]
        for name, req in requests[1:]:
            if (req.num_steps, req.with_replacement) != (first.num_steps, first.with_replacement):
                raise InputError(
                    f"losses {first_name!r} and {name!r} ask for different attention capture steps "
                    f"({first.num_steps}, with_replacement={first.with_replacement}) vs ({req.num_steps}, "
                    f"with_replacement={req.with_replacement}); set the same num_capture_steps / capture_with_replacement"
                )
        attention = CaptureRequest(layers=first.layers, num_steps=first.num_steps, with_replacement=first.with_replacement)
    return LossNeeds(decoded_image=any(loss.needs.decoded_image for loss in losses), attention=attention)


__all__ = ["AdversarialLoss", "GeneratedBatch", "LossCallback", "LossContext", "LossNeeds", "active_losses", "check_choice", "check_weight", "merge_needs"]
