"""Our rollout and our captioner loss against the real references: diffusers' pipelines and transformers' BLIP."""

from __future__ import annotations

import pytest
import torch
from conftest import make_module

PROMPTS = ["a red car and a blue bus", "a small zebracorn on the beach"]  # the second has unknown words


def _pipeline_latents(family: str, path: str, scheduler_config: dict, seed: int, steps: int) -> torch.Tensor:
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(path)
    pipe.scheduler = DDPMScheduler.from_config(scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(negative_prompt=[""] * len(PROMPTS)) if family == "sdxl" else {}  # SDXL zeroes a None negative
    return pipe(
        PROMPTS,
        num_inference_steps=steps,
        guidance_scale=7.5,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        **kwargs,
    ).images


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_rollout_matches_diffusers_pipeline(family, tiny_paths):
    """(a) With the LoRA at its zero init and no gradient steps, our DDPM rollout reproduces the pipeline."""
    module = make_module(tiny_paths[family])
    assert module.backbone.family == family
    steps, seed = 4, 123
    with torch.no_grad():
        ours = module.rollout.sample(PROMPTS, torch.Generator().manual_seed(seed))
    reference = _pipeline_latents(family, tiny_paths[family], module.backbone.scheduler_config, seed, steps)
    assert ours.dtype == torch.float32 and ours.shape == reference.shape == (2, 4, 8, 8)
    # Same ops in the same order: only float reassociation inside batched kernels may differ. The tiny UNets'
    # sharpened cross-attention (tiny_zoo) amplifies it: measured up to 2.2e-5 (SDXL, 1 element of 512).
    torch.testing.assert_close(ours, reference, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_frozen_base_is_the_pipeline_even_after_lora_moves(family, tiny_paths):
    """The frozen base (adapter disabled) still samples exactly what the pipeline samples once LoRA is non-zero."""
    module = make_module(tiny_paths[family])
    with torch.no_grad():
        for name, param in module.backbone.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
        online = module.rollout.sample(PROMPTS, torch.Generator().manual_seed(7))
        with module.rollout.frozen_base() as base:
            frozen = module.rollout.sample(PROMPTS, torch.Generator().manual_seed(7), unet=base)
    reference = _pipeline_latents(family, tiny_paths[family], module.backbone.scheduler_config, 7, 4)
    # PEFT-wrapped linears with the adapter off take another kernel path: a few 1e-5 differences, not more.
    torch.testing.assert_close(frozen, reference, atol=5e-5, rtol=1e-4)
    assert (online - reference).abs().max() > 1e-3  # the LoRA really changes the online model


def _scorer(path, **kwargs):
    from comat_lightning.judges.captioner import CaptionScorer

    return CaptionScorer(path, **kwargs)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("first_token", ["cls", "dec"])
def test_caption_nll_matches_transformers_loss(tiny_paths, label_smoothing, first_token):
    """(b) Per-sample NLL = transformers' BLIP loss of that sample alone; token-mean reduction = its batch loss."""
    from comat_lightning.judges.captioner import reduce_caption_nll

    scorer = _scorer(tiny_paths["blip"], label_smoothing=label_smoothing, first_token=first_token)
    model = scorer.model
    model.text_decoder.label_smoothing = label_smoothing  # transformers reads it from the config
    images = torch.rand(3, 3, 64, 64)
    prompts = ["a red car", "a blue bird and a yellow flower on a wooden table", "a cat"]
    pixel_values = scorer.preprocess(images)
    text = scorer.tokenize(prompts)
    if first_token == "dec":
        assert (text["input_ids"][:, 0] == model.config.text_config.bos_token_id).all()
    else:
        assert (text["input_ids"][:, 0] == scorer.tokenizer.cls_token_id).all()
    per_sample, counts = scorer(images, prompts)
    with torch.no_grad():
        for i in range(len(prompts)):
            n = int(text["attention_mask"][i].sum())  # the sample alone, without the batch's padding
            ref = model(
                pixel_values=pixel_values[i : i + 1],
                input_ids=text["input_ids"][i : i + 1, :n],
                attention_mask=text["attention_mask"][i : i + 1, :n],
                labels=text["labels"][i : i + 1, :n],
            ).loss
            torch.testing.assert_close(per_sample[i], ref, atol=1e-5, rtol=1e-5)
        batch_ref = model(pixel_values=pixel_values, **text).loss
    torch.testing.assert_close(reduce_caption_nll(per_sample, counts, "token_mean"), batch_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reduce_caption_nll(per_sample, counts, "sample_mean"), per_sample.mean())
    assert not torch.allclose(per_sample.mean(), batch_ref)  # the two reductions really differ here


def test_caption_labels_mask_prefix_and_padding(tiny_paths):
    scorer = _scorer(tiny_paths["blip"])
    text = scorer.tokenize(["a red car", "a blue bird and a yellow flower"])
    prefix_ids = scorer.tokenizer("a photography of", add_special_tokens=False).input_ids
    assert scorer.prefix_length == len(prefix_ids) + 1  # [CLS] + prefix
    labels, ids, mask = text["labels"], text["input_ids"], text["attention_mask"]
    assert (labels[:, : scorer.prefix_length] == -100).all()
    assert (labels[mask == 0] == -100).all()
    scored = labels[0][labels[0] != -100].tolist()
    assert scored == ids[0][scorer.prefix_length : int(mask[0].sum())].tolist()  # "red car [SEP]"
    assert scored[-1] == scorer.tokenizer.sep_token_id


def test_preprocessing_matches_blip_image_processor(tiny_paths):
    """Our differentiable resize + normalise agrees with BLIP's own (PIL, uint8) processor up to rounding."""
    from transformers import BlipImageProcessor

    scorer = _scorer(tiny_paths["blip"], max_crop=0)
    image = torch.rand(1, 3, 8, 8)
    image = torch.nn.functional.interpolate(image, size=(96, 96), mode="bilinear")  # smooth: resampling-filter agnostic
    reference_processor = BlipImageProcessor.from_pretrained(tiny_paths["blip"])
    as_uint8 = (image[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    reference = torch.as_tensor(reference_processor(images=as_uint8, return_tensors="pt")["pixel_values"])
    ours = scorer.preprocess((image * 255).round() / 255)
    assert ours.shape == reference.shape == (1, 3, 32, 32)
    assert (ours - reference).abs().mean() < 0.02  # ~1% of the normalised range; PIL rounds to uint8


def test_preprocessing_is_differentiable_and_crops(tiny_paths):
    scorer = _scorer(tiny_paths["blip"], max_crop=2)
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    first = scorer.preprocess(images, torch.Generator().manual_seed(0))
    first.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    crops = {scorer.preprocess(images.detach(), torch.Generator().manual_seed(s)).sum().item() for s in range(6)}
    assert len(crops) > 1  # different seeds give different crops


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_gradients_reach_lora_parameters_only(family, tiny_paths):
    """(c) A full generator step's loss sends gradient into LoRA weights and nowhere else."""
    from callbacks import ConceptMatchingLoss

    loss = ConceptMatchingLoss(captioner=tiny_paths["blip"])
    module = make_module(tiny_paths[family], losses=[loss], gradient_checkpointing=True)
    module.loss_modules[loss.name] = loss.build(module.loss_context).requires_grad_(False)
    generated = module.generate({"prompt": PROMPTS}, seed=0, gradient_steps=[1, 3])
    assert generated.latents.requires_grad and generated.images.requires_grad
    terms, _ = module.loss_terms(generated)
    terms[loss.name].backward()
    with_grad = {n for n, p in module.named_parameters() if p.grad is not None}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert with_grad and with_grad <= trainable
    assert all(".lora_" in n for n in trainable)
    assert any("lora_B" in n and module.get_parameter(n).grad.abs().sum() > 0 for n in with_grad)
    # LoRA starts at B = 0, so lora_A's gradient is exactly zero at the first step, by design.
    assert all(module.get_parameter(n).grad.abs().sum() == 0 for n in with_grad if "lora_A" in n)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_exported_lora_loads_into_diffusers_and_gives_the_same_unet(family, tiny_paths, tmp_path):
    """Our LoRA, written in diffusers' format, loaded by ``load_lora_weights`` into a fresh pipeline, makes that
    pipeline's UNet compute exactly what our online UNet computes (rank 4 with alpha 8: the scale survives)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from comat_lightning.models.lora_files import save_denoiser_lora
    from comat_lightning.training.module import LoraConfig

    module = make_module(tiny_paths[family], lora=LoraConfig(rank=4, alpha=8))
    with torch.no_grad():
        for name, param in module.backbone.unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.2)
    folder = save_denoiser_lora(module.backbone.unet, family, tmp_path / "lora")
    assert (folder / "pytorch_lora_weights.safetensors").is_file()

    pipe = (StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline).from_pretrained(tiny_paths[family])
    pipe.load_lora_weights(str(folder))
    cond = module.backbone.encode_prompts(["a red car"], 64)
    inputs = dict(sample=torch.randn(1, 4, 8, 8), timestep=torch.tensor(500), encoder_hidden_states=cond.embeds, added_cond_kwargs=cond.added_cond_kwargs())
    with torch.no_grad():
        ours = module.backbone.unet(**inputs).sample
        theirs = pipe.unet(**inputs).sample
        pipe.unet.disable_lora()
        base = pipe.unet(**inputs).sample
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert (base - ours).abs().max() > 1e-3  # the LoRA is really in effect


OFFICIAL_MEAN, OFFICIAL_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _official_caption_loss(model, tokenizer, images, prompts, top, left, size, image_size):
    """The official CoMat caption loss (concept_mat_utils/caption_blip.py Blip.score and the crop in
    training_script.py at 5eadcce), written from its formulas: one crop window for the whole batch, bicubic
    antialiased resize, CLIP mean/std, "a photography of " + prompt.lower(), no truncation, labels without the
    prefix and padding, and BLIP's own batch loss (one mean over every scored token, label smoothing 0.1)."""
    crop = images[:, :, top : top + size, left : left + size]
    resized = torch.nn.functional.interpolate(crop, size=image_size, mode="bicubic", align_corners=False, antialias=True)
    pixel_values = (resized - torch.tensor(OFFICIAL_MEAN).view(1, 3, 1, 1)) / torch.tensor(OFFICIAL_STD).view(1, 3, 1, 1)
    enc = tokenizer(["a photography of " + p.lower() for p in prompts], padding="longest", return_tensors="pt")
    labels = enc.input_ids.masked_fill(enc.input_ids == tokenizer.pad_token_id, -100)
    labels[:, : len(tokenizer("a photography of").input_ids) - 1] = -100
    model.text_decoder.label_smoothing = 0.1
    return model(pixel_values=pixel_values, input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels).loss


def test_concept_matching_defaults_compute_the_official_loss(tiny_paths):
    """The callback with its defaults (= the faithful recipes) on 448 px images: the official loss for one crop
    offset shared by the batch (of the 9 offsets in [0, 448 // 224]^2, exactly one reproduces ours), the crop
    448 - 2 = 446 px, and a long prompt scored whole. Tolerance: float32 (1e-5)."""
    from types import SimpleNamespace

    from callbacks import ConceptMatchingLoss
    from comat_lightning.training.losses import GeneratedBatch

    loss = ConceptMatchingLoss(captioner=tiny_paths["blip"])
    assert (loss.label_smoothing, loss.reduction, loss.first_token, loss.crop_per, loss.max_caption_tokens) == (0.1, "token_mean", "cls", "batch", None)
    scorer = loss.build(SimpleNamespace(sampler=SimpleNamespace(resolution=448)))
    assert scorer.max_crop == 2 and loss.crop_pixels(512) == 2 and loss.crop_pixels(64) == 0
    torch.testing.assert_close(scorer.mean.flatten(), torch.tensor(OFFICIAL_MEAN))
    torch.testing.assert_close(scorer.std.flatten(), torch.tensor(OFFICIAL_STD))
    long_prompt = " ".join(["a red car and a blue bird"] * 8)  # 56 words; the tiny BLIP has 64 positions
    prompts = ["a red car", "A Blue Bird and a yellow flower", long_prompt]
    images = torch.rand(3, 3, 448, 448)  # pixel noise: a one-pixel shift changes the resized image
    context = SimpleNamespace(helper=lambda name: scorer)  # the part of a LossContext this loss uses
    for batch_seed in (0, 1, 2):
        generated = GeneratedBatch(prompts=prompts, latents=torch.zeros(3, 4, 56, 56), images=images, batch_seed=batch_seed)
        with torch.no_grad():
            ours, _ = loss.compute(context, generated)
            references = {
                (top, left): _official_caption_loss(scorer.model, scorer.tokenizer, images, prompts, top, left, 446, scorer.image_size)
                for top in range(3) for left in range(3)
            }  # fmt: skip
        gaps = sorted((ours - ref).abs().item() for ref in references.values())
        assert gaps[0] <= 1e-6 * ours.abs().item() and gaps[1] > 1e-4, (ours, references)  # one offset, clearly
    whole = len(scorer.tokenizer("a photography of " + long_prompt).input_ids) - scorer.prefix_length
    assert scorer.tokenize(prompts)["labels"].ne(-100).sum(dim=1)[2] == whole  # every token of the caption is scored


def test_per_batch_crop_shares_one_offset_and_per_image_crops_differ(tiny_paths):
    batch = _scorer(tiny_paths["blip"], max_crop=3, crop_per="batch")
    per_image = _scorer(tiny_paths["blip"], max_crop=3, crop_per="image")
    image = torch.rand(1, 3, 64, 64)
    images = image.expand(6, 3, 64, 64)  # six copies of one image: equal crops give equal pixel values
    shared = batch.preprocess(images, torch.Generator().manual_seed(0))
    assert all(torch.equal(shared[0], shared[i]) for i in range(6))
    separate = per_image.preprocess(images, [torch.Generator().manual_seed(s) for s in range(6)])
    assert len({separate[i].sum().item() for i in range(6)}) > 1
    with pytest.raises(ValueError, match="one generator"):
        batch.preprocess(images, [torch.Generator()] * 6)


def test_captions_longer_than_the_captioner_are_refused_without_truncation(tiny_paths):
    from comat_lightning.errors import InputError

    scorer = _scorer(tiny_paths["blip"])
    limit = scorer.model.config.text_config.max_position_embeddings
    with pytest.raises(InputError, match=rf"more than the captioner's {limit} positions.*max_caption_tokens: {limit}"):
        scorer.tokenize(["red " * (limit + 5)])
    truncated = _scorer(tiny_paths["blip"], max_length=16).tokenize(["red " * (limit + 5)])
    assert truncated["input_ids"].shape[1] == 16
