"""comat_lightning/tools/evaluate.py: benchmark prompt files, a tiny end-to-end T2I-CompBench evaluation through the
real entry points (train.py predict with configs/eval/t2i_compbench.yaml, then the scorer), resume, compare."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from comat_lightning.errors import InputError
from comat_lightning.tools.evaluate import benchmark_prompts, compare, main


def test_prompt_file_repeats_each_prompt_with_recorded_seeds(tmp_path):
    source = tmp_path / "color_val.txt"
    source.write_text("a red car and a blue bus\n\na green apple\n")
    assert benchmark_prompts(source, 2, first_seed=5) == [
        {"prompt": "a red car and a blue bus", "seed": 5}, {"prompt": "a red car and a blue bus", "seed": 6},
        {"prompt": "a green apple", "seed": 5}, {"prompt": "a green apple", "seed": 6}]  # fmt: skip
    source.write_text("a red car\na blue_bus\n")
    with pytest.raises(InputError, match=r"color_val.txt:2: a prompt with '_'"):
        benchmark_prompts(source, 2)


@pytest.mark.slow
def test_tiny_t2i_compbench_evaluation_end_to_end(tmp_path):
    (tmp_path / "val.txt").write_text("a red car and a blue bus\na green apple\n")
    main(["prompts", "--benchmark-prompts", str(tmp_path / "val.txt"), "--images-per-prompt", "2", "--output", str(tmp_path / "p.jsonl")])
    predict = [sys.executable, str(REPO / "train.py"), "predict", "--config", str(REPO / "configs" / "eval" / "t2i_compbench.yaml"),
               "--model.pretrained_model=tiny://sd", "--model.sampler.resolution=64", "--model.sampler.num_inference_steps=5",
               "--trainer.accelerator=cpu", "--trainer.devices=1", "--data.train_file=p.jsonl", "--return_predictions=false"]  # fmt: skip
    proc = subprocess.run(predict, cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    images = tmp_path / "runs" / "eval" / "t2i_compbench" / "images"
    main(["t2i-compbench", "--category", "color", "--images", str(images), "--vqa-model", "tiny://blip-vqa", "--device", "cpu"])
    out = images.parent / "scores_color"
    scores = json.loads((out / "scores.json").read_text())
    assert (scores["images"], scores["prompts"], scores["category"]) == (4, 2, "color")
    by_prompt = {r["prompt"]: r for r in scores["per_image"]}
    assert by_prompt["a red car and a blue bus"]["questions"] == ["a red car?", "a blue bus?"]  # spaCy noun chunks
    for r in scores["per_image"]:  # the product rule on the recorded (rounded) yes-probabilities
        assert r["score"] == round(r["yes"][0] * (r["yes"][1] if len(r["yes"]) > 1 else 1.0), 4) and 0 < r["score"] < 1
    assert scores["score"] == pytest.approx(sum(r["score"] for r in scores["per_image"]) / 4)
    report = (out / "report.md").read_text()
    assert report.startswith("# T2I-CompBench color: ") and "a green apple" in report
    link = report.split("](", 1)[1].split(")", 1)[0]
    assert (out / link).resolve().exists()  # the report's image links resolve from its folder
    # a re-run scores nothing again; compare pairs images by (prompt, seed)
    lines = (out / "per_image.jsonl").read_text()
    main(["t2i-compbench", "--category", "color", "--images", str(images), "--vqa-model", "tiny://blip-vqa", "--device", "cpu"])
    assert (out / "per_image.jsonl").read_text() == lines
    other = json.loads((out / "scores.json").read_text())
    for r in other["per_image"]:
        r["score"] += 0.1
    (tmp_path / "other.json").write_text(json.dumps(other))
    result = compare(out / "scores.json", tmp_path / "other.json", report_path=tmp_path / "compare.md")
    assert result["paired_images"] == 4 and result["mean_difference"] == pytest.approx(0.1)
    page = (tmp_path / "compare.md").read_text()
    assert "## Largest drops" in page and "## Largest gains" in page
    link = page.split("](", 1)[1].split(")", 1)[0]
    assert (tmp_path / link).resolve().exists()  # side-by-side images link to the runs' files
    main(["t2i-compbench", "--category", "non_spatial", "--images", str(images), "--clip-model", "tiny://clip", "--device", "cpu"])
    clip = json.loads((images.parent / "scores_non_spatial" / "scores.json").read_text())
    assert clip["images"] == 4 and all(-1 <= r["score"] <= 1 for r in clip["per_image"])
    # complex (3-in-1): "a green apple" is on the spatial list (attribute + spatial), the other prompt on neither (all three)
    (tmp_path / "spatial.txt").write_text("A green apple.\n")
    (tmp_path / "action.txt").write_text("a dog running\n")
    main(["t2i-compbench", "--category", "complex", "--images", str(images), "--vqa-model", "tiny://blip-vqa", "--clip-model", "tiny://clip",
          "--detector", "tiny://grounding-dino", "--complex-spatial-prompts", str(tmp_path / "spatial.txt"),
          "--complex-action-prompts", str(tmp_path / "action.txt"), "--device", "cpu"])  # fmt: skip
    complex_scores = json.loads((images.parent / "scores_complex" / "scores.json").read_text())
    for r in complex_scores["per_image"]:
        parts = ["attribute", "spatial"] if r["prompt"] == "a green apple" else ["attribute", "spatial", "action"]
        assert sorted(k for k in ("attribute", "spatial", "action") if k in r) == sorted(parts)
        assert r["score"] == pytest.approx(sum(r[k] for k in parts) / len(parts))


@pytest.mark.slow
def test_spatial_category_detects_the_first_and_last_noun(tmp_path):
    """The spatial judge on two hand-drawn images (a tiny random GroundingDINO: the boxes are arbitrary, the path is
    real): every image gets a score in [0, 1], the objects are the prompt's first and last nouns."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    entries = []
    for i, prompt in enumerate(["a cat on the left of a dog", "a girl next to a chair"]):
        Image.new("RGB", (64, 64), (200, 50, 50)).save(images / f"{i:05d}-s0.png")
        entries.append({"key": f"{i:05d}-s0", "prompt": prompt, "seed": 0, "file": f"{i:05d}-s0.png", "settings": {}})
    # a killed predict leaves a partial last line: skipped, as ImageWriter itself reads its manifest
    (images / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries) + '{"key": "00002-s0", "pro')
    main(["t2i-compbench", "--category", "spatial", "--images", str(images), "--detector", "tiny://grounding-dino",
          "--box-threshold", "0.0", "--device", "cpu"])  # fmt: skip
    scores = json.loads((tmp_path / "scores_spatial" / "scores.json").read_text())
    assert [r["objects"] for r in scores["per_image"]] == [["cat", "dog"], ["person", "chair"]]
    assert all(0.0 <= r["score"] <= 1.0 for r in scores["per_image"]) and scores["judge"]["detector"] == "tiny://grounding-dino"


