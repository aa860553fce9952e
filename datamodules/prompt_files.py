"""Reading prompt files: ``.txt`` (one prompt per line) or ``.jsonl`` (one JSON object per line with a ``"prompt"``
string, and any other fields).

Every line is checked when the file is read, so that a typo fails at start-up with its file and line, not at the
first batch that holds it, after the models have loaded: the JSON itself, the prompt (a non-empty string that is
text: no unpaired surrogates), and the shape of each known optional field, against the prompt where it refers to
its words. Files a field names are checked later, by whoever resolves them (latent shards at
``PromptDataModule.setup``, mask images by the loss or the predict stage's setup), still before any model loads.
Lines end at ``"\\n"`` only, so line numbers are the ones an editor shows; a UTF-8 byte-order mark is accepted.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

from comat_lightning.errors import InputError, MissingInputFile
from comat_lightning.files.mask_files import check_mask_field
from comat_lightning.files.record_fields import CONCEPTS, ENTITIES, LATENT, LAYOUT, MASKS, PROMPT, SEED, TOKEN_INDICES
from comat_lightning.sampling.prediction import check_concepts, check_token_indices
from comat_lightning.text.entities import check_prompt, entities_from_json
from datamodules.latents import parse_latent_ref

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit seed


def _check_seed(prompt: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise InputError(f"must be an integer in [0, {MAX_SEED}], got {value!r}")


# field name -> check(prompt, value); each raises InputError saying what was expected
FIELD_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    ENTITIES: entities_from_json,
    LATENT: lambda prompt, value: parse_latent_ref(value),
    CONCEPTS: check_concepts,
    TOKEN_INDICES: lambda prompt, value: check_token_indices(value),
    SEED: _check_seed,
    MASKS: lambda prompt, value: check_mask_field(value, "masks"),  # JsonlMasks' default field
    LAYOUT: lambda prompt, value: check_mask_field(value, "layout"),  # predict's layout masks
}


def check_record_fields(record: dict[str, Any]) -> None:
    """Check every known optional field of a record whose "prompt" is already checked; null means absent."""
    for field, check in FIELD_CHECKS.items():
        value = record.get(field)
        if value is None:
            continue
        try:
            check(record[PROMPT], value)
        except InputError as err:
            raise InputError(f'bad "{field}": {err}') from None


class PromptFileError(InputError):
    """A prompt file that cannot be used; the message names the file and line."""


def read_prompt_file(path: str | Path, option: Optional[str] = None) -> list[dict[str, Any]]:
    """Read prompt records from ``path`` (.txt or .jsonl); each record has at least a non-empty ``"prompt"``.
    ``option`` (e.g. "data.train_file") is named when the file does not exist."""
    return [record for _, record in read_numbered_prompt_file(path, option)]


def read_numbered_prompt_file(path: str | Path, option: Optional[str] = None) -> list[tuple[int, dict[str, Any]]]:
    """Like :func:`read_prompt_file`, with each record's line number (for messages about it later)."""
    path = Path(path)
    if not path.is_file():
        named = f"{option}: " if option else ""
        problem = "does not exist" if not path.exists() else "is not a file"
        raise MissingInputFile(f"{named}prompt file {path} {problem} (expected a .txt with one prompt per line or a .jsonl)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (some Windows editors write one) is not part of line 1
    except UnicodeDecodeError as err:  # err.object: the bytes after the byte-order mark
        line = err.object[: err.start].count(b"\n") + 1
        raise PromptFileError(f"{path}:{line}: not valid UTF-8 (byte 0x{err.object[err.start]:02x}); save the file as UTF-8") from None
    is_jsonl = path.suffix.lower() in (".jsonl", ".json")
    records, blank = [], 0
    # Lines end at "\n" only: not at the other breaks str.splitlines knows, which JSON strings may hold.
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline ending the last line
    for number, line in enumerate(lines, start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            blank += 1
            continue
        try:
            record = _parse_line(line, is_jsonl)
        except InputError as err:
            raise PromptFileError(f"{path}:{number}: {err}") from None
        records.append((number, record))
    if not records:
        raise PromptFileError(f"{path}: no prompts (the file is empty or has only blank lines)")
    if blank:
        warnings.warn(f"{path}: skipped {blank} blank line(s)", stacklevel=2)
    return records


def _parse_line(line: str, is_jsonl: bool) -> dict[str, Any]:
    """One non-blank line as a checked record; InputError says what is wrong (the caller adds file and line)."""
    if not is_jsonl:
        return {"prompt": check_prompt(line.strip())}
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"malformed JSON ({err.msg} at column {err.colno})") from None
    except (ValueError, RecursionError) as err:  # an integer of over 4300 digits, nesting too deep for the parser
        raise InputError(f"malformed JSON ({err})") from None
    if not isinstance(record, dict):
        raise InputError(f"expected a JSON object like {{\"prompt\": \"...\"}}, got {type(record).__name__}")
    if "prompt" not in record:
        raise InputError(f"record has no \"prompt\" key (keys: {sorted(record)})")
    if not isinstance(record[PROMPT], str) or not record[PROMPT].strip():
        raise InputError(f"\"prompt\" must be a non-empty string, got {record['prompt']!r}")
    record[PROMPT] = check_prompt(record[PROMPT].strip())
    check_record_fields(record)  # entities, latent (its form: the file is checked at setup), concepts, masks, ...
    return record


__all__ = ["FIELD_CHECKS", "PromptFileError", "check_record_fields", "read_numbered_prompt_file", "read_prompt_file"]
