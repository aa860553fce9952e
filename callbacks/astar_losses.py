"""A-STAR's losses as training terms (experimental): fine-tune so that concepts' cross-attention maps do not
overlap (segregation) and each concept keeps its region from one captured step to the next (retention).

No published system trains with these: they are an ablation to compare against CoMat's attribute concentration,
usable beside or instead of the CoMat losses. Maps come from the conditional pass at the captured gradient steps
(with gradient), processed as for A-STAR sampling (comat_lightning/attention/concept_maps.py); concepts are a record's
``"concepts"`` words, or else the prompt's nouns from the spaCy parser. Prompts with fewer than two concepts
contribute no segregation; retention needs two captured steps and compares consecutive ones (the earlier step's
binarised map is the detached target of the later step's map).
"""

from __future__ import annotations

from typing import Optional

import torch

from comat_lightning.attention.capture import Block, CaptureRequest, layer_selection
from comat_lightning.attention.concept_maps import (
    ThresholdRule,
    average_maps,
    binarize,
    concept_maps,
    retention_loss,
    segregation_loss,
)
from comat_lightning.errors import InputError
from comat_lightning.files.record_fields import CONCEPTS, PROMPT, TOKEN_INDICES
from comat_lightning.sampling.prediction import concept_positions
from comat_lightning.text.entities import EntityParser
from comat_lightning.training.losses import GeneratedBatch, LossCallback, LossContext, LossNeeds


class _ConceptMapLoss(LossCallback):
    def __init__(self, weight: float, resolution: int, blocks: list[Block], num_capture_steps: int, name: Optional[str]):
        super().__init__(weight=weight, name=name)
        owner = type(self).__name__
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise InputError(f"{owner}: resolution must be a positive map side, got {resolution!r}")
        self.selection = layer_selection(f"{owner} blocks / resolution", blocks, (resolution,))
        try:
            self.needs = LossNeeds(attention=CaptureRequest(self.selection, num_steps=num_capture_steps))
        except InputError as err:
            raise InputError(f"{owner}: {err}") from None
        self.parser = EntityParser()

    def maps_per_step(self, context: LossContext, generated: GeneratedBatch) -> dict[int, list[torch.Tensor]]:
        """{captured step: per sample (C_b, r, r) concept maps}; samples with < min_concepts concepts get None."""
        store = generated.attention
        keys = context.backbone.text_keys
        indices = [concept_positions(r, keys, self.parser)[1] if _has_concepts(r, self.parser) else [] for r in generated.records()]
        out = {}
        for step in store.steps if store is not None else []:
            averaged = average_maps(list(store.select(step, self.selection).values()))
            keep = [b for b, idx in enumerate(indices) if idx]
            maps = concept_maps(averaged[keep], [indices[b] for b in keep], first=keys.first, end=keys.end) if keep else []
            out[step] = dict(zip(keep, maps))
        return out


def _has_concepts(record: dict, parser: EntityParser) -> bool:
    return bool(record.get(CONCEPTS) or record.get(TOKEN_INDICES) or parser.nouns(record[PROMPT]))


class AttentionSegregationLoss(_ConceptMapLoss):
    """Sum over concept pairs of the overlap of their maps, averaged over samples (with >= 2 concepts) and steps.

    Args:
        weight: loss weight (no published value; start around 0.1).
        resolution: map side read (16 for SD1.5 at 512 px, as A-STAR sampling).
        blocks: UNet blocks read.
        num_capture_steps: gradient steps whose maps are recorded (must match other map-reading losses).
    """

    def __init__(self, weight: float = 0.1, resolution: int = 16, blocks: list[Block] = ["down", "mid", "up"],  # noqa: B006
                 num_capture_steps: int = 2, name: str = "attention_segregation"):  # fmt: skip
        super().__init__(weight, resolution, blocks, num_capture_steps, name)

    def compute(self, context: LossContext, generated: GeneratedBatch):
        values = [segregation_loss(m) for per_sample in self.maps_per_step(context, generated).values() for m in per_sample.values() if m.shape[0] >= 2]
        if not values:
            return torch.zeros((), device=generated.latents.device), {}
        return torch.stack(values).mean(), {}


class AttentionRetentionLoss(_ConceptMapLoss):
    """Sum over concepts of (1 - overlap(map at the later captured step, binarised map at the earlier one)),
    averaged over samples and consecutive step pairs. Needs ``num_capture_steps >= 2``.

    Args:
        weight: loss weight (no published value).
        resolution / blocks / num_capture_steps: as :class:`AttentionSegregationLoss`.
        threshold_rule: "minmax" (normalise, > 0.5) or "otsu" for the targets.
    """

    def __init__(self, weight: float = 0.1, resolution: int = 16, blocks: list[Block] = ["down", "mid", "up"],  # noqa: B006
                 num_capture_steps: int = 2, threshold_rule: ThresholdRule = "minmax", name: str = "attention_retention"):  # fmt: skip
        if num_capture_steps < 2:
            raise InputError(f"AttentionRetentionLoss: retention compares two captured steps; num_capture_steps must be >= 2, got {num_capture_steps}")
        super().__init__(weight, resolution, blocks, num_capture_steps, name)
        if threshold_rule not in ("minmax", "otsu"):
            raise InputError(f"AttentionRetentionLoss: threshold_rule must be 'minmax' or 'otsu', got {threshold_rule!r}")
        self.threshold_rule = threshold_rule

    def compute(self, context: LossContext, generated: GeneratedBatch):
        per_step = self.maps_per_step(context, generated)
        steps = sorted(per_step)
        values = [
            retention_loss(per_step[later][b], binarize(per_step[earlier][b], self.threshold_rule))
            for earlier, later in zip(steps, steps[1:])
            for b in per_step[later]
        ]
        if not values:  # one distinct captured step (or no concepts): nothing to retain
            return torch.zeros((), device=generated.latents.device), {}
        return torch.stack(values).mean(), {}
