"""Configuration and input errors at the command line: a few lines, no traceback, no usage dump, the culprit named
(option, file:line or class path) with the closest valid name, exit status 2; ``COMAT_TRACEBACK=1`` keeps the
traceback; a bug is never disguised as a user error."""

from __future__ import annotations

import os
import subprocess
import sys
from unittest import mock

import pytest
from conftest import REPO

from comat_lightning.command_errors import short_report, suggest
from comat_lightning.errors import InputError

DEMO = REPO / "configs" / "tiny_demo.yaml"


def line_of(path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def edited_demo(tmp_path, old: str, new: str):
    text = DEMO.read_text()
    assert text.count(old) == 1, old
    config = tmp_path / "edited.yaml"
    config.write_text(text.replace(old, new))
    return config


def train_py(args: list[str], **env) -> subprocess.CompletedProcess:
    """The real entry point in a subprocess: what a user sees on stderr (every line, Lightning's included)."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=environment, capture_output=True, text=True, timeout=300
    )


def assert_short(result: subprocess.CompletedProcess, *expected: str) -> str:
    err = result.stderr
    assert result.returncode == 2, err[-3000:]
    assert "Traceback" not in err and "usage:" not in err, err[-3000:]
    assert len(err.strip().splitlines()) <= 5, err
    for text in expected:
        assert text in err, (text, err)
    return err


@pytest.mark.slow
def test_negative_loss_weight_names_the_config_line_in_a_few_lines(tmp_path):
    config = edited_demo(tmp_path, "        weight: 1.0                 # loss options", "        weight: -1.0  # loss options")
    result = train_py(["fit", "--config", str(config)])
    assert_short(result, f"{config}:{line_of(config, 'weight: -1.0')}:", "ConceptMatchingLoss: weight must be >= 0")


@pytest.mark.slow
def test_class_path_typo_suggests_the_closest_class(tmp_path):
    config = edited_demo(tmp_path, "class_path: callbacks.ConceptMatchingLoss", "class_path: callbacks.ConceptMatchingLos")
    result = train_py(["fit", "--config", str(config)])
    assert_short(
        result,
        f"{config}:{line_of(config, 'ConceptMatchingLos')}:",
        "unknown class_path 'callbacks.ConceptMatchingLos': did you mean callbacks.ConceptMatchingLoss?",
    )


@pytest.mark.slow
def test_unknown_option_suggests_the_closest_option():
    result = train_py(["fit", "--config", str(DEMO), "--model.sampler.num_stepz", "3"])
    assert_short(result, "unknown option --model.sampler.num_stepz: did you mean --model.sampler.num_inference_steps?")


@pytest.mark.slow
def test_the_traceback_switch_keeps_the_full_traceback():
    result = train_py(["fit", "--config", str(DEMO), "--model.sampler.num_stepz", "3"], COMAT_TRACEBACK="1")
    assert result.returncode != 0 and "Traceback" in result.stderr


def run_command_line(args: list[str], capsys) -> str:
    """``command_line`` in-process (as train.py calls it); returns its stderr; it must exit with status 2."""
    from comat_lightning.cli import command_line

    with mock.patch.object(sys, "argv", ["train.py"]), pytest.raises(SystemExit) as exit_info:
        command_line(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    # Only the report: Lightning's log handler may still write to an earlier test's captured (closed) stderr.
    report = err[err.index("error: ") : err.index("(full traceback: COMAT_TRACEBACK=1)")]
    assert "Traceback" not in report and len(report.strip().splitlines()) <= 4, err
    return report


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"prompt": "a red car"}\n{"prompt": "a blue\n', "{file}:2: malformed JSON"),
        (None, "data.train_file: prompt file {file} does not exist"),
        ("", "{file}: no prompts"),
    ],
    ids=["malformed-jsonl-line", "missing-file", "empty-file"],
)
def test_bad_prompt_files_are_reported_in_a_few_lines(tmp_path, monkeypatch, capsys, content, expected):
    monkeypatch.setenv("COMAT_TRACEBACK", "")
    prompts = tmp_path / "prompts.jsonl"
    if content is not None:
        prompts.write_text(content)
    args = ["fit", "--config", str(DEMO), f"--data.train_file={prompts}", "--trainer.logger=false", "--trainer.max_steps=1"]
    assert expected.format(file=prompts) in run_command_line(args, capsys)


def test_a_bug_is_not_reported_as_a_user_error():
    assert short_report(RuntimeError("index out of range"), []) is None
    wrapped = ValueError("Does not validate against any of the Union subtypes")
    wrapped.__cause__ = InputError("ConceptMatchingLoss: weight must be >= 0 (and finite), got -1.0")
    assert short_report(wrapped, []).startswith("error: ConceptMatchingLoss: weight must be >= 0")


def test_long_messages_are_cut_to_five_lines():
    report = short_report(InputError("\n".join(f"problem {i}" for i in range(20))), [])
    assert len(report.splitlines()) == 5 and "more lines" in report


def test_suggestions_compare_the_last_part_of_a_name():
    options = ["--model.sampler.num_inference_steps", "--model.sampler.guidance_scale", "--model.seed"]
    assert suggest("--model.sampler.guidance_scal", options) == ": did you mean --model.sampler.guidance_scale?"
    assert suggest("--model.sampler.zzz", options) == ""
