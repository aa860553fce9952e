#!/usr/bin/env bash
# The GPU check in one command, on the GPU machine, from any folder:
#   bash benchmarks/gpu_check.sh [--profile] [--budget 420] [--parts core adamw8bit extra]
# Installs the wheels carried in .whl/ (made here by `python benchmarks/gpu_wheels.py download`) into $GPU_CHECK_SITE
# (default /tmp/site), checks that each one is importable at its version, then runs benchmarks/gpu_check.py with the
# remaining arguments. `--install-only` stops after the install check. Through the device tool:
#   run(command="bash benchmarks/gpu_check.sh --profile", carry=[".whl"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
SITE=${GPU_CHECK_SITE:-/tmp/site}
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  # wheel file names are NAME-VERSION-...: each must now be the version Python finds (not an older preinstalled one)
  "$PYTHON" - "${wheels[@]}" <<'PY'
import importlib.metadata, os, sys
for path in sys.argv[1:]:
    name, version = os.path.basename(path).split("-")[:2]
    found = importlib.metadata.version(name)
    if found != version:
        sys.exit(f"gpu_check.sh: {name} {version} was installed but Python finds {found}; check PYTHONPATH")
    print(f"gpu_check.sh: {name} {version} installed")
PY
else
  echo "gpu_check.sh: no wheels in $WHEELS/ (python benchmarks/gpu_wheels.py download makes them); using installed packages"
fi
for arg in "$@"; do
  [ "$arg" = "--install-only" ] && exit 0
done
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
exec "$PYTHON" benchmarks/gpu_check.py "$@"
