"""Checks of the shapes world's trained models (train_models.py records them in models/training.json): the base
model draws single objects reliably and binds poorly on unseen pairs; the captioner prefers true captions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import world

# The benchmark's sampler (configs/*.yaml sampler): what the single-object check uses too.
SAMPLER = dict(num_inference_steps=10, guidance_scale=3.0)  # chosen on val: 7.5 over-saturates this small model (69% single objects right)


def swapped(things: list[world.Thing]) -> str:
    """The caption with colours rotated between the objects: same words, wrong binding (for objects of different
    shapes; with one shape twice, the rotated caption describes the same image)."""
    colours = [t.colour for t in things]
    return " and ".join(f"a {c} {t.shape}" for c, t in zip(colours[1:] + colours[:1], things))



@torch.no_grad()
def binding_check(scorer, vae, seed: int, through_vae, to_tensor, count: int = 256) -> dict:
    """How often the captioner prefers the true caption over the colour-swapped one, on held-out (test) pairs seen
    through the VAE: the captioner's binding accuracy, which bounds what Concept Matching can teach."""
    rng = np.random.default_rng(seed)
    test = [pair for pair in world.composition_splits()["test"] if pair[0][1] != pair[1][1]]  # a swap changes them
    things = [world.scene(rng, test[i % len(test)]) for i in range(count)]
    images = through_vae(vae, to_tensor(things), torch.Generator().manual_seed(seed))
    true_nll, _ = scorer(images, [world.caption(t) for t in things], crop=False)
    swap_nll, _ = scorer(images, [swapped(t) for t in things], crop=False)
    return {"captioner_binding_accuracy": float((true_nll < swap_nll).float().mean()), "captioner_true_nll": float(true_nll.mean())}


def _pipeline(sd_dir: Path):
    """The base model with the benchmark's sampler (DDPM), quiet."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd_dir)
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generation_check(sd_dir: Path, seed: int, per_kind: int = 8, pairs: int = 96) -> dict:
    """The base model with the benchmark's sampler (DDPM, CFG): how often a single-object prompt gives exactly that
    object (every kind, ``per_kind`` seeds), and its binding accuracy on unseen pairs (val: test stays untouched)."""
    from judge import judge_image, summarise

    pipe = _pipeline(sd_dir)

    def generate(objects_list, offset):
        prompts = [" and ".join(f"a {c} {s}" for c, s in objects) for objects in objects_list]
        generators = [torch.Generator().manual_seed(seed * 100_003 + offset + i) for i in range(len(prompts))]
        images = pipe(prompts, height=world.IMAGE_SIZE, width=world.IMAGE_SIZE, generator=generators, output_type="np", **SAMPLER).images
        return [judge_image((image * 255).round().astype(np.uint8), objects) for image, objects in zip(images, objects_list)]

    singles = summarise(generate([[kind] for kind in world.OBJECT_TYPES for _ in range(per_kind)], 0))
    val = world.composition_splits()["val"]
    pairs_summary = summarise(generate([list(val[i % len(val)])[:: 1 if i % 2 else -1] for i in range(pairs)], 50_000))
    return {
        "single_object_correct": singles["binding_accuracy"],
        "single_object_exact": singles["all_correct_rate"],
        "single_object_clean": singles["clean_rate"],
        "val_pair_binding_accuracy": pairs_summary["binding_accuracy"],
        "sampler": f"DDPM {SAMPLER['num_inference_steps']} steps, CFG {SAMPLER['guidance_scale']}",
    }




@torch.no_grad()
def attention_check(sd_dir: Path, seed: int, pairs: int = 48) -> dict:
    """Whether the base model's word tokens attend to their own object: on val pairs of two different shapes, the
    mean 16x16 cross-attention (conditional half, every denoising step, both 16x16 layers) of each noun / colour
    token over its own object's pixels divided by that over the other object's pixels, objects located by the
    judge's segmentation of the generated image (images where either shape is not found are skipped). 1.0 means
    no per-object signal: attention-guided methods and attribute concentration then have nothing to act on."""
    from judge import segment_objects

    from comat_lightning.attention.capture import AttentionStore, cross_attention_layers, install_capture

    pipe = _pipeline(sd_dir)
    side = world.IMAGE_SIZE // 2
    store = AttentionStore()
    install_capture(pipe.unet, [layer for layer in cross_attention_layers(pipe.unet, side) if layer.resolution == side], store)
    val = [pair for pair in world.composition_splits()["val"] if pair[0][1] != pair[1][1]]
    objects_list = [list(val[i % len(val)])[:: 1 if i % 2 else -1] for i in range(pairs)]
    prompts = [" and ".join(f"a {c} {s}" for c, s in objects) for objects in objects_list]
    summed: list[torch.Tensor] = []

    def listen(layer: str, probs: torch.Tensor) -> None:  # (2B, heads, H*W, T): keep the conditional half
        summed.append(probs[probs.shape[0] // 2 :].mean(1))

    generators = [torch.Generator().manual_seed(seed * 100_003 + 90_000 + i) for i in range(pairs)]
    with store.listening(listen):
        images = pipe(prompts, height=world.IMAGE_SIZE, width=world.IMAGE_SIZE, generator=generators, output_type="np", **SAMPLER).images
    maps = torch.stack(summed).mean(0)  # (B, H*W, T)
    ratios: dict[str, list[float]] = {"noun": [], "colour": []}
    for b, (image, objects) in enumerate(zip(images, objects_list)):
        found, _, _ = segment_objects((image * 255).round().astype(np.uint8))
        regions = []
        for _, shape in objects:
            match = next((f for f in found if f[1] == shape), None)
            if match is None:
                break
            mask = np.zeros((world.IMAGE_SIZE, world.IMAGE_SIZE), np.float32)
            mask[match[4][:, 0], match[4][:, 1]] = 1.0
            pooled = torch.nn.functional.avg_pool2d(torch.from_numpy(mask)[None, None], 2).flatten()  # (H*W,)
            regions.append(pooled / pooled.sum())
        if len(regions) != 2:
            continue
        for k in range(2):
            for kind, position in (("colour", 2 + 4 * k), ("noun", 3 + 4 * k)):
                attention = maps[b, :, position]
                ratios[kind].append(float((attention * regions[k]).sum() / (attention * regions[1 - k]).sum().clamp_min(1e-12)))
    return {
        "attention_own_over_other_noun": float(np.exp(np.mean(np.log(ratios["noun"])))) if ratios["noun"] else None,
        "attention_own_over_other_colour": float(np.exp(np.mean(np.log(ratios["colour"])))) if ratios["colour"] else None,
        "attention_images_measured": len(ratios["noun"]) // 2,
        "attention_images": pairs,
    }
