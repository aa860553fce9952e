"""Entities -> positions in the text encoder's input ids, which index the cross-attention maps' token axis.

Words are located by character offsets: transformers' tokenizers-backed CLIP tokenizer gives an offset mapping;
a tokenizer without one falls back to counting the tokens of prompt prefixes (CLIP's BPE works word by word, so
prefixes that end at a word boundary tokenize consistently). Multi-piece words get several positions; tokens cut
off by ``model_max_length`` are dropped, and so is an entity whose noun is cut off.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from comat_lightning.text.entities import Entity, Word


@dataclass(frozen=True)
class AlignedEntity:
    entity: Entity
    noun_positions: tuple[int, ...]  # positions in the text encoder's input ids (0 = start-of-text token)
    attribute_positions: tuple[int, ...]

    @property
    def positions(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.noun_positions) | set(self.attribute_positions)))


# Per tokenizer (weakly held, so that a discarded tokenizer frees its entries): (prompt, entities) -> result.
_ALIGN_CACHE: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _spans_by_offsets(tokenizer, prompt: str, words: Sequence[Word]) -> Optional[list[list[int]]]:
    """Token positions of each word from the fast tokenizer's offset mapping; None if it has no offsets."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    try:
        offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    except NotImplementedError:
        return None
    # Special tokens have empty (0, 0) spans; a token belongs to a word when their character spans overlap.
    return [[i for i, (s, e) in enumerate(offsets) if e > s and s < w.end and e > w.start] for w in words]


def _spans_by_prefixes(tokenizer, prompt: str, words: Sequence[Word]) -> list[list[int]]:
    """Token positions by tokenizing the prompt up to each word's start and end (slow tokenizers without offsets).
    A word boundary falls on a pre-tokenizer boundary for CLIP, so prefix tokens are a prefix of the prompt's tokens;
    if not (a word split inside a run of letters), the straddling token is counted as part of the word."""

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    full, content = list(tokenizer(prompt)["input_ids"]), ids(prompt)
    lead = next((i for i in range(len(full) - len(content) + 1) if full[i : i + len(content)] == content), 0)
    spans = []
    for word in words:
        first = _common_prefix(content, ids(prompt[: word.start]))
        through_ids = ids(prompt[: word.end])
        through = _common_prefix(content, through_ids)
        if through < len(through_ids):
            through += 1
        spans.append([lead + i for i in range(first, max(through, first))])
    return spans


def align_entities(prompt: str, entities: Sequence[Entity], tokenizer) -> list[AlignedEntity]:
    """Map each entity's words to token positions of ``tokenizer`` (a transformers CLIP tokenizer as loaded by
    diffusers pipelines; for SDXL pass the first tokenizer). Multi-piece words give several positions; a repeated
    word gives the occurrence at its char offset. Positions the text encoder never sees (>= model_max_length - 1, the
    last slot being end-of-text) are dropped, and so is an entity whose noun is cut off entirely. Cached per
    (prompt, entities, tokenizer): it is called every training step."""
    key = (prompt, tuple(entities))
    per_tokenizer = _ALIGN_CACHE.setdefault(tokenizer, {})
    if key not in per_tokenizer:
        per_tokenizer[key] = tuple(_align(prompt, key[1], tokenizer))
    return list(per_tokenizer[key])


def _align(prompt: str, entities: Sequence[Entity], tokenizer) -> list[AlignedEntity]:
    words = list(dict.fromkeys(w for e in entities for w in (e.noun, *e.attributes)))
    positions = word_positions(prompt, words, tokenizer)
    aligned = []
    for entity in entities:
        if not positions[entity.noun]:
            continue  # noun cut off by truncation: the text encoder never sees it
        attribute_positions = sorted({p for w in entity.attributes for p in positions[w]})
        aligned.append(AlignedEntity(entity, positions[entity.noun], tuple(attribute_positions)))
    return aligned


def word_positions(prompt: str, words: Sequence[Word], tokenizer) -> dict[Word, tuple[int, ...]]:
    """Each word's token positions in the text encoder input (several for a multi-piece word; empty when truncation
    cut it off). A word that is not where it claims to be in ``prompt`` is an error."""
    words = list(dict.fromkeys(words))
    for word in words:
        if prompt[word.start : word.end] != word.text:
            raise ValueError(
                f"word {word.text!r} at offset {word.start} is not in prompt {prompt!r} "
                f"(found {prompt[word.start:word.end]!r}): entities must come from the same prompt"
            )
    spans = _spans_by_offsets(tokenizer, prompt, words)
    if spans is None:
        spans = _spans_by_prefixes(tokenizer, prompt, words)
    limit = getattr(tokenizer, "model_max_length", None)
    limit = limit if isinstance(limit, int) and limit < 10**6 else None  # transformers' "unlimited" is ~1e30
    positions: dict[Word, tuple[int, ...]] = {}
    for word, span in zip(words, spans):
        if not span:
            raise ValueError(f"word {word.text!r} at offset {word.start} of prompt {prompt!r} has no tokens")
        positions[word] = tuple(p for p in span if limit is None or p < limit - 1)
    return positions
