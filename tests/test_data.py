"""Prompt files: every bad input named by file and line; JSONL extras carried into the batch."""

from __future__ import annotations

import warnings

import pytest

from datamodules import PromptDataModule, PromptFileError, read_prompt_file


def _write(tmp_path, name, content: bytes | str):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"prompt file {tmp_path}/nope.txt does not exist"):
        read_prompt_file(tmp_path / "nope.txt")


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_file(tmp_path, content):
    path = _write(tmp_path, "p.txt", content)
    with pytest.raises(PromptFileError, match=f"{path}: no prompts"):
        read_prompt_file(path)


def test_blank_lines_are_skipped_with_a_count(tmp_path):
    path = _write(tmp_path, "p.txt", "a red car\n\n  \na blue bus\n\n")
    with pytest.warns(UserWarning, match=r"skipped 3 blank line\(s\)"):
        records = read_prompt_file(path)
    assert [r["prompt"] for r in records] == ["a red car", "a blue bus"]


def test_malformed_json_names_the_line(tmp_path):
    path = _write(tmp_path, "p.jsonl", '{"prompt": "a red car"}\n{"prompt": "a blue bus",\n')
    with pytest.raises(PromptFileError, match=rf"{path}:2: malformed JSON"):
        read_prompt_file(path)


def test_missing_prompt_key_names_the_line(tmp_path):
    path = _write(tmp_path, "p.jsonl", '{"prompt": "a red car"}\n\n{"text": "a blue bus"}\n')
    with pytest.raises(PromptFileError, match=rf"{path}:3: record has no \"prompt\" key \(keys: \['text'\]\)"):
        read_prompt_file(path)


@pytest.mark.parametrize("line", ['"just a string"', '{"prompt": 3}', '{"prompt": "  "}'])
def test_wrong_record_shapes(tmp_path, line):
    path = _write(tmp_path, "p.jsonl", line + "\n")
    with pytest.raises(PromptFileError, match=rf"{path}:1: "):
        read_prompt_file(path)


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = _write(tmp_path, "p.txt", b"a red car\na blue bus\na caf\xe9 table\n")
    with pytest.raises(PromptFileError, match=rf"{path}:3: not valid UTF-8 \(byte 0xe9\)"):
        read_prompt_file(path)


def test_jsonl_extras_reach_the_batch(tmp_path):
    path = _write(tmp_path, "p.jsonl", '{"prompt": "a red car", "entities": [["car", ["red"]]]}\n{"prompt": "a cat"}\n')
    dm = PromptDataModule(train_file=str(path), batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch["prompt"]) == ["a cat", "a red car"]
    by_prompt = dict(zip(batch["prompt"], batch["entities"]))
    assert by_prompt == {"a red car": [["car", ["red"]]], "a cat": None}


def test_long_prompts_get_one_warning_with_the_count(tmp_path, tiny_paths):
    long_prompt = " ".join(["red car"] * 60)
    path = _write(tmp_path, "p.txt", f"a cat\n{long_prompt}\n{long_prompt} again\n")
    dm = PromptDataModule(train_file=str(path), tokenizer_model=tiny_paths["sd"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    messages = [str(w.message) for w in caught if "truncated" in str(w.message)]
    assert len(messages) == 1 and messages[0].startswith("2 of 3 train prompts are longer than the text encoder's 77 tokens")


def test_val_split_is_seeded_and_disjoint(tmp_path):
    path = _write(tmp_path, "p.txt", "\n".join(f"prompt {i}" for i in range(20)))
    splits = []
    for _ in range(2):
        dm = PromptDataModule(train_file=str(path), val_size=5, seed=3)
        dm.setup("fit")
        splits.append([r["prompt"] for r in dm.val_records])
        assert len(dm.train_records) == 15 and not {r["prompt"] for r in dm.train_records} & set(splits[-1])
    assert splits[0] == splits[1]
    with pytest.raises(ValueError, match="data.val_size=20 leaves no training prompts"):
        PromptDataModule(train_file=str(path), val_size=20).setup("fit")


def test_bad_datamodule_options():
    with pytest.raises(ValueError, match="data.batch_size must be >= 1"):
        PromptDataModule(train_file="x.txt", batch_size=0)
