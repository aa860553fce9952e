"""Precompute the entity parse of a prompt file, so that training never loads spaCy.

    python -m comat_lightning.tools.prepare_entities INPUT(.txt|.jsonl) OUTPUT.jsonl [--spacy-model NAME]

Every record keeps all its fields; records without an "entities" field get the parse in ``Entity.to_json`` form
(with character offsets, so that loading it back is exact and needs no search). Records that already have
"entities" (hand-written) keep them unchanged. OUTPUT is written atomically: on any error it is left untouched.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from comat_lightning.files.atomic import atomic_write
from comat_lightning.files.record_fields import ENTITIES, PROMPT
from comat_lightning.text.entities import OFFICIAL_SPACY_MODEL, EntityParser


def prepare_records(records: list[dict], parser: EntityParser) -> tuple[list[dict], dict[str, int]]:
    """Records with "entities" filled in where missing, and counts for the summary line."""
    missing = [r for r in records if r.get(ENTITIES) is None]
    parses = parser.parse_many([r[PROMPT] for r in missing])
    parsed = {id(r): [e.to_json() for e in entities] for r, entities in zip(missing, parses)}
    out = [{**r, ENTITIES: parsed[id(r)]} if id(r) in parsed else dict(r) for r in records]
    counts = {
        "prompts": len(out),
        "with_entities": sum(bool(r[ENTITIES]) for r in out),
        "entities": sum(len(r[ENTITIES]) for r in out),
        "hand_written": len(records) - len(missing),
    }
    return out, counts


def write_jsonl_atomically(records: list[dict], path: Path) -> None:
    """Write to a temporary file in the same folder, then rename over ``path``: never a half-written file."""
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    summary = __doc__.split("\n\n")[0]
    cli = argparse.ArgumentParser(prog="python -m comat_lightning.tools.prepare_entities", description=summary)
    cli.add_argument("input", type=Path, help="prompt file: .txt (one prompt per line) or .jsonl")
    cli.add_argument("output", type=Path, help="JSONL file to write (.jsonl)")
    cli.add_argument("--spacy-model", default=OFFICIAL_SPACY_MODEL, help="spaCy pipeline (default: %(default)s)")
    args = cli.parse_args(argv)
    if args.output.suffix.lower() not in (".jsonl", ".json"):
        cli.error(f"OUTPUT {args.output} must end in .jsonl (the prompt reader treats other files as plain text)")
    if not args.output.parent.is_dir():
        cli.error(f"OUTPUT folder {args.output.parent} does not exist")

    # Imported after argument parsing: it pulls in torch and Lightning, which `--help` does not need.
    from datamodules.prompts import read_prompt_file  # the same reader (and checks) as training

    try:
        records = read_prompt_file(args.input)
        prepared, counts = prepare_records(records, EntityParser(args.spacy_model))
        write_jsonl_atomically(prepared, args.output)
    except (OSError, ImportError, ValueError) as err:  # bad file, missing model: the message says it all
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"{counts['prompts']} prompts, {counts['with_entities']} with entities, {counts['entities']} entities in total "
        f"({counts['hand_written']} records kept their hand-written entities) -> {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
