#!/usr/bin/env bash
# Creates .venv and installs comat-lightning with its test extras, CPU-only.
# torch goes in first and is pinned while the rest resolves: a bare `torch` requirement would otherwise pull
# a multi-GB CUDA build. A torch already in .venv (e.g. a CUDA build you installed) is kept unless TORCH_SPEC
# is set; TORCH_SPEC names the torch to install otherwise (default: the CPU wheel torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if [ -n "${TORCH_SPEC:-}" ] || ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
.venv/bin/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$constraints"
.venv/bin/python -m pip install --quiet -c "$constraints" -e ".[test]"
echo "comat-lightning installed in .venv ($(cat "$constraints"))"
