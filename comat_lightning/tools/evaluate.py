"""Score generated images by a standard benchmark's rules, write the scores and a report, compare two runs.

Images come from ``train.py predict`` with ``callbacks.ImageWriter`` (any base model, LoRA or guidance; resumable,
one manifest per rank), from a prompt file this tool writes with N recorded seeds per prompt:

    python -m comat_lightning.tools.evaluate prompts --benchmark-prompts color_val.txt --images-per-prompt 10 --output runs/eval/color.jsonl
    python train.py predict --config configs/eval/t2i_compbench.yaml --data.train_file runs/eval/color.jsonl
    python -m comat_lightning.tools.evaluate t2i-compbench --category color --images runs/eval/t2i_compbench/images
    python -m comat_lightning.tools.evaluate compare runs/eval/base/scores.json runs/eval/lora/scores.json

Scoring writes ``<images>/../scores_<category>/`` (or ``--output``): ``scores.json`` (the category score, images and
prompts counted, the judges and every image's score), ``per_image.jsonl`` (appended as images are scored: a re-run
scores only new images; one file per process under torchrun) and ``report.md`` (the score and the worst prompts with their images). The rules are in
comat_lightning/evaluation/; docs/evaluation.md says what each score means and where ours differs from the
official evaluators.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Optional, Sequence

from comat_lightning.errors import InputError
from comat_lightning.evaluation.geneval_judges import GenEvalJudge
from comat_lightning.evaluation.t2i_compbench_judges import AttributeBindingJudge, ClipSimilarityJudge, ComplexJudge, SpatialJudge
from comat_lightning.files.atomic import write_bytes_atomically

ATTRIBUTE_CATEGORIES = ("color", "shape", "texture")
CATEGORIES = (*ATTRIBUTE_CATEGORIES, "non_spatial", "spatial", "complex")


def read_manifests(images: Path) -> list[dict]:
    """Every image ``train.py predict`` wrote into ``images`` (all ``manifest*.jsonl``: one per rank; read as
    ImageWriter reads them, a partial last line from a killed run skipped), by key."""
    from callbacks.prediction_writer import read_manifest

    manifests = sorted(images.glob("manifest*.jsonl"))
    if not manifests:
        raise InputError(f"{images}: no manifest*.jsonl (the folder callbacks.ImageWriter writes with train.py predict)")
    entries: dict[str, dict] = {}
    for manifest in manifests:
        for entry in read_manifest(manifest)[0]:
            missing = [field for field in ("prompt", "seed", "file") if field not in entry]
            if missing:
                raise InputError(f"{manifest}: the entry of key {entry['key']!r} has no {', '.join(missing)}; not an ImageWriter manifest")
            entries[entry["key"]] = {field: entry[field] for field in ("key", "prompt", "seed", "file")}
    return sorted(entries.values(), key=lambda e: e["key"])


def benchmark_prompts(path: Path, images_per_prompt: int, first_seed: int = 0) -> list[dict]:
    """Records for ``train.py predict``: each prompt of ``path`` (one per line, as T2I-CompBench's
    ``<category>_val.txt``) ``images_per_prompt`` times with seeds first_seed, first_seed + 1, ..."""
    prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"{path}: no prompts")
    for number, prompt in enumerate(prompts, start=1):
        if "_" in prompt:  # T2I-CompBench's file names carry the prompt; ours do not, but its prompts never hold "_"
            raise InputError(f"{path}:{number}: a prompt with '_' is not a T2I-CompBench prompt: {prompt!r}")
    return [{"prompt": p, "seed": first_seed + k} for p in prompts for k in range(images_per_prompt)]


def _scored(output: Path) -> dict[str, dict]:
    """Every image scored so far, from ``per_image*.jsonl`` (one file per process of a data-parallel run)."""
    done = {}
    for path in sorted(output.glob("per_image*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                done[record["key"]] = record
            except (json.JSONDecodeError, KeyError):
                pass  # a line cut by a kill: that image is scored again
    return done


def score_folder(images: Path, category: str, judge, output: Path, batch_size: int = 16, rank: int = 0, world_size: int = 1,
                 barrier=lambda: None) -> Optional[dict]:  # fmt: skip
    """Score every image of ``images`` not yet in ``output/per_image*.jsonl``; write scores.json and report.md.
    ``category``: a T2I-CompBench category, or "geneval" (scores are then per-tag fractions of correct images).
    Data-parallel (torchrun / SLURM): process ``rank`` scores every ``world_size``-th image still to do into
    ``per_image.rank{rank}.jsonl``; after ``barrier()`` rank 0 merges them and writes the summary (others get None).
    A rerun with any number of processes scores only what no file holds yet."""
    from PIL import Image

    entries = read_manifests(images)
    output.mkdir(parents=True, exist_ok=True)
    barrier()  # every process sees the same finished files
    done = _scored(output)
    todo = [e for e in entries if e["key"] not in done][rank::world_size]
    per_image_file = output / ("per_image.jsonl" if world_size == 1 else f"per_image.rank{rank}.jsonl")
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        pictures = [Image.open(images / e["file"]).convert("RGB") for e in batch]
        with per_image_file.open("a") as f:
            for entry, result in zip(batch, judge.score(pictures, [e["prompt"] for e in batch])):
                f.write(json.dumps({**entry, **result}) + "\n")
    barrier()
    if rank != 0:
        return None
    done = _scored(output)
    records = [done[e["key"]] for e in entries]
    if category == "geneval":
        from comat_lightning.evaluation.geneval import summarise

        tags = summarise([(r["tag"], r["correct"]) for r in records])
        scores = {"benchmark": "geneval", "score": tags["overall"], "tags": tags["tags"], "images_per_tag": tags["images"]}
    else:
        scores = {"benchmark": "t2i-compbench", "score": statistics.fmean(r["score"] for r in records)}
    summary = {**scores, "category": category, "images": len(records), "prompts": len({r["prompt"] for r in records}),
               "judge": judge.settings, "images_folder": str(images), "per_image": records}  # fmt: skip
    write_bytes_atomically(output / "scores.json", (json.dumps(summary, indent=1) + "\n").encode())
    write_bytes_atomically(output / "report.md", report(summary, images, output).encode())
    return summary


def report(summary: dict, images: Path, output: Path, worst: int = 8) -> str:
    """Markdown: the score and the prompts with the lowest mean score, with their images."""
    by_prompt: dict[str, list[dict]] = {}
    for r in summary["per_image"]:
        by_prompt.setdefault(r["prompt"], []).append(r)
    ranked = sorted(by_prompt.items(), key=lambda item: statistics.fmean(r["score"] for r in item[1]))
    relative = Path(os.path.relpath(images.resolve(), output.resolve()))  # links work from report.md's folder
    title = "GenEval overall" if summary["benchmark"] == "geneval" else f"T2I-CompBench {summary['category']}"
    lines = [f"# {title}: {summary['score']:.4f}", "",
             f"{summary['images']} images of {summary['prompts']} prompts; judges: {json.dumps(summary['judge'])}", ""]
    lines += [f"- {tag}: {value:.4f} ({summary['images_per_tag'][tag]} images)" for tag, value in summary.get("tags", {}).items()]
    lines += ["",
             f"## The {min(worst, len(ranked))} prompts with the lowest mean score", "", "| prompt | mean | images |", "| --- | --- | --- |"]  # fmt: skip
    for prompt, records in ranked[:worst]:
        pictures = " ".join(f"![{r['seed']}]({relative / r['file']})" for r in records[:4])
        why = "; ".join(sorted({r["reason"] for r in records if r.get("reason")}))
        lines.append(f"| {prompt}{f' ({why})' if why else ''} | {statistics.fmean(r['score'] for r in records):.4f} | {pictures} |")
    return "\n".join(lines) + "\n"


def compare(first: Path, second: Path, report_path: Optional[Path] = None, rows: int = 8) -> dict:
    """Two scores.json side by side: each score, and the mean and 95 % interval of the per-image differences
    (second - first) over the images both scored (same prompt and seed). With ``report_path``: a Markdown page with
    the two runs' images side by side for the ``rows`` largest drops and gains."""
    a, b = (json.loads(Path(p).read_text()) for p in (first, second))
    if a.get("category") != b.get("category"):
        raise InputError(f"{first} is {a.get('category')!r}, {second} is {b.get('category')!r}: compare runs of one category")
    left = {(r["prompt"], r["seed"]): r for r in a["per_image"]}
    pairs = [(left[(r["prompt"], r["seed"])], r) for r in b["per_image"] if (r["prompt"], r["seed"]) in left]
    if not pairs:
        raise InputError(f"{first} and {second} share no (prompt, seed): generate both from the same prompt file")
    diffs = [y["score"] - x["score"] for x, y in pairs]
    half = 1.96 * statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    result = {"category": a["category"], "first": {"path": str(first), "score": a["score"]}, "second": {"path": str(second), "score": b["score"]},
              "paired_images": len(diffs), "mean_difference": statistics.fmean(diffs), "ci95_half_width": half}  # fmt: skip
    if report_path is not None:
        ranked = sorted(pairs, key=lambda pair: pair[1]["score"] - pair[0]["score"])
        folder = Path(report_path).resolve().parent

        def image(run: dict, record: dict) -> str:
            return f"![]({os.path.relpath(Path(run['images_folder']).resolve() / record['file'], folder)})"

        lines = [f"# {a['category']}: {a['score']:.4f} -> {b['score']:.4f}", "",
                 f"First: `{first}`; second: `{second}`. Paired images: {len(diffs)}, mean difference "
                 f"{result['mean_difference']:+.4f} (95 % interval +-{half:.4f}).", ""]  # fmt: skip
        for title, chosen in (("Largest drops", ranked[:rows]), ("Largest gains", ranked[::-1][:rows])):
            lines += [f"## {title}", "", "| prompt | seed | first | second | first image | second image |", "| --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {x['prompt']} | {x['seed']} | {x['score']:.4f} | {y['score']:.4f} | {image(a, x)} | {image(b, y)} |" for x, y in chosen]
            lines.append("")
        write_bytes_atomically(Path(report_path), "\n".join(lines).encode())
    return result


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prompts = sub.add_parser("prompts", help="a benchmark prompt list -> a train.py predict prompt file with N seeds per prompt")
    source = prompts.add_mutually_exclusive_group(required=True)
    source.add_argument("--benchmark-prompts", type=Path, help="one prompt per line (e.g. T2I-CompBench's color_val.txt)")
    source.add_argument("--geneval-metadata", type=Path, help="GenEval's evaluation_metadata.jsonl")
    prompts.add_argument("--images-per-prompt", type=int, default=10, help="T2I-CompBench: 10, GenEval: 4")
    prompts.add_argument("--first-seed", type=int, default=0)
    prompts.add_argument("--output", required=True, type=Path)
    t2i = sub.add_parser("t2i-compbench", help="score a predict folder by T2I-CompBench's rules")
    t2i.add_argument("--category", required=True, choices=CATEGORIES)
    t2i.add_argument("--images", required=True, type=Path, help="the ImageWriter output_dir")
    t2i.add_argument("--output", type=Path, default=None, help="default: <images>/../scores_<category>")
    t2i.add_argument("--vqa-model", default="Salesforce/blip-vqa-capfilt-large")
    t2i.add_argument("--clip-model", default="openai/clip-vit-base-patch32")
    t2i.add_argument("--detector", default="IDEA-Research/grounding-dino-tiny", help="spatial: GroundingDINO (UniDet has no port)")
    t2i.add_argument("--box-threshold", type=float, default=0.35, help="spatial: the detector's score threshold")
    t2i.add_argument("--spacy-model", default="en_core_web_sm")
    t2i.add_argument("--complex-spatial-prompts", type=Path, help="complex: the benchmark's complex_val_spatial.txt")
    t2i.add_argument("--complex-action-prompts", type=Path, help="complex: the benchmark's complex_val_action.txt")
    t2i.add_argument("--device", default="cuda" if _cuda() else "cpu")
    gen = sub.add_parser("geneval", help="score a predict folder by GenEval's rules")
    gen.add_argument("--images", required=True, type=Path, help="the ImageWriter output_dir")
    gen.add_argument("--metadata", required=True, type=Path, help="GenEval's evaluation_metadata.jsonl (the prompts' tags and clauses)")
    gen.add_argument("--output", type=Path, default=None, help="default: <images>/../scores_geneval")
    gen.add_argument("--segmenter", default="facebook/mask2former-swin-small-coco-instance")
    gen.add_argument("--colour-clip", default="openai/clip-vit-large-patch14")
    gen.add_argument("--device", default="cuda" if _cuda() else "cpu")
    cmp = sub.add_parser("compare", help="two scores.json side by side with paired differences")
    cmp.add_argument("first", type=Path)
    cmp.add_argument("second", type=Path)
    cmp.add_argument("--report", type=Path, default=None, help="a Markdown page with both runs' images side by side")
    args = parser.parse_args(argv)
    if args.command == "prompts":
        if args.geneval_metadata:
            from comat_lightning.evaluation.geneval import read_metadata

            unique = list(dict.fromkeys(p.prompt for p in read_metadata(args.geneval_metadata)))
            records = [{"prompt": p, "seed": args.first_seed + k} for p in unique for k in range(args.images_per_prompt)]
        else:
            records = benchmark_prompts(args.benchmark_prompts, args.images_per_prompt, args.first_seed)
        write_bytes_atomically(args.output, "".join(json.dumps(r) + "\n" for r in records).encode())
        print(f"{len(records)} records ({args.images_per_prompt} per prompt) -> {args.output}")
    elif args.command in ("t2i-compbench", "geneval"):
        from comat_lightning.runtime.data_parallel import launched_processes

        processes = launched_processes(cuda=args.device.startswith("cuda"))
        if processes[1] > 1 and args.device.startswith("cuda"):
            args.device = f"cuda:{processes[2]}"
        score_benchmark(args, *processes)
    else:
        print(json.dumps(compare(args.first, args.second, args.report), indent=1))


