"""``python train.py`` / ``--help``: what the project is, the shipped configs and where the docs are, printed in
well under a second (nothing heavy is imported; ``train.py fit --help`` gives every option of a subcommand)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ("fit", "validate", "test", "predict")


def wants_overview(argv: list[str]) -> bool:
    """No subcommand at all, or only ``-h`` / ``--help``: the overview, not Lightning's generic usage."""
    return argv in ([], ["-h"], ["--help"])


def describe(config: Path) -> str:
    """A config's first comment line (each shipped config starts with one saying what it runs)."""
    first = config.read_text().splitlines()[:1]
    return first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""


def overview(repo: Path = REPO, width: int = 110) -> str:
    configs = sorted((repo / "configs").glob("*.yaml"))
    ablations = sorted((repo / "configs" / "ablations").glob("*.yaml"))
    name_width = max((len(c.name) for c in configs), default=0) + 2
    lines = [
        "comat-lightning: fine-tune text-to-image diffusion models to draw every object of the prompt with its",
        "attributes (CoMat), and guide sampling by attention (A-STAR, Attend-and-Excite). PyTorch Lightning.",
        "",
        "usage: python train.py {" + ",".join(SUBCOMMANDS) + "} --config CONFIG [--section.option=VALUE ...]",
        "       python train.py fit --help        every option of a subcommand",
        "",
        "configs/ (recipes and demos):",
    ]
    for config in configs:
        text = f"  {config.name:<{name_width}}{describe(config)}"
        lines.append(text if len(text) <= width else text[: width - 3] + "...")
    if ablations:
        lines.append(f"  ablations/ ({len(ablations)} configs: one loss term removed from a recipe)")
    lines += [
        "",
        "first run:  python train.py fit --config configs/demo.yaml   (CPU, no downloads)",
        "docs:       README.md and docs/ (docs/architecture.md for how the code is laid out)",
        "errors:     configuration errors are reported in a few lines; COMAT_TRACEBACK=1 shows the full traceback",
    ]
    return "\n".join(lines)
