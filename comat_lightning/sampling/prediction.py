"""``train.py predict``: sample images for a prompt file, optionally with test-time attention guidance.

Per record (JSONL fields, all optional besides "prompt"):

- ``"seed"``: the image's noise seed (default ``model.seed * 1000003 + prompt index``); each image has its own
  generator, so an image does not depend on its batch;
- concepts for guidance: ``"token_indices"`` (positions in the text encoder input, 0 = start token), or
  ``"concepts"`` (words of the prompt), or else the prompt's head nouns from the spaCy parser;
- ``"layout"``: per concept a mask (COCO RLE or image path, as :class:`~comat_lightning.JsonlMasks` reads) that
  replaces A-STAR's retention targets (layout mode).

Images finished by an earlier run (``callbacks.ImageWriter.is_done``) are not sampled again.

A batch that carries ``"latent_job"`` (``python -m comat_lightning.tools.real_latents``) asks for the frozen base
model's final latents instead of images: the same predict loop, strategies and launch commands make both.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, runtime_checkable

import torch

from comat_lightning.errors import InputError
from comat_lightning.files.record_fields import CONCEPTS, INDEX, LATENT_SEED, LAYOUT, PROMPT, SEED, TOKEN_INDICES
from comat_lightning.models.backbone import TextKeys
from comat_lightning.sampling.seeds import prompt_seed
from comat_lightning.text.entities import EntityParser, Word


def image_key(index: int, seed: int) -> str:
    return f"{index:05d}-s{seed}"


def check_token_indices(value: Any) -> list[int]:
    """A record's "token_indices": a non-empty list of integer key positions >= 0 (on CLIP-based models 0 is the
    start token and is refused later; the range depends on the prompt and model and is checked with its tokenizer)."""
    if not isinstance(value, list) or not value or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        raise InputError(f"\"token_indices\" must be a non-empty list of integers >= 0, got {value!r}")
    return list(value)


def check_concepts(prompt: str, value: Any) -> list[str]:
    """A record's "concepts": a non-empty list of single words of the prompt (each guided by its first token)."""
    from comat_lightning.text.entities import entities_from_json

    if not isinstance(value, list) or not value or not all(isinstance(w, str) and w.strip() for w in value):
        raise InputError(f"\"concepts\" must be a non-empty list of words of the prompt, got {value!r}")
    entities_from_json(prompt, [[w, []] for w in value])  # each must be one word that occurs in the prompt
    return [str(w) for w in value]


def concept_positions(record: dict[str, Any], keys: TextKeys, parser: EntityParser) -> tuple[list[str], list[int]]:
    """(concept words, their first token positions) of one record, in the text keys ``keys`` describes; a concept
    word missing from the prompt is an error naming the prompt."""
    from comat_lightning.text.entities import entities_from_json
    from comat_lightning.text.token_alignment import align_entities

    prompt, tokenizer = record[PROMPT], keys.tokenizer
    if record.get(TOKEN_INDICES) is not None:
        indices = check_token_indices(record[TOKEN_INDICES])
        if any(i < keys.first or i >= keys.end for i in indices):
            raise InputError(f"prompt {prompt!r}: token_indices {indices} must lie in {keys.describe()}")
        ids = tokenizer(prompt).input_ids
        if max(indices) >= len(ids) - 1:
            raise InputError(f"prompt {prompt!r}: token_indices {indices} point past its last token (it has {len(ids) - 1 - keys.first})")
        return [tokenizer.decode([ids[i]]).strip() for i in indices], indices
    if record.get(CONCEPTS) is not None:
        try:
            words = check_concepts(prompt, record[CONCEPTS])
        except InputError as err:
            raise InputError(f"prompt {prompt!r}: a concept is not a word of the prompt: {err}") from None
        entities = entities_from_json(prompt, [[w, []] for w in words])
    else:
        nouns: list[Word] = parser.nouns(prompt)
        if not nouns:
            raise InputError(f"prompt {prompt!r}: the parser found no noun to guide; give \"concepts\" or \"token_indices\"")
        entities = entities_from_json(prompt, [{"noun": w.text, "noun_start": w.start, "attributes": []} for w in nouns])
        words = [w.text for w in nouns]
    aligned = align_entities(prompt, entities, tokenizer)
    if len(aligned) != len(words):
        raise InputError(f"prompt {prompt!r}: concepts {words} fall beyond the text encoder's {tokenizer.model_max_length} tokens")
    return words, [a.noun_positions[0] for a in aligned]


def record_seeds(batch: dict[str, list], base_seed: int) -> list[int]:
    seeds = batch.get(SEED) or [None] * len(batch[PROMPT])
    return [int(s) if s is not None else prompt_seed(base_seed, int(i)) for s, i in zip(seeds, batch[INDEX])]