def score_benchmark(args, rank: int, world_size: int, local_rank: int, barrier) -> None:
    """The ``t2i-compbench`` / ``geneval`` commands: build the judge, score the folder (split over the processes)."""
    if args.command == "t2i-compbench":
        if args.category in ATTRIBUTE_CATEGORIES:
            judge = AttributeBindingJudge(args.vqa_model, args.device, args.spacy_model)
        elif args.category == "spatial":
            judge = SpatialJudge(args.detector, args.device, args.spacy_model, args.box_threshold)
        elif args.category == "complex":
            if not (args.complex_spatial_prompts and args.complex_action_prompts):
                raise InputError("--category complex needs --complex-spatial-prompts and --complex-action-prompts (the benchmark's lists)")
            judge = ComplexJudge(AttributeBindingJudge(args.vqa_model, args.device, args.spacy_model),
                                 SpatialJudge(args.detector, args.device, args.spacy_model, args.box_threshold, complex_prompts=True),
                                 ClipSimilarityJudge(args.clip_model, args.device), args.complex_spatial_prompts, args.complex_action_prompts)  # fmt: skip
        else:
            judge = ClipSimilarityJudge(args.clip_model, args.device)
        output, title = args.output or args.images.parent / f"scores_{args.category}", f"T2I-CompBench {args.category}"
        summary = score_folder(args.images, args.category, judge, output, rank=rank, world_size=world_size, barrier=barrier)
    else:
        output, title = args.output or args.images.parent / "scores_geneval", "GenEval overall"
        judge = GenEvalJudge(args.metadata, args.segmenter, args.colour_clip, args.device)
        summary = score_folder(args.images, "geneval", judge, output, rank=rank, world_size=world_size, barrier=barrier)
    if summary is not None:
        print(f"{title}: {summary['score']:.4f} ({summary['images']} images, {summary['prompts']} prompts) -> {output}")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    try:
        main()
    except InputError as err:
        print(f"evaluate: {err}", file=sys.stderr)
        sys.exit(2)
