"""The tiny MMDiT models (tiny://sd3, tiny://flux) and their offline T5 tokenizer: real diffusers pipelines loaded
through from_pretrained; the UNet-only backbone refuses them by name before any weight loads."""

from __future__ import annotations

import pytest
import torch


def test_t5_tokenizer_is_a_real_fast_tokenizer_with_one_piece_per_word(tiny_paths):
    from transformers import T5TokenizerFast

    from comat_lightning.tiny.tokenizers import WORDS

    tokenizer = T5TokenizerFast.from_pretrained(tiny_paths["sd3"], subfolder="tokenizer_3")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)  # T5's ids
    assert all(len(tokenizer.tokenize(word)) == 1 for word in WORDS)
    ids = tokenizer("a red car and a zebraq").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["▁a", "▁red", "▁car", "▁and", "▁a", "▁zebra", "q", "</s>"]
    assert tokenizer.convert_ids_to_tokens(tokenizer("A Red").input_ids) == ["▁A", "▁R", "e", "d", "</s>"]  # case-sensitive, as T5
    padded = tokenizer(["a cat"], padding="max_length", max_length=8).input_ids[0]
    assert padded[:3] == tokenizer("a cat").input_ids and set(padded[3:]) == {0}
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a red car and a zebraq"


def test_tiny_sd3_is_a_stable_diffusion_3_pipeline(tiny_paths):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_paths["sd3"])
    assert isinstance(pipe.transformer, SD3Transformer2DModel) and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.scheduler.config.shift == 3.0 and pipe.vae.config.latent_channels == 16 and pipe.vae.config.shift_factor == 0.0609
    assert pipe.text_encoder_3.config.d_model >= pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    out = pipe("a red car", height=64, width=64, num_inference_steps=2, max_sequence_length=32, generator=generator, output_type="latent")
    assert out.images.shape == (1, 16, 8, 8) and torch.isfinite(out.images).all()


def test_tiny_flux_is_a_guidance_distilled_flux_pipeline(tiny_paths):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    pipe = FluxPipeline.from_pretrained(tiny_paths["flux"])
    assert isinstance(pipe.transformer, FluxTransformer2DModel) and pipe.transformer.config.guidance_embeds
    assert len(pipe.transformer.transformer_blocks) == 1 and len(pipe.transformer.single_transformer_blocks) == 1
    assert pipe.scheduler.config.use_dynamic_shifting and pipe.vae.config.scaling_factor == 0.3611
    generator = torch.Generator().manual_seed(0)
    out = pipe("a red car", height=64, width=64, num_inference_steps=2, max_sequence_length=32, guidance_scale=3.5,
               generator=generator, output_type="latent")  # fmt: skip
    assert out.images.shape == (1, 16, 64) and torch.isfinite(out.images).all()  # (B, 4x4 packed tokens, 16 x 2 x 2)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_the_unet_backbone_refuses_transformer_families_by_name(tiny_paths, name):
    from comat_lightning.errors import InputError
    from comat_lightning.models.backbone import detect_family

    with pytest.raises(InputError, match=r"with a transformer backbone; supported so far: the UNet families"):
        detect_family(tiny_paths[name])
