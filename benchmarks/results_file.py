"""Where benchmark scripts put their figures: benchmarks/results/<name>.json, written atomically, and echoed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from comat_lightning.files.atomic import write_bytes_atomically

RESULTS = Path(__file__).resolve().parent / "results"


def save_results(result: dict[str, Any], out: Path) -> None:
    """Print ``result`` and write it as JSON to ``out`` (a half-written results file never replaces a good one)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2) + "\n"
    write_bytes_atomically(out, text.encode("utf-8"))
    print(text, end="")
    print(f"wrote {out}")
