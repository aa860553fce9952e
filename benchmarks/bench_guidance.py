"""Seconds per image: plain sampling, A-STAR and Attend-and-Excite (ours) and diffusers' Attend-and-Excite pipeline,
same model, prompts, steps and seeds, in one run. Not a test: prints figures and writes
benchmarks/results/guidance_<model>.json.

    python benchmarks/bench_guidance.py                        # tiny SD on CPU (no downloads)
    python benchmarks/bench_guidance.py --model CompVis/stable-diffusion-v1-4 --resolution 512 --steps 50 --layers-res 16

Our methods run through ``Trainer.predict`` as ``train.py predict`` does (model loading is outside the timing). The
variants are interleaved round by round and their ratios paired by round.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results_file import RESULTS, save_results  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny://sd")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--layers-res", type=int, default=8, help="map side the guidance reads (16 for SD1.x at 512)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up round)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    samplers = guidance_samplers(args.model, args.resolution, args.steps, args.layers_res, device)
    summary = {
        "model": args.model,
        "resolution": args.resolution,
        "steps": args.steps,
        **summarise(time_round_robin(samplers, args.repeats, device == "cuda")),
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores, {platform.machine()})",
        "torch": torch.__version__,
        "command": "python benchmarks/bench_guidance.py " + " ".join(sys.argv[1:]),
    }
    name = args.model.replace("tiny://", "tiny_").replace("/", "_")
    save_results(summary, RESULTS / f"guidance_{name}.json")


def guidance_samplers(model: str, resolution: int, steps: int, layers_res: int, device: str, precision: str = "32-true",
                      prompt: str = "a cat and a dog", words: tuple[str, ...] = ("cat", "dog")) -> dict[str, Callable[[], object]]:
    """One image each: plain sampling, A-STAR and Attend-and-Excite (ours, through ``Trainer.predict`` as ``train.py
    predict`` runs them) and diffusers' ``StableDiffusionAttendAndExcitePipeline``, same model, prompt, steps and
    seed. Models load on the first call (the warm-up round)."""
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

    sampler = SamplerConfig(resolution=resolution, num_inference_steps=steps, scheduler="PNDMScheduler")
    loader = DataLoader([{"prompt": prompt, "concepts": list(words), "index": 0, "seed": 0}], batch_size=1, collate_fn=collate_prompts)
    samplers: dict[str, Callable[[], object]] = {}
    for name, guidance in (("plain", None), ("astar_ours", AStarGuidance()), ("attend_and_excite_ours", AttendAndExciteGuidance())):
        module = CoMatModule(pretrained_model=model, sampler=sampler, gradient_steps=EvenlySpacedSteps(1), gradient_checkpointing=False,
                             guidance=guidance, guidance_resolution=layers_res)  # fmt: skip
        trainer = Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision=precision, logger=False,
                          enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        samplers[name] = functools.partial(trainer.predict, module, dataloaders=loader)

    pipe, indices = None, None
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision.startswith("bf16"))
    guided = module  # the Attend-and-Excite module built last: its models are loaded by the time diffusers' runs

    def diffusers_attend_and_excite():
        nonlocal pipe, indices
        if pipe is None:  # loaded once, in the warm-up round, with the token positions our prediction reads
            pipe = StableDiffusionAttendAndExcitePipeline.from_pretrained(
                resolve_model_path(model), safety_checker=None, feature_extractor=None, requires_safety_checker=False
            ).to(device)
            pipe.set_progress_bar_config(disable=True)
            record = {"prompt": prompt, "concepts": list(words)}
            indices = concept_positions(record, guided.backbone.text_keys, guided.concept_parser)[1]
        with autocast:  # as our Trainer's precision
            return pipe(prompt, token_indices=indices, num_inference_steps=steps, guidance_scale=7.5, height=resolution,
                        width=resolution, generator=torch.Generator().manual_seed(0), attn_res=(layers_res, layers_res))  # fmt: skip

    samplers["attend_and_excite_diffusers"] = diffusers_attend_and_excite
    return samplers


def time_round_robin(fns: dict[str, Callable[[], object]], repeats: int, cuda: bool, deadline: Optional[float] = None) -> dict[str, list[float]]:
    """Seconds of each call, the variants interleaved (A B C A B C ...: a shared machine's load drifts), after one
    untimed warm-up round; stops after a complete round once ``deadline`` (a ``time.perf_counter()`` value) passed."""
    import torch

    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_index in range(repeats + 1):
        for name, fn in fns.items():
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            if round_index:
                times[name].append(time.perf_counter() - start)
        if deadline is not None and round_index and time.perf_counter() > deadline:
            break
    return times


def summarise(times: dict[str, list[float]]) -> dict:
    """Medians, and each variant's ratio to plain sampling paired round by round (median of the per-round ratios)."""
    medians = {k: statistics.median(v) for k, v in times.items()}
    paired = {k: statistics.median(a / b for a, b in zip(v, times["plain"])) for k, v in times.items()}
    diffusers_ae = times["attend_and_excite_diffusers"]
    return {
        "seconds_per_image_median": medians,
        "seconds_per_image_runs": times,
        "ratio_to_plain": paired,
        "astar_ours_vs_attend_and_excite_diffusers": statistics.median(a / b for a, b in zip(times["astar_ours"], diffusers_ae)),
        "attend_and_excite_ours_vs_diffusers": statistics.median(a / b for a, b in zip(times["attend_and_excite_ours"], diffusers_ae)),
    }


if __name__ == "__main__":
    main()
