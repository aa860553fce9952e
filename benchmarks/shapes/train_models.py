"""Train the shapes world's models from scratch on CPU and save them in the hub's formats.

    .venv/bin/python benchmarks/shapes/train_models.py            # about 50 min on 2 cores; skips finished stages

Stages (each seeded, each written atomically; a finished stage is skipped on re-runs):

1. ``vae``: a diffusers ``AutoencoderKL`` (32 px <-> 16x16x4 latents), reconstruction + tiny KL loss on world images.
   Its ``scaling_factor`` is set to 1 / std of the latents, as SD's 0.18215 was chosen.
2. ``t2i``: a ``UNet2DConditionModel`` and a ``CLIPTextModel`` trained together with the standard denoising loss
   (epsilon prediction, SD's noise schedule, 10% empty captions for classifier-free guidance, EMA weights) on base
   scenes: 80% single objects, 20% pairs drawn only from the ``base`` compositions. Like a real model trained on
   captions that mostly name one subject, it renders single objects well and binds attributes poorly in pairs.
   A noun-grounding term (``--noun-grounding``, TokenCompose's token loss on the noun tokens only) gives it what a
   real model learns from billions of captions and this one cannot from 96k: noun tokens that attend to their
   objects. Colour tokens are left free, so attributes can still leak.
3. ``captioner``: a ``BlipForConditionalGeneration`` trained with the framework's own ``CaptionScorer`` loss (same
   prefix, tokenisation, crop augmentation and preprocessing as Concept Matching uses) on 1-3 object scenes of
   every composition, shown through the VAE (what it will judge). It is the strong judge CoMat needs.
4. ``check``: the base model's single-object accuracy (every kind of object, judged) with the benchmark's sampler,
   its binding accuracy on val pairs, and whether its noun / colour tokens attend to their own object.

``t2i`` and ``captioner`` run as two processes (one core each) after ``vae``.

The result is ``<out>/sd`` (a ``StableDiffusionPipeline`` folder) and ``<out>/blip`` (a BLIP folder with its
processor), loaded by the framework exactly like hub checkpoints. ``<out>/training.json`` records losses,
timings and the captioner's binding check.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

import world  # noqa: E402
from model_checks import attention_check, binding_check, generation_check  # noqa: E402

from comat_lightning.files.atomic import atomic_folder, write_bytes_atomically  # noqa: E402

SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
# Text positions: the longest caption (three objects) is 13 tokens with start and end (every world word is one
# token). SD's 77 would make every cross-attention wider for nothing; the framework pads to the tokenizer's
# model_max_length, whatever it is.
TOKENS = 16
PREFIX = "a photography of "  # CaptionScorer's default prefix: the captioner is trained on what it will score
CLIP_WORDS = sorted(world.WORDS, key=lambda w: (-len(w), w))  # longest first: each word's merges win, one token each
BLIP_WORDS = ("a", "photography", "of", *world.WORDS)
UNET_CHANNELS = (16, 32)  # 16x16 and 8x8 levels: ~280k weights, 1.7 ms per image and step on one core
# Weight of the noun-grounding term in the base model's loss (see noun_grounding_loss; denoising MSE ends ~0.27).
NOUN_GROUNDING = 0.1


# ------------------------------------------------------------------------------------------------ data


def scenes(seed: int, count: int, sampler) -> list[list[world.Thing]]:
    rng = np.random.default_rng(seed)
    return [sampler(rng) for _ in range(count)]


def to_tensor(things_list) -> torch.Tensor:
    """(N, 3, 32, 32) float images in [-1, 1]."""
    images = np.stack([world.render(t) for t in things_list])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


PAIR_RATE = 0.2  # share of base-model training scenes that are (base) pairs
TEXT_LAYERS = 0  # transformer layers of the base model's CLIP text encoder: 0 = each token carries its own word
# (see train_t2i: with 2 layers the noun token also carries its colour, and grounded nouns then bind well (73 %))


def base_sampler(rng, pair_rate: float = PAIR_RATE):
    allowed = set(world.composition_splits()["base"])
    return world.sample_base_scene(rng, multi_object_rate=pair_rate, allowed_pairs=allowed)


def cosine_lr(step: int, total: int, warmup: int = 100, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def log(stage: str, step: int, total: int, loss: float, start: float) -> None:
    print(f"[{stage}] step {step}/{total} loss {loss:.4f} ({time.time() - start:.0f} s)", flush=True)


# ------------------------------------------------------------------------------------------------ VAE


def build_vae():
    from diffusers import AutoencoderKL

    # 2 blocks -> scale factor 2: 32 px <-> 16x16 latents. No mid-block attention: it costs a third of the step and
    # flat shapes do not need it.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=world.IMAGE_SIZE,
        mid_block_add_attention=False,
    )


def train_vae(out: Path, steps: int, seed: int) -> dict:
    torch.manual_seed(seed)
    vae = build_vae()
    half = steps * 16
    data = to_tensor(scenes(seed, half, base_sampler) + scenes(seed + 1, half, world.sample_any_scene))
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps))
    gen = torch.Generator().manual_seed(seed)
    start, losses = time.time(), []
    for step in range(steps):
        batch = data[torch.randint(len(data), (32,), generator=gen)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(gen)).sample
        loss = F.mse_loss(recon, batch) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log("vae", step, steps, float(np.mean(losses[-100:])), start)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(data[i : i + 256]).latent_dist.mean for i in range(0, 4096, 256)])
        scaling = float(1.0 / latents.std())
        recon = torch.cat([vae.decode(vae.encode(data[i : i + 256]).latent_dist.mean).sample for i in range(0, 1024, 256)])
        error = float((recon.clamp(-1, 1) - data[:1024]).abs().mean() * 127.5)
    vae.register_to_config(scaling_factor=scaling)
    with atomic_folder(out) as tmp:  # a half-written model folder is never visible
        vae.save_pretrained(tmp)
    return {"steps": steps, "final_loss": float(np.mean(losses[-100:])), "scaling_factor": scaling, "mean_abs_error_0_255": error, "seconds": time.time() - start}


# ------------------------------------------------------------------------------------------------ text-to-image


def build_text_model(folder: Path, layers: int = TEXT_LAYERS):
    from transformers import CLIPTextModel

    from comat_lightning.tiny.tokenizers import clip_tokenizer, text_encoder_config

    # SD 1.x's tokenizer pads with the end token.
    tokenizer = clip_tokenizer(folder, pad_token="<|endoftext|>", model_max_length=TOKENS, words=CLIP_WORDS)
    config = text_encoder_config(len(tokenizer), tokenizer, projection_dim=64, hidden_size=64, max_position_embeddings=TOKENS)
    config.num_hidden_layers = layers  # 0: each token carries its own word and position only
    return tokenizer, CLIPTextModel(config)


def build_unet():
    from diffusers import UNet2DConditionModel

    # Cross-attention in the 8x8 down block, the mid block and both up blocks (16x16 maps: the two layers of the last
    # up block); the first down block has none (self-attention over 256 positions is half the cost of a step). One
    # head per layer: at 16-32 channels, more heads are slower and A-STAR / attribute concentration average them.
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=UNET_CHANNELS,
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=1,  # diffusers' legacy name: the number of heads
    )


def noun_positions(tokenizer) -> list[int]:
    """Token index of each object's noun in a caption: "a red circle and a blue square" -> [3, 7] (start token at 0,
    every world word one token)."""
    ids = tokenizer(["a red circle and a blue square"]).input_ids[0]
    if len(ids) != 9:
        raise RuntimeError(f"expected one token per world word, got {len(ids)} tokens for 7 words")
    return [3, 7]


def object_masks(things_list, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 2, side, side) float masks of the first two objects of each scene at the latent grid, and (N, 2) bool
    "the object exists"."""
    masks = np.zeros((len(things_list), 2, side, side), np.float32)
    present = np.zeros((len(things_list), 2), bool)
    for n, things in enumerate(things_list):
        for k, thing in enumerate(things[:2]):
            masks[n, k] = world.thing_mask(thing, side)
            present[n, k] = True
    return torch.from_numpy(masks), torch.from_numpy(present)


