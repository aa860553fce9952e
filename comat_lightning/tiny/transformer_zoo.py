"""Tiny, offline stand-ins for the MMDiT flow-matching families: Stable Diffusion 3 / 3.5 and FLUX.1.

Registered in :mod:`comat_lightning.tiny.zoo` as ``tiny://sd3`` and ``tiny://flux``: built here from configs with
fixed seeds, written with ``save_pretrained`` in the hub's folder layout (``StableDiffusion3Pipeline`` /
``FluxPipeline``), loaded back through ``from_pretrained``. What they keep of the real models, at toy sizes:

- SD3: ``SD3Transformer2DModel`` (joint attention, patch 2), CLIP-L and CLIP-G towers with projections (their
  pooled embeddings concatenated), a T5 encoder whose width the CLIP features are padded to, a 16-channel VAE with
  scaling and shift factors, ``FlowMatchEulerDiscreteScheduler`` with SD3's shift 3.0.
- FLUX.1-dev: ``FluxTransformer2DModel`` with one double-stream (joint) and one single-stream block, RoPE over
  (text index, row, column), guidance embedding (guidance-distilled: no CFG), CLIP-L pooled + T5, 2x2-packed
  latents, FLUX's dynamic shifting.

64 px images, VAE factor 8: 8x8x16 latents (SD3: 16 image tokens of patch 2x2; FLUX: 16 packed tokens of 64).
The T5 tokenizer is a real ``T5TokenizerFast`` over a hand-made Unigram vocabulary (no sentencepiece needed):
every word of ``tiny.tokenizers.WORDS`` is one piece, other text falls back to characters, ``</s>`` ends it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

T5_MAX_LENGTH = 32  # tokens; the pipelines' max_sequence_length must not exceed it (SD3 256, FLUX-dev 512 on the hub)

_SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}  # SD3's hub config

_FLUX_SCHEDULER = {  # FLUX.1-dev's published scheduler_config.json
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}


def t5_tokenizer(folder: Path, words: Sequence[str] | None = None, model_max_length: int = T5_MAX_LENGTH):
    """A ``T5TokenizerFast`` saved to ``folder``: T5's special ids (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2), a
    Metaspace pre-tokenizer (``▁`` marks a word start) and a Unigram model whose pieces are the given words (one
    piece each, scored above their letters) plus single characters, so any ASCII text tokenizes. Case-sensitive as
    T5 (transformers rebuilds the pipeline around the saved model: no normaliser)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    from comat_lightning.tiny.tokenizers import WORDS

    words = WORDS if words is None else words
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?;:'\"-()/&"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{w}", -1.0) for w in dict.fromkeys(words)]  # a whole word costs less than its letters
    vocab += [(c, -5.0) for c in letters] + [(f"▁{c}", -5.0) for c in letters]
    vocab = list(dict((piece, score) for piece, score in vocab).items())
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    tok = T5TokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), extra_ids=0, model_max_length=model_max_length,
                          pad_token="<pad>", eos_token="</s>", unk_token="<unk>")  # fmt: skip
    tok.save_pretrained(folder)
    return tok


def _t5_encoder(vocab_size: int, d_model: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(3)
    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)  # fmt: skip
    return T5EncoderModel(config)


def _vae_16ch(scaling_factor: float, shift_factor: float):
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    # 4 blocks -> factor 8; 16 latent channels, no quant convs (as the SD3 and FLUX VAEs).
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32), layers_per_block=1, latent_channels=16, norm_num_groups=8, sample_size=64,
        scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip


def _clip_with_projection(folder: Path, seed: int, pad_token: str):
    from transformers import CLIPTextModelWithProjection

    from comat_lightning.tiny.tokenizers import clip_tokenizer, text_encoder_config

    tokenizer = clip_tokenizer(folder, pad_token=pad_token)
    torch.manual_seed(seed)
    return tokenizer, CLIPTextModelWithProjection(text_encoder_config(len(tokenizer), tokenizer))


def build_sd3(folder: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, text_encoder = _clip_with_projection(folder / "tokenizer", 2, pad_token="<|endoftext|>")  # CLIP-L
    tokenizer_2, text_encoder_2 = _clip_with_projection(folder / "tokenizer_2", 4, pad_token="!")  # CLIP-G pads with "!"
    tokenizer_3 = t5_tokenizer(folder / "tokenizer_3")
    text_encoder_3 = _t5_encoder(len(tokenizer_3), d_model=64)  # >= the concatenated CLIP widths (32 + 32), as 4096 >= 2048
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16,
    )  # fmt: skip
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(_SD3_SCHEDULER),
        vae=_vae_16ch(scaling_factor=1.5305, shift_factor=0.0609),  # SD3's VAE factors
        text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )  # fmt: skip
    pipe.save_pretrained(folder)


def build_flux(folder: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    from comat_lightning.tiny.tokenizers import clip_tokenizer, text_encoder_config

    tokenizer = clip_tokenizer(folder / "tokenizer", pad_token="<|endoftext|>")
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(text_encoder_config(len(tokenizer), tokenizer))  # FLUX reads its pooled output (32)
    tokenizer_2 = t5_tokenizer(folder / "tokenizer_2")
    text_encoder_2 = _t5_encoder(len(tokenizer_2), d_model=64)
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(_FLUX_SCHEDULER),
        vae=_vae_16ch(scaling_factor=0.3611, shift_factor=0.1159),  # FLUX.1's VAE factors
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
    )  # fmt: skip
    pipe.save_pretrained(folder)


__all__ = ["T5_MAX_LENGTH", "build_flux", "build_sd3", "t5_tokenizer"]