GENEVAL_METADATA = [
    {"tag": "single_object", "prompt": "a photo of a cat", "include": [{"class": "cat", "count": 1}]},
    {"tag": "counting", "prompt": "a photo of two clocks", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}]},
    {"tag": "color_attr", "prompt": "a photo of a red car and a blue bench",
     "include": [{"class": "car", "count": 1, "color": "red"}, {"class": "bench", "count": 1, "color": "blue"}]},
]  # fmt: skip


@pytest.mark.slow
def test_tiny_geneval_evaluation(tmp_path):
    """GenEval's path with a tiny random Mask2Former and CLIP on hand-drawn images: prompt file from the metadata,
    per-image verdicts with reasons, per-tag scores and their mean, a report."""
    from PIL import Image

    metadata = tmp_path / "evaluation_metadata.jsonl"
    metadata.write_text("".join(json.dumps(m) + "\n" for m in GENEVAL_METADATA))
    main(["prompts", "--geneval-metadata", str(metadata), "--images-per-prompt", "2", "--output", str(tmp_path / "p.jsonl")])
    records = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["seed"]) for r in records[:2]] == [("a photo of a cat", 0), ("a photo of a cat", 1)] and len(records) == 6
    images = tmp_path / "images"
    images.mkdir()
    with (images / "manifest.jsonl").open("w") as manifest:
        for i, r in enumerate(records):
            name = f"{i:05d}-s{r['seed']}"
            Image.new("RGB", (64, 64), (30 * i, 100, 200)).save(images / f"{name}.png")
            manifest.write(json.dumps({"key": name, "prompt": r["prompt"], "seed": r["seed"], "file": f"{name}.png", "settings": {}}) + "\n")
    main(["geneval", "--images", str(images), "--metadata", str(metadata), "--segmenter", "tiny://mask2former",
          "--colour-clip", "tiny://clip", "--device", "cpu"])  # fmt: skip
    scores = json.loads((tmp_path / "scores_geneval" / "scores.json").read_text())
    assert scores["benchmark"] == "geneval" and scores["images"] == 6 and set(scores["tags"]) == {"single_object", "counting", "color_attr"}
    assert scores["score"] == pytest.approx(sum(scores["tags"].values()) / 3)
    for r in scores["per_image"]:
        assert r["score"] == float(r["correct"]) and (r["correct"] or r["reason"])  # a wrong image says why
    assert "- counting: " in (tmp_path / "scores_geneval" / "report.md").read_text()
    (tmp_path / "bad.jsonl").write_text(json.dumps(GENEVAL_METADATA[0]) + "\n" + json.dumps({"tag": "colors", "prompt": "x"}) + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl:2: \"include\""):
        main(["geneval", "--images", str(images), "--metadata", str(tmp_path / "bad.jsonl"), "--segmenter", "tiny://mask2former",
              "--colour-clip", "tiny://clip", "--device", "cpu"])  # fmt: skip


