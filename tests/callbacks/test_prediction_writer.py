"""ImageWriter: PNGs and manifest from a real ``Trainer.predict``, resume without duplicates, crash safety,
manifest repair, overwrite, concept maps, refused keys."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from callbacks.prediction_writer import ImageWriter, concept_file_stems

SIZE = 8
SETTINGS = {"sampler": "ddim", "steps": 4, "guidance": {"name": "a-star", "scale": 1.5}}


def known_image(index: int, shift: int = 0) -> torch.Tensor:
    """A (3, SIZE, SIZE) image of exact 8-bit levels (k / 255), different per index and shift."""
    levels = (torch.arange(3 * SIZE * SIZE).reshape(3, SIZE, SIZE) * 7 + index * 31 + shift) % 256
    return levels.float() / 255.0


class Sampler(pl.LightningModule):
    """Stands in for the guided-sampling module: skips images its writer has done, returns the contract's dict."""

    def __init__(self, shift: int = 0, with_maps: bool = False):
        super().__init__()
        self.shift, self.with_maps = shift, with_maps
        self.sampled: list[str] = []

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> Optional[dict]:
        writer = next(cb for cb in self.trainer.callbacks if isinstance(cb, ImageWriter))
        todo = [i for i in batch.tolist() if not writer.is_done(f"{i:05d}-s42")]
        self.sampled += [f"{i:05d}-s42" for i in todo]
        out = {
            "images": torch.stack([known_image(i, self.shift) for i in todo]) if todo else torch.zeros(0, 3, SIZE, SIZE),
            "prompts": [f"a red car number {i}" for i in todo],
            "seeds": [42] * len(todo),
            "keys": [f"{i:05d}-s42" for i in todo],
            "settings": SETTINGS,
            "concept_maps": None,
            "concepts": None,
        }
        if self.with_maps:
            out["concept_maps"] = torch.rand(len(todo), 2, SIZE // 2, SIZE // 2)
            out["concepts"] = [["red car", "car"] for _ in todo]
        return out


def predict(tmp_path: Path, module: Optional[Sampler] = None, n: int = 5, **writer_options) -> tuple[ImageWriter, Sampler]:
    module = module or Sampler()
    writer = ImageWriter(str(tmp_path / "out"), **writer_options)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, callbacks=[writer], enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(torch.arange(n), batch_size=2)
    trainer.predict(module, loader, return_predictions=False)
    return writer, module


def manifest(folder: Path, name: str = "manifest.jsonl") -> list[dict]:
    raw = (folder / name).read_bytes()
    assert not raw or raw.endswith(b"\n")
    return [json.loads(line) for line in raw.decode("utf-8").splitlines()]


def png_mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.rglob("*.png")}


def direct_writer(folder: Path, **options) -> ImageWriter:
    writer = ImageWriter(str(folder), **options)
    writer.prepare()
    return writer


def prediction(keys: list[str], shift: int = 0) -> dict:
    return {"images": torch.stack([known_image(i, shift) for i in range(len(keys))]), "prompts": [f"p{k}" for k in keys],
            "seeds": list(range(len(keys))), "keys": keys, "settings": SETTINGS}  # fmt: skip


