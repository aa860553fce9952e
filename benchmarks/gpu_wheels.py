"""The packages benchmarks/gpu_check.py needs on the GPU machine beyond what its image already holds, as wheels.

The GPU machine has no network; Python 3.12 with torch, lightning, transformers, peft, torchmetrics, tensorboard,
safetensors, numpy and pillow (and their own dependencies) is installed there (PREINSTALLED: the image's package
list as read on 2026-11-17, /work/.library/device/KINDS.md). What else the check imports travels with the working
tree as wheels in the git-ignored ``.whl/`` folder and is installed there by benchmarks/gpu_check.sh with
``pip install --no-index --no-deps --target``. tests/benchmarks/test_gpu_check.py runs the dry run, records every
module it imports and checks that those outside the standard library, this repository and PREINSTALLED are
exactly WHEELS.

    python benchmarks/gpu_wheels.py download         # here, with a package registry: -> .whl/ (about 50 MB)
    python benchmarks/gpu_wheels.py list             # what would be downloaded
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEEL_DIR = REPO / ".whl"

# name -> version: the versions this repository is tested with (keep in step with pyproject.toml's pins).
WHEELS = {
    "diffusers": "0.42.1",
    "jsonargparse": "4.53.0",
    "docstring-parser": "0.18.0",  # jsonargparse[signatures], which LightningCLI checks for by distribution metadata
    "typeshed-client": "2.15.0",  # likewise
    "bitsandbytes": "0.50.2",  # only the 8-bit AdamW measurement; 43 MB: leave it out to split the check (--parts)
}

# Distributions on the GPU image (normalised names), from its package list.
PREINSTALLED = frozenset(
    """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
    charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
    cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
    formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
    imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
    lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
    matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
    networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
    nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
    nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
    opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
    peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
    pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
    python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
    scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
    statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
    tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
    triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
    zipp""".split()
)


def normalise(name: str) -> str:
    """PEP 503 name: lower case, runs of '-', '_' and '.' as one '-'."""
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def download_command(dest: Path = WHEEL_DIR, names: tuple[str, ...] = tuple(WHEELS)) -> list[str]:
    """pip download of the pinned wheels for the GPU machine (CPython 3.12, x86-64 manylinux), without their
    dependencies (those are PREINSTALLED or listed in WHEELS)."""
    platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                                              "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64", "any")]  # fmt: skip
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version=3.12",
            "--implementation=cp", *platforms, "-d", str(dest), *(f"{n}=={WHEELS[n]}" for n in names)]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["download", "list"])
    parser.add_argument("--without", nargs="*", default=[], choices=list(WHEELS), help="leave these out (e.g. bitsandbytes)")
    args = parser.parse_args()
    names = tuple(n for n in WHEELS if n not in args.without)
    if args.action == "list":
        print("\n".join(f"{n}=={WHEELS[n]}" for n in names))
        return
    WHEEL_DIR.mkdir(exist_ok=True)
    subprocess.run(download_command(WHEEL_DIR, names), check=True)
    stale = [w for w in WHEEL_DIR.glob("*.whl") if not any(w.name.startswith(f"{n.replace('-', '_')}-{WHEELS[n]}-") for n in names)]
    for wheel in stale:  # two versions of a package, or one left out, would break the install there
        wheel.unlink()
    total = sum(w.stat().st_size for w in WHEEL_DIR.glob("*.whl"))
    print(f"{WHEEL_DIR}: {len(list(WHEEL_DIR.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