def noun_grounding_loss(maps: dict[str, torch.Tensor], masks: torch.Tensor, present: torch.Tensor, nouns: list[int]) -> torch.Tensor:
    """TokenCompose's token loss (Wang et al., CVPR 2024) on the noun tokens only: 1 - the share of a noun token's
    cross-attention (over pixels) that falls on its object, averaged over objects and layers. ``maps``: layer ->
    (B, heads, H*W, tokens); ``masks`` (B, 2, 16, 16), pooled to each layer's side; ``present`` (B, 2).

    Why: a real base model's word tokens attend to their objects (learned from billions of captions); this
    miniature's, trained on 96k captions that mostly name one object, attend to nothing in particular (own/other
    object ratio 1.01 measured on the ungrounded model), so the methods that read word maps had nothing to act on.
    Colour tokens are left unsupervised: their maps, like real models' attribute maps, stay free to leak, which is
    the binding failure the methods exist to fix."""
    losses = []
    weight = present.float()
    for probs in maps.values():
        side = math.isqrt(probs.shape[2])
        pooled = F.adaptive_avg_pool2d(masks, side).flatten(2)  # (B, 2, H*W)
        for k, position in enumerate(nouns):
            attention = probs[:, :, :, position].mean(1)  # (B, H*W), heads averaged
            inside = (attention * pooled[:, k]).sum(-1) / attention.sum(-1).clamp_min(1e-8)
            losses.append(((1 - inside) * weight[:, k]).sum() / weight[:, k].sum().clamp_min(1.0))
    return torch.stack(losses).mean()