def test_predict_writes_pngs_and_manifest_with_exact_pixels(tmp_path):
    writer, module = predict(tmp_path)
    out = tmp_path / "out"
    keys = [f"{i:05d}-s42" for i in range(5)]
    assert module.sampled == keys and writer.written == 5 and writer.skipped == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{k}.png" for k in keys] + ["manifest.jsonl"])  # no temp files
    for i, key in enumerate(keys):
        with Image.open(out / f"{key}.png") as image:
            assert image.mode == "RGB" and image.size == (SIZE, SIZE)
            pixels = np.asarray(image)
        expected = (known_image(i) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(pixels, expected)
    entries = manifest(out)
    assert [e["key"] for e in entries] == keys
    assert entries[3] == {"key": "00003-s42", "prompt": "a red car number 3", "seed": 42, "file": "00003-s42.png", "settings": SETTINGS}
    assert writer.done_keys() == set(keys) and writer.is_done("00000-s42") and not writer.is_done("00005-s42")


def test_out_of_range_values_are_clamped_and_nan_is_refused(tmp_path):
    writer = direct_writer(tmp_path)
    pred = prediction(["a"])
    pred["images"] = torch.full((1, 3, 2, 2), 2.0)
    pred["images"][0, 1] = -1.0
    writer.write_prediction(pred)
    with Image.open(tmp_path / "a.png") as image:
        assert np.asarray(image)[0, 0].tolist() == [255, 0, 255]
    pred = prediction(["b"])
    pred["images"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf for keys \['b'\]"):
        writer.write_prediction(pred)
    assert not (tmp_path / "b.png").exists() and [e["key"] for e in manifest(tmp_path)] == ["a"]


def test_rerun_skips_done_images_and_redoes_a_deleted_one_without_duplicates(tmp_path):
    predict(tmp_path)
    out = tmp_path / "out"
    before, lines = png_mtimes(out), manifest(out)
    writer, module = predict(tmp_path, n=6)  # one new prompt
    assert module.sampled == ["00005-s42"] and writer.written == 1 and writer.done_at_start == 5 and writer.skipped == 0
    assert {k: v for k, v in png_mtimes(out).items() if k in before} == before
    assert manifest(out) == lines + [manifest(out)[-1]] and len(manifest(out)) == 6

    (out / "00002-s42.png").unlink()  # gone by hand: redone, and listed once
    writer, module = predict(tmp_path, n=6)
    assert module.sampled == ["00002-s42"]
    assert sorted(e["key"] for e in manifest(out)) == [f"{i:05d}-s42" for i in range(6)]
    assert writer.done_keys() == {f"{i:05d}-s42" for i in range(6)}


def test_an_already_done_image_that_arrives_anyway_is_not_rewritten(tmp_path):
    writer = direct_writer(tmp_path)
    assert writer.write_prediction(prediction(["a", "b"])) == ["a", "b"]
    mtimes = png_mtimes(tmp_path)
    writer = direct_writer(tmp_path)
    assert writer.write_prediction(prediction(["b", "a"], shift=9)) == [] and writer.skipped == 2
    assert png_mtimes(tmp_path) == mtimes and len(manifest(tmp_path)) == 2


@pytest.mark.parametrize("failure", ["os.replace", "Image.save"])
def test_a_crash_mid_write_leaves_no_png_under_its_final_name_and_a_valid_manifest(tmp_path, monkeypatch, failure):
    writer = direct_writer(tmp_path)
    writer.write_prediction(prediction(["a"]))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    if failure == "os.replace":
        monkeypatch.setattr(os, "replace", crash)
    else:
        monkeypatch.setattr(Image.Image, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        writer.write_prediction(prediction(["b", "c"]))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "manifest.jsonl"]  # no b.png, no temp file
    assert [e["key"] for e in manifest(tmp_path)] == ["a"]
    writer = direct_writer(tmp_path)  # the next run redoes b and c
    assert writer.done_keys() == {"a"} and writer.write_prediction(prediction(["a", "b", "c"])) == ["b", "c"]
    assert [e["key"] for e in manifest(tmp_path)] == ["a", "b", "c"]


def test_temp_files_of_a_killed_process_are_removed_at_start(tmp_path):
    (tmp_path / "maps").mkdir()
    for leftover in (tmp_path / ".a.png.tmp-rank0", tmp_path / "maps" / ".a_car.png.tmp-rank3"):
        leftover.write_bytes(b"\x89PNG half")
    direct_writer(tmp_path)
    assert not list(tmp_path.rglob(".*"))


def test_a_trailing_partial_manifest_line_is_dropped_and_a_complete_unterminated_one_kept(tmp_path):
    writer = direct_writer(tmp_path)
    writer.write_prediction(prediction(["a", "b", "c"]))
    raw = (tmp_path / "manifest.jsonl").read_bytes()
    good, partial = raw[: raw.index(b'{"key": "c"')], "{\"key\": \"c\", \"prompt\": \"pé".encode()[:-1]  # cut inside é
    (tmp_path / "manifest.jsonl").write_bytes(good + partial)
    writer = direct_writer(tmp_path)
    assert (tmp_path / "manifest.jsonl").read_bytes() == good
    assert writer.done_keys() == {"a", "b"} and not writer.is_done("c")  # c.png exists but is not listed: redone
    writer.write_prediction(prediction(["a", "b", "c"]))
    assert [e["key"] for e in manifest(tmp_path)] == ["a", "b", "c"]

    (tmp_path / "manifest.jsonl").write_bytes(raw.rstrip(b"\n"))  # complete JSON, only the newline missing
    assert direct_writer(tmp_path).done_keys() == {"a", "b", "c"}
    assert (tmp_path / "manifest.jsonl").read_bytes() == raw


def test_a_bad_line_inside_the_manifest_is_an_error_naming_file_and_line(tmp_path):
    (tmp_path / "manifest.jsonl").write_text('{"key": "a", "file": "a.png"}\nnot json\n{"key": "b"}\n')
    with pytest.raises(ValueError, match=r"manifest\.jsonl:2: not valid UTF-8 JSON"):
        direct_writer(tmp_path)
    (tmp_path / "manifest.jsonl").write_text('{"key": "../a"}\n')
    with pytest.raises(ValueError, match=r"manifest\.jsonl:1: not an ImageWriter entry"):
        direct_writer(tmp_path)


def test_overwrite_redoes_every_image_and_restarts_the_manifest(tmp_path):
    predict(tmp_path)
    out = tmp_path / "out"
    writer, module = predict(tmp_path, Sampler(shift=1), n=3, overwrite=True)
    assert module.sampled == [f"{i:05d}-s42" for i in range(3)] and writer.written == 3
    assert [e["key"] for e in manifest(out)] == module.sampled  # entries of images not redone are dropped
    with Image.open(out / "00001-s42.png") as image:
        np.testing.assert_array_equal(np.asarray(image), (known_image(1, 1) * 255).round().byte().permute(1, 2, 0).numpy())
    assert (out / "00004-s42.png").exists() and not writer.is_done("00004-s42")  # PNGs stay, unlisted


def test_concept_maps_are_written_upsampled_and_listed(tmp_path):
    writer, module = predict(tmp_path, Sampler(with_maps=True), n=2, write_concept_maps=True)
    out = tmp_path / "out"
    entry = manifest(out)[1]
    assert entry["concepts"] == ["red car", "car"]
    assert entry["maps"] == ["maps/00001-s42_red-car.png", "maps/00001-s42_car.png"]
    for rel in entry["maps"]:
        with Image.open(out / rel) as image:
            assert image.mode == "L" and image.size == (SIZE, SIZE)
            pixels = np.asarray(image)
        np.testing.assert_array_equal(pixels, np.kron(pixels[::2, ::2], np.ones((2, 2), np.uint8)))  # nearest x2
    predict(tmp_path / "plain", Sampler(with_maps=True), n=2)
    assert not (tmp_path / "plain" / "out" / "maps").exists() and "maps" not in manifest(tmp_path / "plain" / "out")[0]


def test_map_values_and_concept_file_names(tmp_path):
    writer = direct_writer(tmp_path, write_concept_maps=True)
    pred = prediction(["k_1"])
    pred["concept_maps"] = torch.tensor([[[[0.0, 1.0], [0.5, 2.0]], [[0.2, 0.2], [0.2, 0.2]], [[0.0] * 2] * 2]])
    pred["concepts"] = [["a/b c", "a b_c", "é"]]
    writer.write_prediction(pred)
    maps = manifest(tmp_path)[0]["maps"]
    assert maps == ["maps/k_1_a-b-c.png", "maps/k_1_a-b-c-2.png", "maps/k_1_concept.png"]
    with Image.open(tmp_path / maps[0]) as image:
        assert np.asarray(image)[::4, ::4].tolist() == [[0, 255], [128, 255]]  # 8 px image, 2 px map, clamped
    assert concept_file_stems(["x" * 60, "x" * 60]) == ["x" * 48, "x" * 48 + "-2"]


@pytest.mark.parametrize("key", ["../evil", "a/b", "a\\b", "a b", "", ".hidden", "-x", "é", "x" * 201, 7])
def test_bad_keys_are_refused(tmp_path, key):
    writer = direct_writer(tmp_path)
    with pytest.raises(ValueError, match="is not a safe file name"):
        writer.write_prediction(prediction([key]))
    if isinstance(key, str):
        with pytest.raises(ValueError, match="is not a safe file name"):
            writer.is_done(key)
    assert sorted(p.name for p in tmp_path.iterdir()) == [] and not (tmp_path.parent / "evil.png").exists()


def test_malformed_predictions_are_refused_by_name(tmp_path):
    writer = direct_writer(tmp_path)
    pred = prediction(["a", "b"])
    del pred["settings"]
    with pytest.raises(ValueError, match=r"lacks \['settings'\]"):
        writer.write_prediction(pred)
    with pytest.raises(ValueError, match="'seeds' has 1 items for 2 images"):
        writer.write_prediction({**prediction(["a", "b"]), "seeds": [0]})
    with pytest.raises(ValueError, match="'settings' must be JSON-serialisable"):
        writer.write_prediction({**prediction(["a"]), "settings": {"x": object()}})
    with pytest.raises(ValueError, match="'concepts' must list 2 words"):
        writer.write_prediction({**prediction(["a"]), "concept_maps": torch.rand(1, 2, 2, 2), "concepts": None})
    assert writer.write_prediction(None) == [] and not list(tmp_path.iterdir())


def test_output_dir_must_be_creatable_and_the_writer_set_up(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"output_dir '.*file/out' cannot be created"):
        direct_writer(tmp_path / "file" / "out")
    with pytest.raises(RuntimeError, match="not set up yet"):
        ImageWriter(str(tmp_path / "x")).is_done("a")
    assert not (tmp_path / "x").exists()  # nothing is created before predict starts


def test_each_rank_appends_to_its_own_manifest_and_all_count_as_done(tmp_path):
    rank1 = ImageWriter(str(tmp_path))
    rank1.prepare(rank=1, world_size=2)
    rank1.write_prediction(prediction(["b"]))
    assert [e["key"] for e in manifest(tmp_path, "manifest.rank1.jsonl")] == ["b"]
    assert not (tmp_path / "manifest.jsonl").exists()
    single = direct_writer(tmp_path)  # a later run on one device
    assert single.done_keys() == {"b"}
    single.write_prediction(prediction(["a", "b"]))
    assert [e["key"] for e in manifest(tmp_path)] == ["a"]
    (tmp_path / "b.png").unlink()
    direct_writer(tmp_path)  # the single process tidies the rank manifests no one else writes
    assert manifest(tmp_path, "manifest.rank1.jsonl") == []
