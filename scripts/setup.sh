#!/usr/bin/env bash
# Creates .venv and installs comat-lightning with its test extras, CPU-only.
# torch goes in first and is pinned while the rest resolves: a bare `torch` requirement would otherwise pull
# a multi-GB CUDA build. On a GPU machine, install the CUDA torch you want first and set TORCH_SPEC to it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "$TORCH_SPEC"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
.venv/bin/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$constraints"
.venv/bin/python -m pip install --quiet -c "$constraints" -e ".[test]"
echo "comat-lightning installed in .venv ($(cat "$constraints"))"
