"""benchmarks/gpu_check.py: the dry run (same code path on CPU, tiny models) passes and writes every row; without
CUDA and without --dry-run it refuses in a few lines; the wheels carried to the GPU machine are exactly what the
check imports beyond the machine's preinstalled packages; the wrapper installs and verifies carried wheels."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks.gpu_wheels import PREINSTALLED, WHEELS, normalise  # noqa: E402

PROJECT = {"comat_lightning", "callbacks", "datamodules", "benchmarks", "configs", "tests"}
RUNTIME_MODULES = {"cython_runtime"}  # made by compiled Cython extensions, belongs to no distribution
# Runs the dry run and records, at exit, every top-level module the process imported.
RECORDING_RUN = """
import atexit, json, runpy, sys
record = sys.argv.pop(1)
atexit.register(lambda: open(record, "w").write(json.dumps(sorted({name.split(".")[0] for name in sys.modules}))))
sys.argv[0] = "benchmarks/gpu_check.py"
runpy.run_path("benchmarks/gpu_check.py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    record = out / "imported.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, "-c", RECORDING_RUN, str(record), "--dry-run", "--profile", "--out", str(out / "rows")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "rows" / "gpu_check.jsonl").read_text().splitlines()]
    return {"rows": {r["name"]: r for r in rows}, "out": out / "rows", "imported": json.loads(record.read_text()), "stdout": proc.stdout}


@pytest.mark.slow
def test_dry_run_writes_every_measurement(dry_run):
    rows = dry_run["rows"]
    expected = ["matmul_peak", "sd15_b4", "sdxl_b1", "sdxl_b4", "guided_sampling", "smoke", "sd15_b4_adamw8bit",
                "sd15_b4_no_checkpointing", "sd15_b4_rank128"]  # fmt: skip
    assert list(rows) == expected
    assert {name: r["status"] for name, r in rows.items()} == dict.fromkeys(expected, "ok")
    for name in expected:
        assert rows[name]["dry_run"] is True and rows[name]["versions"]["torch"] and rows[name]["command"].startswith("python")
    step = rows["sd15_b4"]
    assert step["steps_timed"] >= 3 and step["seconds_per_generator_step_median"] > 0 and step["model_tflops_per_step"] > 0
    assert step["estimated_peak_allocated_gib"] > 0 and step["mfu"] > 0  # MFU against the run's own matmul peak
    assert rows["sd15_b4_no_checkpointing"]["gradient_checkpointing"] is False and rows["sd15_b4_rank128"]["lora_rank"] == 128
    assert rows["sd15_b4_adamw8bit"]["optimizer"] == "adamw8bit" and rows["sd15_b4_adamw8bit"]["optimizer_state"]
    sampling = rows["guided_sampling"]
    assert set(sampling["ratio_to_plain"]) == {"plain", "astar_ours", "attend_and_excite_ours", "attend_and_excite_diffusers"}
    smoke = rows["smoke"]
    assert smoke["all_passed"] and smoke["resume"]["generator_step_after_resume"] == 3 and smoke["resume"]["trainable_tensors"] > 0
    assert 0 <= smoke["bf16_vs_fp32_rollout_relative_difference"] < 0.5
    scale = [json.loads(line) for line in (dry_run["out"] / "scale.jsonl").read_text().splitlines()]
    assert [r["name"] for r in scale] == [n for n in expected if rows[n]["measurement"] == "comat_step"]
    assert "top operators and kernels" in (dry_run["out"] / "profile_sd15.txt").read_text()
    assert "gpu_check done" in dry_run["stdout"]


@pytest.mark.slow
def test_carried_wheels_are_what_the_check_imports_beyond_the_gpu_image(dry_run):
    """Every third-party distribution the dry run imported is preinstalled there or carried as a wheel; every
    carried wheel is imported or required by distribution metadata (LightningCLI checks jsonargparse[signatures])."""
    by_module = importlib.metadata.packages_distributions()
    imported, unmapped = set(), set()
    for module in dry_run["imported"]:
        if module in sys.stdlib_module_names or module in sys.builtin_module_names or module in PROJECT | RUNTIME_MODULES:
            continue
        if module not in by_module:
            unmapped.add(module)
            continue
        imported.update(normalise(d) for d in by_module[module])
    assert not {m for m in unmapped if not m.startswith("_")}, f"modules of no distribution: {sorted(unmapped)}"
    signatures = {normalise(r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip())
                  for r in importlib.metadata.requires("jsonargparse") or [] if 'extra == "signatures"' in r}  # fmt: skip
    needed = (imported | signatures) - preinstalled_closure()
    carried = {normalise(n) for n in WHEELS}
    assert needed == carried, f"imported but neither preinstalled nor carried: {sorted(needed - carried)}; carried but unused: {sorted(carried - needed)}"
    assert "spacy" not in imported  # entities come precomputed from the prompt file (spaCy is not on the GPU image)


def preinstalled_closure() -> set[str]:
    """PREINSTALLED and, as installed here, everything they require (a package on the GPU image brings its own
    dependencies there, whatever version of them it uses: e.g. huggingface-hub 2 imports httpx2 here)."""
    from packaging.requirements import Requirement

    seen, todo = set(), list(PREINSTALLED)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(normalise(req.name))
    return seen


def test_prompts_file_is_the_demo_prompts_with_their_entities():
    """benchmarks/data/gpu_check_prompts.jsonl = prepare_entities(data/demo_prompts.jsonl) (spaCy is not on the GPU image)."""
    from comat_lightning.text.entities import EntityParser
    from comat_lightning.tools.prepare_entities import prepare_records

    demo = [json.loads(line) for line in (REPO / "data" / "demo_prompts.jsonl").read_text().splitlines() if line.strip()]
    committed = [json.loads(line) for line in (REPO / "benchmarks" / "data" / "gpu_check_prompts.jsonl").read_text().splitlines()]
    assert committed == prepare_records(demo, EntityParser())[0]


def test_refuses_without_cuda_unless_dry_run(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here")
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) <= 3 and "no CUDA device" in lines[0] and "--dry-run" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def _wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel (what pip needs: the module, METADATA, WHEEL, RECORD)."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": f"VERSION = {version!r}\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}  # fmt: skip
    with zipfile.ZipFile(path, "w") as z:
        for arcname, text in files.items():
            z.writestr(arcname, text)
        z.writestr(f"{info}/RECORD", "".join(f"{a},,\n" for a in files) + f"{info}/RECORD,,\n")
    return path


def test_wrapper_installs_carried_wheels_and_checks_their_versions(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    _wheel(wheels, "gpu_check_probe", "1.2.3")
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_WHEELS": str(wheels), "GPU_CHECK_SITE": str(site)}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--install-only"], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "gpu_check_probe 1.2.3 installed" in proc.stdout
    assert (site / "gpu_check_probe" / "__init__.py").exists()


def test_download_command_pins_every_wheel_for_the_gpu_machine():
    from benchmarks.gpu_wheels import download_command

    command = download_command(Path("/tmp/w"))
    assert {"--no-deps", "--only-binary=:all:", "--python-version=3.12"} <= set(command)
    assert [a for a in command if "==" in a] == [f"{n}=={v}" for n, v in WHEELS.items()]
    from packaging.requirements import Requirement

    ranges = {normalise(r.name): r.specifier for r in map(Requirement, _pyproject_dependencies())}
    for name in ("diffusers", "jsonargparse", "bitsandbytes"):  # the carried versions are within what we test
        assert WHEELS[name] in ranges[normalise(name)]


def _pyproject_dependencies() -> list[str]:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