def layout_masks(records: list[dict], concepts: list[list[str]]) -> Optional[list[Optional[torch.Tensor]]]:
    """Per record a (C, H, W) stack of the user's layout masks (all concepts must have one), or None."""
    if not any(r.get(LAYOUT) for r in records):
        return None
    from comat_lightning.judges.masks import JsonlMasks

    reader = JsonlMasks(field=LAYOUT)
    masks = reader(None, [[w.lower() for w in words] for words in concepts], records)
    out: list[Optional[torch.Tensor]] = []
    for record, words, sample in zip(records, concepts, masks):
        if not record.get(LAYOUT):
            out.append(None)
            continue
        missing = [w for w, m in zip(words, sample) if m is None]
        if missing:
            raise InputError(f"prompt {record['prompt']!r}: \"layout\" has no mask for concept(s) {missing}")
        out.append(torch.stack(list(sample)))
    return out


__all__ = ["check_concepts", "check_token_indices", "concept_positions", "image_key", "layout_masks", "predict_latents", "record_seeds"]


@runtime_checkable
class WritesImages(Protocol):
    """A prediction writer that knows which images an earlier run finished (``callbacks.ImageWriter``)."""

    def is_done(self, key: str) -> bool: ...


LATENT_JOB = "latent_job"  # a real-latents batch: {"shard": number, "offset": of its first prompt in the shard}


def predict_latents(module, batch: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The frozen base's final latents (B, C, h, w) float32 on the CPU for a real-latents batch (``"prompt"``,
    ``"latent_seed"`` lists, ``"latent_job"``): one generator per prompt, so a latent does not depend on its batch,
    and the LoRA (if any) disabled. None for an empty batch (a rank with less work)."""
    prompts = [str(p) for p in batch[PROMPT]]
    if not prompts:
        return None
    generators = [torch.Generator().manual_seed(int(s)) for s in batch[LATENT_SEED]]
    with torch.no_grad(), module.rollout.frozen_base() as unet:
        latents = module.rollout.sample(prompts, generators, unet=unet)
    return {"latents": latents.detach().to("cpu", torch.float32), LATENT_JOB: batch[LATENT_JOB]}


def predict_batch(module, batch: dict[str, list]) -> Optional[dict[str, Any]]:
    """Sample (or skip, if finished) the images of one batch; returns the ``callbacks.ImageWriter`` contract.
    A real-latents batch goes to :func:`predict_latents`."""
    from comat_lightning.sampling.guided import guided_sample

    if LATENT_JOB in batch:
        return predict_latents(module, batch)

    trainer = getattr(module, "_trainer", None)
    writer = next((cb for cb in trainer.callbacks if isinstance(cb, WritesImages)), None) if trainer is not None else None
    seeds = record_seeds(batch, module.seed)
    keys = [image_key(int(i), s) for i, s in zip(batch[INDEX], seeds)]
    todo = [j for j, key in enumerate(keys) if writer is None or not writer.is_done(key)]
    if not todo:
        return None
    records = [{k: v[j] for k, v in batch.items()} for j in todo]
    prompts = [r[PROMPT] for r in records]
    rollout, backbone, cfg = module.rollout, module.backbone, module.sampler
    todo_seeds = [seeds[j] for j in todo]  # one generator per image: batch-independent
    concepts, maps = None, None
    if module.guidance is None:
        images = rollout.sample_images(prompts, todo_seeds)
    else:
        generators = [torch.Generator().manual_seed(s) for s in todo_seeds]
        scheduler, latents = rollout.start(len(todo), generators)
        cond, uncond = backbone.encode_prompts(prompts, cfg.resolution), rollout.empty_prompt().expand(len(todo))
        words_and_indices = [concept_positions(r, backbone.text_keys, module.concept_parser) for r in records]
        concepts = [w for w, _ in words_and_indices]
        layers = [name for name, layer in module.attention_store.layers.items() if module.guidance_selection().matches(layer)]
        latents, last_maps = guided_sample(
            backbone, backbone.unet, scheduler, cond, uncond, latents, cfg.guidance_scale, module.guidance, [i for _, i in words_and_indices],
            module.attention_store, layers, generator=generators, layout_masks=layout_masks(records, concepts),
        )  # fmt: skip
        if last_maps and len({m.shape for m in last_maps}) == 1:  # same concept count: one (B, C, r, r) tensor
            stacked = torch.stack(last_maps)
            low, high = stacked.amin(dim=(-2, -1), keepdim=True), stacked.amax(dim=(-2, -1), keepdim=True)
            maps = (stacked - low) / (high - low).clamp_min(1e-8)  # each map min-max normalised for viewing
        with torch.no_grad():
            images = rollout.decode(latents).clamp(0, 1)
    settings = {
        "model": module.model_source,
        "lora_weights": module.lora_weights,
        "resolution": cfg.resolution,
        "num_inference_steps": cfg.num_inference_steps,
        "guidance_scale": cfg.guidance_scale,
        "scheduler": cfg.scheduler,
        "guidance": None if module.guidance is None else {"class": type(module.guidance).__name__, **_public(module.guidance)},
    }
    return {
        "images": images.float().cpu(),
        "prompts": prompts,
        "seeds": todo_seeds,
        "keys": [keys[j] for j in todo],
        "settings": settings,
        "concept_maps": None if maps is None else maps.cpu(),
        "concepts": concepts if maps is not None else None,
    }


def _public(obj) -> dict[str, Any]:
    return {k: v for k, v in vars(obj).items() if not k.startswith("_") and isinstance(v, (int, float, str, bool, type(None), dict))}
