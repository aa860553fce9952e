"""Cost of the evaluation judges: seconds per image with the tiny judges on this machine, and the full-size judges'
parameter counts and weight memory. Not a test: prints figures and writes benchmarks/results/judges.json.

    python benchmarks/bench_judges.py [--rounds 5 --images 8]

Timing: each judge scores the same ``--images`` 64 px images per round, judges interleaved round by round (this
machine is shared), median seconds per image. Full size: each published architecture is instantiated on the meta
device from its config (no download, no memory) and its parameters counted; weight memory = parameters x 2 bytes
(bf16/fp16) and x 4 (fp32). Activations at batch 1 are small next to the weights for these judges (one forward per
question or image), so weights in fp32 plus ~1 GiB is a safe GPU budget per judge.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results_file import RESULTS, save_results  # noqa: E402


def full_size_parameters() -> dict[str, int]:
    """Parameters of the published judges, from their architectures (transformers' configs set as on the hub)."""
    import torch
    from transformers import (
        BlipConfig,
        BlipForQuestionAnswering,
        CLIPConfig,
        CLIPModel,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,  # fmt: skip
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        SwinConfig,
    )

    vit_l14 = CLIPConfig(text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12),
                         vision_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                                            patch_size=14, image_size=224), projection_dim=768)  # fmt: skip
    swin_s = SwinConfig(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], window_size=7, out_features=["stage1", "stage2", "stage3", "stage4"])
    configs = {
        "Salesforce/blip-vqa-capfilt-large (BLIP ViT-B/16 + BERT-base encoder and decoder)": (BlipForQuestionAnswering, BlipConfig()),
        "openai/clip-vit-base-patch32 (T2I-CompBench non-spatial)": (CLIPModel, CLIPConfig()),
        "openai/clip-vit-large-patch14 (GenEval colour)": (CLIPModel, vit_l14),
        "IDEA-Research/grounding-dino-tiny (spatial detector)": (GroundingDinoForObjectDetection, GroundingDinoConfig()),
        "facebook/mask2former-swin-small-coco-instance (GenEval)": (
            Mask2FormerForUniversalSegmentation, Mask2FormerConfig(backbone_config=swin_s, num_labels=80, use_pretrained_backbone=False)),
    }  # fmt: skip
    counts = {}
    for name, (cls, config) in configs.items():
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in cls(config).parameters())
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import numpy as np
    import torch
    from PIL import Image

    from comat_lightning.evaluation.geneval import Clause, Prompt
    from comat_lightning.evaluation.geneval_judges import ColourClassifier, InstanceSegmenter, judge_images
    from comat_lightning.evaluation.t2i_compbench_judges import AttributeBindingJudge, ClipSimilarityJudge, SpatialJudge

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(args.images)]
    prompts = ["a red car and a blue bus"] * args.images
    spatial_prompts = ["a cat on the left of a dog"] * args.images
    attribute = AttributeBindingJudge("tiny://blip-vqa", "cpu", "en_core_web_sm")
    clip = ClipSimilarityJudge("tiny://clip", "cpu")
    spatial = SpatialJudge("tiny://grounding-dino", "cpu", "en_core_web_sm", box_threshold=0.0)
    segmenter, colours = InstanceSegmenter("tiny://mask2former", threshold=0.0), ColourClassifier("tiny://clip")
    geneval_prompt = Prompt("color_attr", "a photo of a red car", (Clause("car", 1, "red"),))
    judges = {
        "t2i_compbench_attribute (2 questions)": lambda: attribute.score(images, prompts),
        "t2i_compbench_non_spatial": lambda: clip.score(images, prompts),
        "t2i_compbench_spatial": lambda: spatial.score(images, spatial_prompts),
        "geneval (instances + colours)": lambda: judge_images([geneval_prompt] * len(images), images, segmenter, colours),
    }
    times = {name: [] for name in judges}
    for round_index in range(args.rounds + 1):  # round 0 warms up
        for name, fn in judges.items():
            start = time.perf_counter()
            fn()
            if round_index:
                times[name].append((time.perf_counter() - start) / args.images)
    counts = full_size_parameters()
    result = {
        "tiny_judges_seconds_per_image_median": {k: statistics.median(v) for k, v in times.items()},
        "tiny_judges_seconds_per_image_runs": times,
        "full_size_parameters_millions": {k: v / 1e6 for k, v in counts.items()},
        "full_size_weights_gib": {k: {"bf16": v * 2 / 2**30, "fp32": v * 4 / 2**30} for k, v in counts.items()},
        "device": f"cpu ({os.cpu_count()} cores, {platform.machine()})", "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "command": "python benchmarks/bench_judges.py " + " ".join(sys.argv[1:]),
    }  # fmt: skip
    save_results(result, RESULTS / "judges.json")


if __name__ == "__main__":
    main()
