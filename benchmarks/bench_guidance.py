"""Seconds per image: plain sampling, A-STAR and Attend-and-Excite (ours) and diffusers' Attend-and-Excite pipeline,
same model, prompts, steps and seeds, in one run. Not a test: prints figures and writes
benchmarks/results/guidance_<model>.json.

    python benchmarks/bench_guidance.py                        # tiny SD on CPU (no downloads)
    python benchmarks/bench_guidance.py --model CompVis/stable-diffusion-v1-4 --resolution 512 --steps 50 --layers-res 16

Our methods run through ``Trainer.predict`` as ``train.py predict`` does (model loading is outside the timing).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny://sd")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--layers-res", type=int, default=8, help="map side the guidance reads (16 for SD1.x at 512)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (after one warm-up)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from diffusers import StableDiffusionAttendAndExcitePipeline
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    from comat_lightning.sampling.guided import AStarGuidance, AttendAndExciteGuidance
    from comat_lightning.sampling.prediction import concept_positions
    from comat_lightning.sampling.step_policies import EvenlySpacedSteps
    from comat_lightning.tiny.zoo import resolve_model_path
    from comat_lightning.training.module import CoMatModule, SamplerConfig
    from datamodules.prompts import collate_prompts

    device = "cuda" if torch.cuda.is_available() else "cpu"
    prompt, words = "a cat and a dog", ["cat", "dog"]
    sampler = SamplerConfig(resolution=args.resolution, num_inference_steps=args.steps, scheduler="PNDMScheduler")

    def timed(fn) -> list[float]:
        fn()  # warm-up
        out = []
        for _ in range(args.repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            out.append(time.perf_counter() - start)
        return out

    results = {}
    for name, guidance in (("plain", None), ("astar_ours", AStarGuidance()), ("attend_and_excite_ours", AttendAndExciteGuidance())):
        module = CoMatModule(pretrained_model=args.model, sampler=sampler, gradient_steps=EvenlySpacedSteps(1), gradient_checkpointing=False,
                             guidance=guidance, guidance_resolution=args.layers_res)  # fmt: skip
        # The real `train.py predict` path: a Trainer in predict mode (models load on the first call).
        trainer = Trainer(accelerator="auto", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
        loader = DataLoader([{"prompt": prompt, "concepts": words, "index": 0, "seed": 0}], batch_size=1, collate_fn=collate_prompts)

        results[name] = timed(lambda: trainer.predict(module, dataloaders=loader))
    # diffusers' pipeline gets the same token positions our prediction used
    indices = concept_positions({"prompt": prompt, "concepts": words}, module.backbone.tokenizers[0], module.concept_parser)[1]

    pipe = StableDiffusionAttendAndExcitePipeline.from_pretrained(resolve_model_path(args.model), safety_checker=None,
                                                                  feature_extractor=None, requires_safety_checker=False).to(device)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    side = args.layers_res
    results["attend_and_excite_diffusers"] = timed(
        lambda: pipe(prompt, token_indices=indices, num_inference_steps=args.steps, guidance_scale=7.5, height=args.resolution,
                     width=args.resolution, generator=torch.Generator().manual_seed(0), attn_res=(side, side))  # fmt: skip
    )

    medians = {k: statistics.median(v) for k, v in results.items()}
    summary = {
        "model": args.model,
        "resolution": args.resolution,
        "steps": args.steps,
        "seconds_per_image_median": medians,
        "seconds_per_image_runs": results,
        "ratio_to_plain": {k: v / medians["plain"] for k, v in medians.items()},
        "astar_ours_vs_attend_and_excite_diffusers": medians["astar_ours"] / medians["attend_and_excite_diffusers"],
        "attend_and_excite_ours_vs_diffusers": medians["attend_and_excite_ours"] / medians["attend_and_excite_diffusers"],
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores, {platform.machine()})",
        "torch": torch.__version__,
        "command": "python benchmarks/bench_guidance.py " + " ".join(sys.argv[1:]),
    }
    name = args.model.replace("tiny://", "tiny_").replace("/", "_")
    save_results(summary, RESULTS / f"guidance_{name}.json")


if __name__ == "__main__":
    main()