def train_t2i(out: Path, vae_dir: Path, steps: int, seed: int, batch: int = 64, grounding: float = NOUN_GROUNDING,
              pair_rate: float = PAIR_RATE, text_layers: int = TEXT_LAYERS) -> dict:  # fmt: skip
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0

    from comat_lightning.attention.capture import AttentionStore, cross_attention_layers, install_capture

    torch.manual_seed(seed)
    work = Path(tempfile.mkdtemp(prefix="t2i-tokenizer-"))
    tokenizer, text_encoder = build_text_model(work / "tokenizer", text_layers)
    unet = build_unet()
    store = AttentionStore()
    if grounding:  # explicit-softmax processors on every cross-attention layer (8x8 and 16x16), maps kept with grad
        install_capture(unet, cross_attention_layers(unet, 16), store)
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    train_scenes = scenes(seed + 10, steps * batch // 4, lambda rng: base_sampler(rng, pair_rate))  # each scene seen ~4 times
    captions = [world.caption(t) for t in train_scenes]
    with torch.no_grad():
        images = to_tensor(train_scenes)
        moments = [vae.encode(images[i : i + 512]).latent_dist for i in range(0, len(images), 512)]
        means = torch.cat([m.mean for m in moments])
        stds = torch.cat([m.std for m in moments])
    ids = tokenizer(captions, padding="max_length", max_length=TOKENS, truncation=True, return_tensors="pt").input_ids
    masks, present = object_masks(train_scenes, 16)
    nouns = noun_positions(tokenizer)
    empty = tokenizer([""], padding="max_length", max_length=TOKENS, return_tensors="pt").input_ids
    noise_scheduler = DDPMScheduler(**SD_SCHEDULER)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, warmup=200))
    gen = torch.Generator().manual_seed(seed)
    start, losses, grounding_losses = time.time(), [], []
    for step in range(steps):
        index = torch.randint(len(means), (batch,), generator=gen)
        latents = (means[index] + stds[index] * torch.randn(means[index].shape, generator=gen)) * vae.config.scaling_factor
        tokens = ids[index].clone()
        drop = torch.rand(batch, generator=gen) < 0.1  # classifier-free guidance: learn the unconditional too
        tokens[drop] = empty
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        with store.recording(0, part="all"):
            pred = unet(noisy, t, text_encoder(tokens)[0]).sample
        loss = F.mse_loss(pred, noise)
        if grounding:
            kept = present[index] & ~drop.unsqueeze(1)  # an emptied caption names no object
            grounded = noun_grounding_loss(store.maps[0], masks[index], kept, nouns)
            loss = loss + grounding * grounded
            grounding_losses.append(grounded.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))  # EMA warm-up, then 0.999: small diffusion models need it
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - decay)
        losses.append(loss.item())
        if step % 200 == 0 or step == steps - 1:
            log("t2i", step, steps, float(np.mean(losses[-200:])), start)
            if grounding_losses:
                print(f"[t2i]   noun grounding {np.mean(grounding_losses[-200:]):.4f}", flush=True)
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    store.clear()
    unet.set_attn_processor(AttnProcessor2_0())  # the saved model carries no training-time processors

    with atomic_folder(out) as tmp:
        pipe = StableDiffusionPipeline(
            unet=unet.eval(),
            vae=vae,
            text_encoder=text_encoder.eval(),
            tokenizer=tokenizer,
            scheduler=DDIMScheduler(**SD_SCHEDULER, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(tmp)
    shutil.rmtree(work, ignore_errors=True)
    return {
        "steps": steps,
        "batch": batch,
        "final_loss": float(np.mean(losses[-200:])),
        "noun_grounding_weight": grounding,
        "pair_rate": pair_rate,
        "text_layers": text_layers,
        "final_noun_grounding_loss": float(np.mean(grounding_losses[-200:])) if grounding_losses else None,
        "seconds": time.time() - start,
    }


# ------------------------------------------------------------------------------------------------ captioner


def build_blip(folder: Path) -> None:
    """An untrained BLIP in the hub's layout (config, weights, BERT WordPiece tokenizer, image processor)."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    from comat_lightning.tiny.tokenizers import bert_tokenizer

    tokenizer = bert_tokenizer(folder, BLIP_WORDS)
    config = BlipConfig(
        vision_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=world.IMAGE_SIZE, patch_size=4,
            initializer_range=0.02,  # BLIP's default 1e-10 makes a random vision tower ignore the image (NOTES.md)
        ),
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            encoder_hidden_size=64,
            max_position_embeddings=64,
            bos_token_id=tokenizer.bos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            sep_token_id=tokenizer.sep_token_id,
            eos_token_id=tokenizer.sep_token_id,
        ),
        projection_dim=64,
    )
    processor = BlipImageProcessor(size={"height": world.IMAGE_SIZE, "width": world.IMAGE_SIZE})
    BlipProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    BlipForConditionalGeneration(config).save_pretrained(folder)


def through_vae(vae, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Images as the diffusion model's decoder shows them: encode, sample, decode; [0, 1]."""
    with torch.no_grad():
        out = [vae.decode(vae.encode(images[i : i + 256]).latent_dist.sample(gen)).sample for i in range(0, len(images), 256)]
    return torch.cat(out).add(1).div(2)


def train_captioner(out: Path, vae_dir: Path, steps: int, seed: int, batch: int = 32) -> dict:
    from diffusers import AutoencoderKL

    from comat_lightning.judges.captioner import CaptionScorer

    torch.manual_seed(seed)
    work = Path(tempfile.mkdtemp(prefix="blip-untrained-"))
    build_blip(work)
    scorer = CaptionScorer(str(work), prefix=PREFIX, max_crop=2)  # ConceptMatchingLoss's defaults in our configs
    model = scorer.model.requires_grad_(True)
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    gen = torch.Generator().manual_seed(seed)
    train_scenes = scenes(seed + 20, steps * batch // 4, world.sample_any_scene)
    clean = to_tensor(train_scenes)
    # Half the views through the VAE (the domain CoMat's images come from), half clean renders.
    decoded = through_vae(vae, clean, gen)
    clean = clean.add(1).div(2)
    captions = [world.caption(t) for t in train_scenes]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, warmup=200))
    start, losses = time.time(), []
    for step in range(steps):
        index = torch.randint(len(clean), (batch,), generator=gen)
        use_vae = (torch.rand(batch, generator=gen) < 0.5).view(-1, 1, 1, 1)
        images = torch.where(use_vae, decoded[index], clean[index])
        text = scorer.tokenize([captions[i] for i in index.tolist()])
        token_losses, scored = scorer.token_losses(scorer.preprocess(images, gen), **text)
        loss = token_losses[scored].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 200 == 0 or step == steps - 1:
            log("captioner", step, steps, float(np.mean(losses[-200:])), start)
    model.requires_grad_(False)
    check = binding_check(scorer, vae, seed + 30, through_vae, to_tensor)

    with atomic_folder(out) as tmp:
        for name in os.listdir(work):  # tokenizer and processor files as built
            if not name.startswith("model"):
                shutil.copy(work / name, tmp / name)
        model.save_pretrained(tmp)
    shutil.rmtree(work, ignore_errors=True)
    return {"steps": steps, "batch": batch, "final_loss": float(np.mean(losses[-200:])), "seconds": time.time() - start, **check}


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "models")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--t2i-steps", type=int, default=6000)
    parser.add_argument("--noun-grounding", type=float, default=NOUN_GROUNDING, help="weight of the base model's noun-grounding loss (0: off)")
    parser.add_argument("--pair-rate", type=float, default=PAIR_RATE, help="share of base-model training scenes that are pairs")
    parser.add_argument("--text-layers", type=int, default=TEXT_LAYERS, help="layers of the base model's text encoder")
    parser.add_argument("--captioner-steps", type=int, default=4000)
    parser.add_argument("--stage", choices=["vae", "t2i", "captioner", "check", "all"], default="all",
                        help="all: vae, then t2i and captioner as two processes, then check")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; 1 per process under 'all')")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out
    vae_dir = out / "_vae"
    finished = (out / "sd").exists() and (out / "blip").exists()  # then the VAE is in sd/vae and not needed again
    report = {}
    if args.stage in ("vae", "all") and not vae_dir.exists() and not finished:
        report["vae"] = train_vae(vae_dir, args.vae_steps, args.seed)
    if args.stage == "all":
        _record(out, report)
        report = {}
        common = [sys.executable, __file__, "--out", str(out), "--seed", str(args.seed), "--threads", "1"]
        t2i_options = ["--noun-grounding", str(args.noun_grounding), "--pair-rate", str(args.pair_rate), "--text-layers", str(args.text_layers)]
        stages = [("t2i", ["--t2i-steps", str(args.t2i_steps), *t2i_options]), ("captioner", ["--captioner-steps", str(args.captioner_steps)])]
        running = [subprocess.Popen([*common, "--stage", name, *extra]) for name, extra in stages if not (out / ("sd" if name == "t2i" else "blip")).exists()]
        if any(p.wait() != 0 for p in running):
            raise SystemExit("a training stage failed (see its output above)")
    if args.stage == "t2i" and not (out / "sd").exists():
        report["t2i"] = train_t2i(out / "sd", vae_dir, args.t2i_steps, args.seed, grounding=args.noun_grounding, pair_rate=args.pair_rate,
                                  text_layers=args.text_layers)  # fmt: skip
    if args.stage == "captioner" and not (out / "blip").exists():
        report["captioner"] = train_captioner(out / "blip", vae_dir, args.captioner_steps, args.seed)
    if args.stage in ("check", "all"):
        report["check"] = {**generation_check(out / "sd", args.seed), **attention_check(out / "sd", args.seed)}
    print(json.dumps(_record(out, report), indent=2))


def _record(out: Path, report: dict) -> dict:
    """Merge ``report`` into <out>/training.json (stages run as parallel processes: keep what the others wrote)."""
    report_file = out / "training.json"
    latest = json.loads(report_file.read_text()) if report_file.exists() else {}
    latest.update(report)
    report_file.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomically(report_file, (json.dumps(latest, indent=2) + "\n").encode())
    return latest


if __name__ == "__main__":
    main()
