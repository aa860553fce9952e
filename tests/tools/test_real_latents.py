"""Real latents for the Fidelity Preservation loss: the command (frozen base, per-prompt seeds, resumable shards)
and the datamodule that serves them (checked by file and line before any model loads)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import yaml
from conftest import REPO, run_cli
from safetensors import safe_open
from safetensors.torch import save_file

from datamodules import PromptDataModule, PromptFileError

PROMPTS = [
    {"prompt": "a red car", "entities": [["car", ["red"]]]},
    {"prompt": "a black cat", "tag": "x"},
    {"prompt": "a blue bus and a green apple"},
    {"prompt": "a dog"},
    {"prompt": "a white horse", "tag": "y"},
]
SHARD_SIZE = 2  # 5 prompts: shards of 2, 2, 1


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny tensors: thread hand-offs cost more than they save, and a busy 2-core machine makes them very slow.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write_config(path: Path, base: str, train_file: Path, steps: int = 3) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / base).read_text())
    cfg["model"]["sampler"].update(resolution=64, num_inference_steps=steps)
    cfg["data"].update(train_file=str(train_file), val_file=None, batch_size=2)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _perturb_lora(module) -> None:
    # LoRA starts at B = 0 (online == base); move it, so that sampling the base and the online model differ.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in module.backbone.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


@pytest.fixture(scope="module")
def command(tmp_path_factory, tiny_paths):
    """The command on a tiny SD config; the model is built (through the training CLI) once per module."""
    from comat_lightning.tools import real_latents

    folder = tmp_path_factory.mktemp("real_latents")
    prompts = _write_jsonl(folder / "prompts.jsonl", PROMPTS)
    config = _write_config(folder / "config.yaml", "tiny_demo.yaml", prompts)
    built: dict = {}
    build = real_latents.build_module

    def build_once(path):
        if path not in built:
            module, trainer, datamodule = build(path)
            module.configure_model()
            _perturb_lora(module)
            built[path] = (module, trainer, datamodule)
        return built[path]

    def run(output: Path, *extra: str) -> int:
        with mock.patch.object(real_latents, "build_module", build_once):
            return real_latents.main(["--config", str(config), "--output", str(output), "--shard-size", str(SHARD_SIZE), *extra])

    assert run(folder / "out") == 0
    return SimpleNamespace(run=run, module=built[config][0], out=folder / "out", folder=folder, config=config)


def _alone(module, prompt: str, seed: int, base: bool = True) -> torch.Tensor:
    """The prompt sampled on its own from its seed, by the frozen base (or the online model, LoRA on)."""
    with torch.no_grad(), (module.rollout.frozen_base() if base else contextlib.nullcontext(module.backbone.unet)) as unet:
        return module.rollout.sample([prompt], torch.Generator().manual_seed(seed), unet=unet)[0]


def _shard_latents(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("shard-*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            out[path.name] = handle.get_tensor("latents")
    return out


def _by_prompt(folder: Path) -> dict[str, torch.Tensor]:
    shards = _shard_latents(folder)
    records = [json.loads(line) for line in (folder / "real_latents.jsonl").read_text().splitlines()]
    return {r["prompt"]: shards[r["latent"]["file"]][r["latent"]["index"]] for r in records}


def _close(batched: torch.Tensor, alone: torch.Tensor) -> bool:
    # Same noise exactly (see test_per_prompt_generators_draw_the_same_noise_in_any_batch); the UNet's float sums
    # depend on the batch size at ~1e-6, which CFG 7.5 and the steps amplify: compare relative to the latents' scale.
    return (batched - alone).abs().max().item() <= 1e-5 * max(1.0, alone.abs().max().item())


def test_command_writes_one_frozen_base_latent_per_prompt(command):
    records = [json.loads(line) for line in (command.out / "real_latents.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == [p["prompt"] for p in PROMPTS]
    assert records[0]["entities"] == [["car", ["red"]]] and records[1]["tag"] == "x"  # all fields kept
    assert [r["latent_seed"] for r in records] == list(range(5))  # seed 0: 0 * 1000003 + i
    assert [r["latent"] for r in records] == [
        {"file": f"shard-0000{i // 2}.safetensors", "index": i % 2} for i in range(5)
    ]
    shards = _shard_latents(command.out)
    assert {k: tuple(v.shape) for k, v in shards.items()} == {
        "shard-00000.safetensors": (2, 4, 8, 8), "shard-00001.safetensors": (2, 4, 8, 8), "shard-00002.safetensors": (1, 4, 8, 8)
    }  # fmt: skip
    assert all(v.dtype == torch.float32 for v in shards.values())
    with safe_open(str(command.out / "shard-00001.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["config"] == str(command.config.resolve()) and meta["seeds"] == "2..3" and meta["first_index"] == "2"
    assert json.loads(meta["sampler"])["num_inference_steps"] == 3 and meta["precision"] == "32-true"

    module = command.module
    for i, (prompt, latent) in enumerate(_by_prompt(command.out).items()):
        alone = _alone(module, prompt, seed=i)
        assert _close(latent, alone), (prompt, (latent - alone).abs().max())
        # The LoRA was moved: the online model samples something else, so these are the base model's latents.
        assert not _close(latent, _alone(module, prompt, seed=i, base=False))


def test_per_prompt_generators_draw_the_same_noise_in_any_batch():
    from comat_lightning.sampling.denoising import initial_noise

    def noise(seeds):
        return initial_noise(len(seeds), 4, 8, [torch.Generator().manual_seed(s) for s in seeds], "cpu", 1.0)

    together = noise([5, 6, 7])
    assert torch.equal(together[1:2], noise([6])) and torch.equal(together[2:], noise([7]))


def test_interrupted_command_resumes_and_regenerates_only_bad_shards(command, monkeypatch):
    import safetensors.torch

    from comat_lightning.sampling import prediction

    out = command.folder / "resumed"
    save = safetensors.torch.save_file
    saves = []

    def save_then_die(tensors, filename, metadata=None):  # killed while writing the second shard
        save(tensors, filename, metadata=metadata)
        saves.append(filename)
        if len(saves) == 2:
            raise RuntimeError("killed")

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        command.run(out)
    monkeypatch.setattr(safetensors.torch, "save_file", save)
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000.safetensors"]  # no temp file, no index yet
    kept_mtime = (out / "shard-00000.safetensors").stat().st_mtime_ns

    generated = []
    generate = prediction.predict_latents
    monkeypatch.setattr(prediction, "predict_latents", lambda m, batch: generated.append(list(batch["prompt"])) or generate(m, batch))
    assert command.run(out) == 0
    assert generated == [["a blue bus and a green apple", "a dog"], ["a white horse"]]  # shard 0 was kept
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == kept_mtime
    expected = _shard_latents(command.out)
    assert {k: torch.equal(v, expected[k]) for k, v in _shard_latents(out).items()} == dict.fromkeys(expected, True)
    assert (out / "real_latents.jsonl").read_text() == (command.out / "real_latents.jsonl").read_text()

    # A truncated shard, a stale one (another seed) and a leftover temporary file from a killed save.
    path = out / "shard-00001.safetensors"
    path.write_bytes(path.read_bytes()[:-16])
    save_file({"latents": torch.zeros(1, 4, 8, 8)}, str(out / "shard-00002.safetensors"), metadata={"seed": "7"})
    (out / ".shard-00002.safetensors.x1.tmp").write_bytes(b"partial")
    generated.clear()
    assert command.run(out) == 0
    assert generated == [["a blue bus and a green apple", "a dog"], ["a white horse"]]
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == kept_mtime
    assert all(torch.equal(v, expected[k]) for k, v in _shard_latents(out).items())
    assert not list(out.glob(".*.tmp"))


def test_datamodule_serves_prompt_and_real_latent_pairs(command):
    from comat_lightning.files.record_fields import REAL_LATENT as REAL_LATENT_KEY

    written = _by_prompt(command.out)
    dm = PromptDataModule(train_file=str(command.out / "real_latents.jsonl"), batch_size=1, latent_resolution=64)
    dm.setup("fit")
    seen = {}
    for batch in dm.train_dataloader():
        assert batch[REAL_LATENT_KEY].shape == (1, 4, 8, 8) and batch[REAL_LATENT_KEY].dtype == torch.float32
        seen[batch["prompt"][0]] = batch[REAL_LATENT_KEY][0]
        assert batch["latent_seed"][0] == [p["prompt"] for p in PROMPTS].index(batch["prompt"][0])
    assert seen.keys() == written.keys() and all(torch.equal(seen[p], written[p]) for p in seen)
    # The pair is right: regenerating the prompt alone from its recorded seed gives its latent.
    assert _close(seen["a dog"], _alone(command.module, "a dog", seed=3))

    # A batch stacks real latents only when every record has one.
    records = [json.loads(line) for line in (command.out / "real_latents.jsonl").read_text().splitlines()]
    mixed = _write_jsonl(command.out / "mixed.jsonl", records[:2] + [{"prompt": "a cat"}])
    dm = PromptDataModule(train_file=str(mixed), batch_size=3)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert REAL_LATENT_KEY not in batch and sorted(batch["prompt"]) == ["a black cat", "a cat", "a red car"]
    dm = PromptDataModule(train_file=str(mixed), val_file=str(mixed), batch_size=2)
    dm.setup("fit")
    val = list(dm.val_dataloader())  # in file order: [2 with latents], [1 without]
    assert val[0][REAL_LATENT_KEY].shape == (2, 4, 8, 8) and REAL_LATENT_KEY not in val[1]


def _bad_reference_cases(tmp_path: Path) -> dict[str, tuple[object, str]]:
    save_file({"latents": torch.zeros(2, 4, 8, 8)}, str(tmp_path / "good.safetensors"))
    save_file({"other": torch.zeros(2, 4, 8, 8)}, str(tmp_path / "nokey.safetensors"))
    save_file({"latents": torch.zeros(2, 4, 16, 16)}, str(tmp_path / "big.safetensors"))
    save_file({"latents": torch.zeros(2, 3, 8, 8)}, str(tmp_path / "rgb.safetensors"))
    save_file({"latents": torch.zeros(2, 4, 8, 8, dtype=torch.int64)}, str(tmp_path / "ints.safetensors"))
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "good.safetensors").read_bytes()[:-8])
    torch.save({"latents": torch.zeros(2, 4, 8, 8)}, tmp_path / "pickle.safetensors")
    return {
        "missing file": ({"file": "nope.safetensors", "index": 0}, r"latent file .*nope.safetensors does not exist"),
        "truncated": ({"file": "cut.safetensors", "index": 0}, r"cut.safetensors is not a readable safetensors file"),
        "pickle": ({"file": "pickle.safetensors", "index": 0}, r"pickle.safetensors is not a readable safetensors file"),
        "missing key": ({"file": "nokey.safetensors", "index": 0}, r'has no "latents" tensor \(tensors: \[\'other\'\]\)'),
        "index out of range": ({"file": "good.safetensors", "index": 2}, r"latent index 2 is out of range: .* holds 2 latents"),
        "wrong size": ({"file": "big.safetensors", "index": 0}, r"latents are \(4, 16, 16\), expected \(4, 8, 8\) for data.latent_resolution=64"),
        "wrong channels": ({"file": "rgb.safetensors", "index": 0}, r"has shape \(2, 3, 8, 8\), expected \(n, 4, h, w\)"),
        "not floats": ({"file": "ints.safetensors", "index": 0}, r'"latents" is I64, expected a float tensor'),
        "absolute path": ({"file": str(tmp_path / "nope2.safetensors"), "index": 0}, r"nope2.safetensors does not exist"),
        "bad form": ({"file": "good.safetensors"}, r'bad "latent": "index" must be an integer >= 0, got None'),
        "negative index": ({"file": "good.safetensors", "index": -1}, r'bad "latent": "index" must be an integer >= 0'),
        "bool index": ({"file": "good.safetensors", "index": True}, r'bad "latent": "index" must be an integer >= 0, got True'),
        "not an object": ("good.safetensors", r'bad "latent": expected \{"file"'),
    }


CASE_NAMES = [
    "missing file", "truncated", "pickle", "missing key", "index out of range", "wrong size", "wrong channels",
    "not floats", "absolute path", "bad form", "negative index", "bool index", "not an object",
]  # fmt: skip


@pytest.mark.filterwarnings("ignore:.*skipped 1 blank line")
@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_latent_references_name_file_and_line(tmp_path, case):
    reference, message = _bad_reference_cases(tmp_path)[case]
    good = {"file": "good.safetensors", "index": 1}
    path = tmp_path / "p.jsonl"
    path.write_text(
        json.dumps({"prompt": "a cat", "latent": good}) + "\n\n" + json.dumps({"prompt": "a dog", "latent": reference}) + "\n"
    )
    with pytest.raises(PromptFileError, match=rf"^{path}:3: .*{message}"):
        PromptDataModule(train_file=str(path), latent_resolution=64).setup("fit")


def test_latents_of_two_shapes_are_refused_without_a_resolution(tmp_path):
    save_file({"latents": torch.zeros(1, 4, 8, 8)}, str(tmp_path / "a.safetensors"))
    save_file({"latents": torch.zeros(1, 4, 16, 16)}, str(tmp_path / "b.safetensors"))
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{i}", "latent": {"file": f"{n}.safetensors", "index": 0}} for i, n in enumerate("ab")])
    with pytest.raises(PromptFileError, match=rf"{path}:2: .*b.safetensors: latents are \(4, 16, 16\) but an earlier reference's are \(4, 8, 8\)"):
        PromptDataModule(train_file=str(path)).setup("fit")
    with pytest.raises(ValueError, match="data.latent_resolution must be a positive multiple of 8"):
        PromptDataModule(train_file=str(path), latent_resolution=100)


def test_fit_with_a_bad_latent_reference_fails_before_any_model_loads(tmp_path, monkeypatch):
    from comat_lightning.models.backbone import DiffusionBackbone

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(REPO / "data")
    bad = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a cat"}, {"prompt": "a dog", "latent": {"file": "gone.safetensors", "index": 0}}])
    monkeypatch.setattr(DiffusionBackbone, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("a model was loaded")))
    with pytest.raises(PromptFileError, match=rf"{bad}:2: latent file .*gone.safetensors does not exist"):
        run_cli(["fit", "--config", str(REPO / "configs" / "tiny_demo.yaml"), "--trainer.logger=false", f"--data.train_file={bad}"])


def test_command_refuses_unsupported_precision_before_loading(tmp_path, monkeypatch, capsys):
    from comat_lightning.models.backbone import DiffusionBackbone
    from comat_lightning.tools import real_latents

    prompts = _write_jsonl(tmp_path / "p.jsonl", PROMPTS[:1])
    config = _write_config(tmp_path / "c.yaml", "tiny_demo.yaml", prompts)
    config.write_text(config.read_text().replace("precision: 32-true", "precision: bf16-true"))
    monkeypatch.setattr(DiffusionBackbone, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("a model was loaded")))
    assert real_latents.main(["--config", str(config), "--output", str(tmp_path / "out")]) == 1
    assert "trainer.precision=bf16-true" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        real_latents.main(["--config", str(config), "--output", str(tmp_path / "out"), "--shard-size", "0"])


@pytest.mark.parametrize("base, family, channels", [("demo_sdxl.yaml", "sdxl", 4), ("tiny_demo_sd3.yaml", "sd3", 16), ("tiny_demo_flux.yaml", "flux", 16)])
def test_command_works_for_sdxl_sd3_and_flux(base, family, channels, tmp_path, tiny_paths):
    from comat_lightning.tools import real_latents

    prompts = _write_jsonl(tmp_path / "p.jsonl", PROMPTS[:3])
    config = _write_config(tmp_path / "c.yaml", base, prompts, steps=2)
    built = []
    build = real_latents.build_module
    with mock.patch.object(real_latents, "build_module", lambda path: built.append(build(path)) or built[-1]):
        assert real_latents.main(["--config", str(config), "--output", str(tmp_path / "out"), "--batch-size", "3", "--seed", "2"]) == 0
    module = built[0][0]
    assert module.backbone.family == family
    records = [json.loads(line) for line in (tmp_path / "out" / "real_latents.jsonl").read_text().splitlines()]
    assert [r["latent_seed"] for r in records] == [2_000_006, 2_000_007, 2_000_008]  # 2 * 1000003 + i
    latents = _by_prompt(tmp_path / "out")
    assert [tuple(v.shape) for v in latents.values()] == [(channels, 8, 8)] * 3
    assert _close(latents["a blue bus and a green apple"], _alone(module, "a blue bus and a green apple", seed=2_000_008))


def test_sigterm_stops_at_the_next_batch_and_the_rerun_completes(command, monkeypatch):
    """A SIGTERM during shard 1's first batch: the command exits 143 after that batch with shard 0 on disk, shard 1
    unwritten and no index;
    the rerun keeps shard 0 and ends with exactly the uninterrupted files."""
    import os
    import signal

    from comat_lightning.sampling import prediction

    out = command.folder / "signalled"
    generate = prediction.predict_latents
    calls = []

    def generate_then_signal(module, batch):
        calls.append(list(batch["prompt"]))
        if len(calls) == 3:  # batches of one prompt: the signal arrives as shard 1 starts
            os.kill(os.getpid(), signal.SIGTERM)
        return generate(module, batch)

    monkeypatch.setattr(prediction, "predict_latents", generate_then_signal)
    before = signal.getsignal(signal.SIGTERM)
    assert command.run(out, "--batch-size", "1") == 143
    assert signal.getsignal(signal.SIGTERM) is before
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000.safetensors"]  # shard 1 stopped unwritten, no index
    kept = (out / "shard-00000.safetensors").stat().st_mtime_ns
    calls.clear()
    monkeypatch.setattr(prediction, "predict_latents", generate)
    assert command.run(out, "--batch-size", "1") == 0
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == kept
    expected = _shard_latents(command.out)
    assert all(_close(v, expected[k]) for k, v in _shard_latents(out).items()) and _shard_latents(out).keys() == expected.keys()
    assert (out / "real_latents.jsonl").read_text() == (command.out / "real_latents.jsonl").read_text()


@pytest.mark.slow
def test_two_processes_under_torchrun_write_what_one_process_writes(tmp_path):
    """`torchrun --nproc_per_node 2` (gloo on CPU): each process makes every other shard, rank 0 writes the index;
    shards and index equal the one-process run's bit for bit; a shard lost afterwards is remade by a run with one
    process (another process count resumes)."""
    import os
    import subprocess
    import sys

    prompts = _write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    config = _write_config(tmp_path / "config.yaml", "tiny_demo.yaml", prompts)
    tool = ["-m", "comat_lightning.tools.real_latents", "--config", str(config), "--shard-size", str(SHARD_SIZE)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def run(prefix: list[str], output: Path) -> str:
        proc = subprocess.run([*prefix, *tool, "--output", str(output)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc.stdout

    run([sys.executable], tmp_path / "one")
    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], tmp_path / "two")
    assert "process 0 of 2" in out and "process 1 of 2" in out
    one, two = _shard_latents(tmp_path / "one"), _shard_latents(tmp_path / "two")
    assert list(one) == list(two) == ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    assert all(torch.equal(one[name], two[name]) for name in one)
    assert (tmp_path / "one" / "real_latents.jsonl").read_text() == (tmp_path / "two" / "real_latents.jsonl").read_text()
    (tmp_path / "two" / "shard-00001.safetensors").unlink()
    out = run([sys.executable], tmp_path / "two")
    assert "(1 generated, 0 regenerated, 2 kept)" in out
    assert torch.equal(_shard_latents(tmp_path / "two")["shard-00001.safetensors"], one["shard-00001.safetensors"])
