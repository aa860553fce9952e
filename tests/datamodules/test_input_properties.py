"""Property: whatever bytes, JSON or text a user hands us, reading it either works or fails with our own
:class:`InputError` whose message names the file (for files) and says what is wrong; never with an exception from
deep inside json, safetensors, numpy, PIL or spaCy.

Inputs reach the datamodule (prompt files: .txt and .jsonl, read at ``setup`` for fit and predict, with latent
references and mask fields), the prompt parser (hand-written entities, and spaCy on any unicode prompt) and the
masks reader (JsonlMasks and the RLE decoder). Examples are derandomized: every run (and CI) tries the same inputs.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from comat_lightning.errors import InputError
from comat_lightning.files.mask_files import rle_counts_to_string, rle_decode
from comat_lightning.judges.masks import JsonlMasks
from comat_lightning.text.entities import Entity, EntityParser, entities_from_json
from datamodules.prompts import PromptDataModule, read_prompt_file

SETTINGS = settings(derandomize=True, deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
FIELDS = ["prompt", "entities", "concepts", "masks", "layout", "latent", "token_indices", "seed"]
WORDS = ["a", "red", "car", "blue", "bus", "teddy", "bear", "cat", "the", "on", "x"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """One folder for every example (each overwrites the files it uses); holds a few files references may name."""
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("inputs")
    save_file({"latents": torch.zeros(2, 4, 8, 8)}, str(path / "good.safetensors"))  # 64 px latents
    (path / "garbage.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    (path / "empty.safetensors").write_bytes(b"")
    Image.new("L", (8, 8), 255).save(path / "good.png")
    (path / "mask.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return path


@pytest.fixture(scope="module")
def parser() -> EntityParser:
    parser = EntityParser()
    parser.nlp  # loads spaCy once for the module
    return parser


# ------------------------------------------------------------------------------------------------ strategies

any_text = st.text(st.characters(exclude_categories=()), max_size=30)  # surrogates and control characters too
prompts = st.one_of(any_text, st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(" ".join))
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), any_text)


def json_values(keys: st.SearchStrategy[str] = any_text) -> st.SearchStrategy[Any]:
    return st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4), max_leaves=12)


positions = st.integers(min_value=-2, max_value=40)
words = st.sampled_from(WORDS) | any_text
rle_counts = st.one_of(st.lists(st.integers(min_value=-3, max_value=20), max_size=8), any_text, st.sampled_from(["52203", "X153", "521O"]))


@st.composite
def valid_rles(draw: st.DrawFn) -> dict[str, Any]:
    """A well-formed RLE of a small mask: run lengths (or COCO's string) summing to height * width."""
    height, width = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    cuts = sorted(draw(st.lists(st.integers(0, height * width), max_size=6)))
    runs = [b - a for a, b in zip([0, *cuts], [*cuts, height * width])]
    return {"size": [height, width], "counts": rle_counts_to_string(runs) if draw(st.booleans()) else runs}


rles = st.one_of(
    valid_rles(),
    st.fixed_dictionaries({"size": st.one_of(st.lists(st.integers(min_value=-1, max_value=6), max_size=3), json_values()), "counts": rle_counts}),
)
# Values close to valid ones reach the deeper checks; fully random ones the shape checks.
near_valid = {
    "entities": st.lists(
        st.one_of(
            st.fixed_dictionaries(
                {"noun": words},
                optional={"attributes": st.lists(words, max_size=3), "noun_start": positions, "attribute_starts": st.lists(positions, max_size=3), "compounds": st.lists(words, max_size=2)},
            ),
            st.tuples(words, st.lists(words, max_size=2)).map(list),
        ),
        max_size=3,
    ),
    "concepts": st.lists(words, max_size=3),
    "masks": st.dictionaries(words, st.one_of(rles, st.sampled_from(["good.png", "mask.png", "missing.png", "", "/"]), json_scalars), max_size=3),
    "layout": st.dictionaries(words, st.one_of(rles, st.sampled_from(["good.png", "mask.png", "missing.png"])), max_size=2),
    "latent": st.fixed_dictionaries(
        {
            "file": st.one_of(*[st.sampled_from(["good.safetensors", "garbage.safetensors", "empty.safetensors", "missing.safetensors", "p.jsonl", ".", "", "~nobody_here/x", "a\x00b"])] * 3, any_text),
            "index": st.integers(min_value=-1, max_value=3),
        }
    ),
    "token_indices": st.lists(st.integers(min_value=-1, max_value=80) | json_scalars, max_size=3),
    "seed": st.integers(min_value=-1, max_value=2**64) | json_scalars,
}


@st.composite
def prompt_records(draw: st.DrawFn) -> dict[str, Any]:
    """A record with a prompt and up to two optional fields, mostly near-valid (one bad field hides the others)."""
    record: dict[str, Any] = {"prompt": draw(prompts)}
    for field in draw(st.lists(st.sampled_from(sorted(near_valid)), max_size=2, unique=True)):
        record[field] = draw(near_valid[field] if draw(st.integers(0, 3)) else json_values())
    return record


records = st.one_of(
    prompt_records(),
    prompt_records(),
    prompt_records(),
    st.dictionaries(st.sampled_from(FIELDS) | any_text, json_values(st.sampled_from(FIELDS) | any_text), max_size=5),
    json_values(st.sampled_from(FIELDS)),  # not an object at all
)


def as_jsonl(lines: list[tuple[Any, bool]]) -> bytes:
    """JSON lines, each with or without \\u escapes (an unpaired surrogate written raw is not UTF-8)."""
    return "\n".join(json.dumps(record, ensure_ascii=escaped) for record, escaped in lines).encode("utf-8", "surrogatepass")


one_field_records = st.sampled_from(sorted(near_valid)).flatmap(lambda field: st.fixed_dictionaries({"prompt": prompts, field: near_valid[field]}))
jsonl_files = st.one_of(
    st.lists(st.tuples(one_field_records, st.booleans()), min_size=1, max_size=2).map(as_jsonl),  # each field's checks
    st.lists(st.tuples(prompt_records(), st.booleans()), min_size=1, max_size=2).map(as_jsonl),
    st.lists(st.tuples(records, st.booleans()), max_size=3).map(as_jsonl),
)
fragments = st.sampled_from([b'{"prompt": "a red car"}', b"\n", b"\r\n", b"\xef\xbb\xbf", "\u2028".encode(), b'{"prompt": ', b'"', b"}", b"[", b"1" * 5000, b"[" * 3000, b"\xff", b"\\ud800", b"NaN"])
byte_files = st.one_of(st.binary(max_size=300), st.lists(fragments | st.binary(max_size=8), max_size=12).map(b"".join))


# ------------------------------------------------------------------------------------------------ the property


def loads_or_input_error(action: Callable[[], Any], must_name: str = "") -> Any:
    """Run ``action``: its result, or None when it raised InputError (with a non-empty message naming
    ``must_name``). Any other exception propagates and fails the test."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "skipped N blank lines" and PIL's warnings are fine
            result = action()
        event("loaded")
        return result
    except InputError as err:
        event("refused: " + next((f'bad "{f}"' for f in FIELDS if f'bad "{f}"' in str(err)), "other"))
        assert str(err).strip(), "an InputError without a message"
        assert must_name in str(err), f"the message does not name {must_name!r}: {err}"
        return None


def _write(folder: Path, name: str, content: bytes) -> Path:
    path = folder / name
    path.write_bytes(content)
    return path


@SETTINGS
@given(content=byte_files, suffix=st.sampled_from([".txt", ".jsonl"]))
def test_random_bytes_as_a_prompt_file(folder, content, suffix):
    path = _write(folder, "p" + suffix, content)
    read = loads_or_input_error(lambda: read_prompt_file(path), str(path))
    if read is not None:
        assert read and all(isinstance(r["prompt"], str) and r["prompt"] == r["prompt"].strip() and r["prompt"] for r in read)


@settings(SETTINGS, max_examples=300)
@given(content=jsonl_files, stage=st.sampled_from(["fit", "predict"]), resolution=st.sampled_from([None, 64]))
def test_random_json_records_through_the_datamodule(folder, monkeypatch, content, stage, resolution):
    monkeypatch.chdir(folder)  # predict's layout masks are relative to the working directory
    path = _write(folder, "p.jsonl", content)
    data = PromptDataModule(train_file=str(path), latent_resolution=resolution)
    if loads_or_input_error(lambda: data.setup(stage) or True, str(path)):
        loaded = data.predict_records if stage == "predict" else data.train_records
        assert loaded and all(data.location_of(record).startswith(f"{path}:") for record in loaded)


@SETTINGS
@given(prompt=prompts, content=jsonl_files)
def test_random_unicode_prompts_in_a_txt_file(folder, prompt, content):
    path = _write(folder, "p.txt", prompt.encode("utf-8", "surrogatepass") + b"\n" + content)
    loads_or_input_error(lambda: read_prompt_file(path), str(path))


@SETTINGS
@given(prompt=prompts, raw=near_valid["entities"] | json_values())
def test_random_entities_for_random_prompts(prompt, raw):
    entities = loads_or_input_error(lambda: entities_from_json(prompt, raw))
    for entity in entities or []:
        assert isinstance(entity, Entity)
        assert prompt[entity.noun.start : entity.noun.end] == entity.noun.text


@SETTINGS
@given(prompt=prompts)
def test_the_spacy_parser_on_random_unicode(parser, prompt):
    for entities in (loads_or_input_error(lambda: parser.parse(prompt)), loads_or_input_error(lambda: parser.nouns(prompt))):
        for item in entities or []:
            word = item.noun if isinstance(item, Entity) else item
            assert prompt[word.start : word.end] == word.text


@SETTINGS
@given(given_masks=near_valid["masks"] | json_values(), phrases=st.lists(words, max_size=3))
def test_random_mask_fields_through_the_masks_reader(folder, given_masks, phrases):
    reader = JsonlMasks(root=str(folder))
    record = {"prompt": "a red car", "masks": given_masks}
    masks = loads_or_input_error(lambda: reader(None, [phrases], [record]))
    for mask in masks[0] if masks is not None else []:
        assert mask is None or (mask.ndim == 2 and float(mask.min()) >= 0 and float(mask.max()) <= 1)
    loads_or_input_error(lambda: reader.check_records([record]))


@SETTINGS
@given(rle=rles | json_values())
def test_random_rle_dicts(rle):
    mask = loads_or_input_error(lambda: rle_decode(rle))
    if mask is not None:
        assert mask.dtype == np.bool_ and list(mask.shape) == list(rle["size"])
