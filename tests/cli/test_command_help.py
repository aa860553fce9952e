"""``python train.py`` / ``--help``: what the project is, every shipped config, where the docs are; printed without
importing torch or Lightning (so at once)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

from comat_lightning.command_help import overview, wants_overview


def test_overview_lists_every_shipped_config_and_points_at_the_docs():
    text = overview()
    for config in (REPO / "configs").glob("*.yaml"):
        assert f"  {config.name} " in text
    assert "ablations/" in text and "docs/" in text and "COMAT_TRACEBACK=1" in text
    assert "train.py fit --help" in text  # the way to every option of a subcommand
    assert max(len(line) for line in text.splitlines()) <= 110


def test_only_a_bare_call_or_help_gets_the_overview():
    assert wants_overview([]) and wants_overview(["--help"]) and wants_overview(["-h"])
    assert not wants_overview(["fit", "--help"]) and not wants_overview(["fit", "--config", "configs/tiny_demo.yaml"])


def test_train_py_help_prints_the_overview_without_importing_torch_or_lightning():
    code = (
        "import runpy, sys\n"
        "sys.argv = ['train.py', '--help']\n"
        "try:\n    runpy.run_path('train.py', run_name='__main__')\n"
        "except SystemExit as exit:\n    assert exit.code == 0, exit.code\n"
        "print(sorted(m for m in ('torch', 'lightning', 'transformers', 'diffusers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("comat-lightning: ") and result.stdout.strip().endswith("[]"), result.stdout
