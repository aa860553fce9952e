"""Full-size SD1.5, SDXL and BLIP-large architectures with random weights, for speed and memory benchmarks.

Speed, memory and FLOPs depend on the architecture, not on the weights, so the published configs (layer widths,
depths, heads, context sizes) are rebuilt here and saved in the hub's folder layout; the benchmark then loads them
through the same ``from_pretrained`` path as real checkpoints. Tokenizers are the tiny zoo's hand-made ones (the
text encoders keep the published 49,408-token embedding tables). Weights are saved in bf16 (half the disk).

    python benchmarks/full_size_models.py --out /tmp/full_size   # -> /tmp/full_size/{sd15,sdxl,blip-large}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CLIP_VOCAB = 49408


def _clip_text(hidden: int, layers: int, heads: int, intermediate: int, projection: int, tok, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=CLIP_VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                          num_attention_heads=heads, max_position_embeddings=77, projection_dim=projection, hidden_act=act,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip


def _sd_vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
                         scaling_factor=scaling_factor)  # fmt: skip


def build_sd15(folder: Path) -> None:
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from comat_lightning.tiny.tokenizers import clip_tokenizer
    from comat_lightning.tiny.zoo import _SD_SCHEDULER

    tokenizer = clip_tokenizer(folder / "tokenizer", pad_token="<|endoftext|>")
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # defaults = SD 1.x
    text_encoder = CLIPTextModel(_clip_text(768, 12, 12, 3072, 768, tokenizer))  # CLIP ViT-L/14's text tower
    pipe = StableDiffusionPipeline(unet=unet, vae=_sd_vae(0.18215), text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=PNDMScheduler.from_config(_SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    pipe.to(torch.bfloat16).save_pretrained(folder)


def build_sdxl(folder: Path) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from comat_lightning.tiny.tokenizers import clip_tokenizer
    from comat_lightning.tiny.zoo import _SDXL_SCHEDULER

    tokenizer = clip_tokenizer(folder / "tokenizer", pad_token="<|endoftext|>")
    tokenizer_2 = clip_tokenizer(folder / "tokenizer_2", pad_token="!")
    unet = UNet2DConditionModel(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )  # fmt: skip
    text_encoder = CLIPTextModel(_clip_text(768, 12, 12, 3072, 768, tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text(1280, 32, 20, 5120, 1280, tokenizer_2, act="gelu"))  # OpenCLIP bigG
    pipe = StableDiffusionXLPipeline(unet=unet, vae=_sd_vae(0.13025), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                                     scheduler=EulerDiscreteScheduler.from_config(_SDXL_SCHEDULER))  # fmt: skip
    pipe.to(torch.bfloat16).save_pretrained(folder)


def build_blip_large(folder: Path) -> None:
    """Salesforce/blip-image-captioning-large: ViT-L/16 at 384 px, BERT-base text decoder with cross-attention."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    from comat_lightning.tiny.tokenizers import bert_tokenizer

    tokenizer = bert_tokenizer(folder)
    config = BlipConfig(
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=384, patch_size=16),
        text_config=dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, encoder_hidden_size=1024, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                         sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id),
        projection_dim=256,
    )  # fmt: skip
    model = BlipForConditionalGeneration(config).to(torch.bfloat16)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 384, "width": 384}), tokenizer=tokenizer).save_pretrained(folder)
    model.save_pretrained(folder)


BUILDERS = {"sd15": build_sd15, "sdxl": build_sdxl, "blip-large": build_blip_large}


def ensure(root: Path, name: str, device: str = "cpu") -> Path:
    """The folder of ``name`` under ``root``, built on first use (marked complete only when fully written). With
    ``device="cuda"`` the random weights are made on the GPU (SDXL's 2.6 B parameters take about a minute to
    initialise on a CPU, a second there); the saved files are the same format either way."""
    folder = root / name
    if not (folder / ".complete").exists():
        torch.manual_seed(0)
        with torch.device(device):  # factory functions (parameter creation and init) default to ``device``
            BUILDERS[name](folder)
        (folder / ".complete").write_text(json.dumps({"name": name, "initialised_on": device}))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/comat_full_size")
    parser.add_argument("--models", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    parser.add_argument("--device", default="cpu", help="where the random weights are initialised (cuda: much faster)")
    args = parser.parse_args()
    for name in args.models:
        print(ensure(Path(args.out), name, args.device))


if __name__ == "__main__":
    main()