@pytest.mark.slow
def test_scoring_split_over_two_processes_under_torchrun_equals_one_process(tmp_path):
    """`torchrun --nproc_per_node 2` (gloo): each process scores every other image into its own file, rank 0 writes
    the summary; the per-image scores equal a one-process run's."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    with (images / "manifest.jsonl").open("w") as manifest:
        for i in range(5):
            Image.new("RGB", (64, 64), (40 * i, 90, 160)).save(images / f"{i:05d}-s0.png")
            manifest.write(json.dumps({"key": f"{i:05d}-s0", "prompt": f"a red car number {i}", "seed": 0, "file": f"{i:05d}-s0.png", "settings": {}}) + "\n")
    command = ["-m", "comat_lightning.tools.evaluate", "t2i-compbench", "--category", "non_spatial", "--images", str(images),
               "--clip-model", "tiny://clip", "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for prefix, out in (([sys.executable], "one"), ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], "two")):
        proc = subprocess.run([*prefix, *command, "--output", str(tmp_path / out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "two").glob("per_image*.jsonl")) == ["per_image.rank0.jsonl", "per_image.rank1.jsonl"]
    one, two = (json.loads((tmp_path / out / "scores.json").read_text()) for out in ("one", "two"))
    assert [r["key"] for r in one["per_image"]] == [r["key"] for r in two["per_image"]] and two["images"] == 5
    for a, b in zip(one["per_image"], two["per_image"]):
        assert b["score"] == pytest.approx(a["score"], abs=1e-5)  # batch composition differs: float sums only


@pytest.mark.slow
def test_evaluation_images_under_torchrun_equal_one_process_and_resume_on_another_count(tmp_path):
    """`train.py predict` under `torchrun --nproc_per_node 2` (Lightning DDP, gloo): 3 prompts, so the ranks get
    unequal batch counts; each rank writes its own manifest and images equal the one-process run's. A lost image is
    remade by a one-process rerun in the same folder, and only it. The tiny models are first built under torchrun
    (transformers writes nothing from rank 1 of a process group: the zoo builds in a fresh process there)."""
    import numpy as np
    from PIL import Image

    from callbacks.prediction_writer import read_manifest

    predict = [str(REPO / "train.py"), "predict", "--config", str(REPO / "configs" / "eval" / "t2i_compbench.yaml"),
               "--model.pretrained_model=tiny://sd", "--model.sampler.resolution=64", "--model.sampler.num_inference_steps=5",
               "--trainer.accelerator=cpu", "--data.train_file=p.jsonl", "--data.batch_size=1", "--return_predictions=false"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launches = {"one": [sys.executable], "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]}

    def run(name: str, folder: str, devices: str) -> None:
        cwd = tmp_path / folder
        cwd.mkdir(exist_ok=True)
        (cwd / "p.jsonl").write_text("".join(json.dumps({"prompt": p, "seed": 7}) + "\n" for p in ("a red car", "a blue bus", "a green apple")))
        extra = [f"--trainer.devices={devices}"] + (["--trainer.strategy=ddp"] if devices != "1" else [])
        # The two-process run starts from an empty tiny-model cache: the models are first built under torchrun.
        zoo = {"COMAT_TINY_ZOO": str(tmp_path / "fresh_zoo")} if name == "two" else {}
        proc = subprocess.run([*launches[name], *predict, *extra], cwd=cwd, env={**env, **zoo}, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    def images(folder: str) -> dict[str, np.ndarray]:
        root = tmp_path / folder / "runs" / "eval" / "t2i_compbench" / "images"
        entries = [e for path in sorted(root.glob("manifest*.jsonl")) for e in read_manifest(path)[0]]
        return {e["key"]: np.asarray(Image.open(root / e["file"])).astype(int) for e in entries}

    run("one", "one", "1")
    run("two", "two", "2")
    root = tmp_path / "two" / "runs" / "eval" / "t2i_compbench" / "images"
    assert sorted(p.name for p in root.glob("manifest*.jsonl")) == ["manifest.rank0.jsonl", "manifest.rank1.jsonl"]
    one, two = images("one"), images("two")
    assert sorted(one) == sorted(two) and len(one) == 3
    for key in one:  # per-image generators; the UNet's float sums differ with the batch only at ~1e-6
        assert np.abs(one[key] - two[key]).max() <= 1, key
    lost = sorted(two)[1]
    (root / f"{lost}.png").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in root.glob("*.png")}
    run("one", "two", "1")  # one process now: rank 0 owns the folder's manifests, the lost image is redone
    assert {p.name: p.stat().st_mtime_ns for p in root.glob("*.png") if p.name in kept} == kept
    again = images("two")
    assert sorted(again) == sorted(one) and np.abs(again[lost] - one[lost]).max() <= 1
