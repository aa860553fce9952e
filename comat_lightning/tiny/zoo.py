"""Tiny, offline stand-ins for Stable Diffusion 1.x, SDXL, BLIP and CLIP.

No model hub is reachable where this project is built and tested, so tests and the demo use models built here
from configs with fixed seeds, written with ``save_pretrained`` in the hub's folder layout, and then loaded back
through exactly the same ``from_pretrained`` code a real user's hub id or folder takes.

A config names them as ``tiny://sd``, ``tiny://sdxl``, ``tiny://sd3`` and ``tiny://flux`` (MMDiT flow-matching
families, built in :mod:`comat_lightning.tiny.transformer_zoo`), ``tiny://blip``, ``tiny://blip-vqa`` (BLIP for question answering), ``tiny://clip`` (a ``CLIPModel`` with
its ``CLIPProcessor``, for the CLIP score), ``tiny://grounding-dino`` or ``tiny://sam`` (the last two built in
:mod:`comat_lightning.tiny.detection_zoo`); :func:`resolve_model_path` builds the folder on first use
(atomically: a half-built folder is never visible) under ``$COMAT_TINY_ZOO`` or ``~/.cache/comat_lightning/tiny_zoo``
and returns its path. Building all six takes about two seconds.

Both tokenizers are hand-made but real: a byte-level BPE in CLIP's format (any text tokenizes; the words in
``WORDS`` are single tokens, other words split into several pieces) and a WordPiece vocab in BERT's format
with BLIP's ``[DEC]`` start token."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from comat_lightning.errors import InputError
from comat_lightning.tiny.tokenizers import WORDS, bert_tokenizer, clip_tokenizer, text_encoder_config

TINY_SCHEME = "tiny://"


# The cache key is a hash of the builders' files: any change to a builder invalidates previously built models.
_BUILDER_FILES = tuple(Path(__file__).with_name(name) for name in ("zoo.py", "tokenizers.py", "detection_zoo.py", "transformer_zoo.py"))


ZOO_VERSION = hashlib.sha256(b"".join(f.read_bytes() for f in _BUILDER_FILES)).hexdigest()[:12]


TINY_MODELS = ("sd", "sdxl", "sd3", "flux", "blip", "blip-vqa", "clip", "grounding-dino", "sam", "mask2former")


_SD_SCHEDULER = {  # Stable Diffusion 1.5's published scheduler_config.json (PNDM, as on the hub)
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


_SDXL_SCHEDULER = {  # SDXL base 1.0's published scheduler_config.json (Euler, as on the hub)
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def zoo_root() -> Path:
    return Path(os.environ.get("COMAT_TINY_ZOO", Path.home() / ".cache" / "comat_lightning" / "tiny_zoo"))


# The shapes world's trained models (benchmarks/shapes/models, committed): real weights that draw and judge shapes.
SHAPES_SCHEME = "shapes://"


SHAPES_MODELS = ("sd", "blip")


SHAPES_FOLDER = Path(__file__).resolve().parents[2] / "benchmarks" / "shapes" / "models"


def short_name_error(path: str) -> Optional[str]:
    """Why a ``tiny://`` or ``shapes://`` name is not one (None when it is, or when ``path`` is no such name)."""
    for kind, scheme, names in (("tiny", TINY_SCHEME, TINY_MODELS), ("shapes", SHAPES_SCHEME, SHAPES_MODELS)):
        if path.startswith(scheme) and path[len(scheme) :].strip("/") not in names:
            return f"unknown {kind} model; expected one of {[scheme + n for n in names]}"
    if path.startswith(SHAPES_SCHEME) and not (SHAPES_FOLDER / path[len(SHAPES_SCHEME) :].strip("/")).is_dir():
        return f"{SHAPES_FOLDER} holds no such model; train them with python benchmarks/shapes/train_models.py"
    return None


def resolve_model_path(path: str) -> str:
    """Return ``path`` unchanged, the folder of a ``tiny://NAME`` model (built on first use) or of a ``shapes://NAME``
    model (the shapes world's committed models)."""
    if isinstance(path, str) and path.startswith(SHAPES_SCHEME):
        problem = short_name_error(path)
        if problem:
            raise InputError(f"{path!r}: {problem}")
        return str(SHAPES_FOLDER / path[len(SHAPES_SCHEME) :].strip("/"))
    if not isinstance(path, str) or not path.startswith(TINY_SCHEME):
        return path
    name = path[len(TINY_SCHEME) :].strip("/")
    if name not in TINY_MODELS:
        raise InputError(f"unknown tiny model {path!r}; expected one of {[TINY_SCHEME + m for m in TINY_MODELS]}")
    target = zoo_root() / f"{name}-{ZOO_VERSION}"
    if not (target / ".complete").exists():
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            _build_in_fresh_process(name, target)
        else:
            build_tiny_model(name, target)
    return str(target)


def _build_in_fresh_process(name: str, target: Path) -> None:
    """Build outside this process's process group: transformers' ``save_pretrained`` silently writes nothing on a
    rank other than 0 of an initialised group, which left rank 1 of a first ``torchrun`` with an empty text encoder
    folder marked complete. Every rank may build (one node's cache, or a shared one): the rename keeps one copy."""
    import subprocess
    import sys

    env = {**os.environ, "COMAT_TINY_ZOO": str(target.parent)}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "comat_lightning.tiny.zoo", name], env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not (target / ".complete").exists():
        raise RuntimeError(f"building tiny://{name} in a separate process failed:\n{proc.stderr[-2000:]}")


def build_tiny_model(name: str, target: Path) -> None:
    """Build one tiny model into ``target`` via a temporary sibling folder and an atomic rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        from comat_lightning.tiny.detection_zoo import build_grounding_dino, build_mask2former, build_sam
        from comat_lightning.tiny.transformer_zoo import build_flux, build_sd3

        builders = {"sd": _build_sd, "sdxl": _build_sdxl, "blip": _build_blip, "clip": _build_clip,
                    "blip-vqa": lambda folder: _build_blip(folder, question_answering=True)}  # fmt: skip
        builders.update({"grounding-dino": build_grounding_dino, "sam": build_sam, "mask2former": build_mask2former})
        builders.update({"sd3": build_sd3, "flux": build_flux})
        builders[name](tmp)
        (tmp / ".complete").write_text(ZOO_VERSION)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: its copy is identical (same seeds)
            if not (target / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tiny_vae():
    from diffusers import AutoencoderKL

    # 4 blocks -> scale factor 8, as in SD: 64 px images <-> 8x8 latents.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def _tiny_unet(**family_config):
    """UNet with 8x8 latents and two resolution levels (8 and 4), seeded; the family supplies the rest."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, **family_config
    )
    # A random init gives near-uniform cross-attention (concept-map overlap ~0.49 of 0.5) that hardly depends on the
    # latent; real SD's is peaky. Scaling query and key by 4 (logits x16) makes the maps respond to the latent, which
    # attention guidance (A-STAR, Attend-and-Excite) and its tests need.
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                module.to_q.weight.mul_(4.0)
                module.to_k.weight.mul_(4.0)
    return unet


def _seeded(seed: int, build, *args):
    torch.manual_seed(seed)
    return build(*args)


def _build_sd(folder: Path) -> None:
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    tokenizer = clip_tokenizer(folder / "tokenizer", pad_token="<|endoftext|>")
    unet = _tiny_unet(
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    vae = _seeded(1, _tiny_vae)
    text_encoder = _seeded(2, CLIPTextModel, text_encoder_config(len(tokenizer), tokenizer))
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=PNDMScheduler.from_config(_SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)


def _build_sdxl(folder: Path) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = clip_tokenizer(folder / "tokenizer", pad_token="<|endoftext|>")
    tokenizer_2 = clip_tokenizer(folder / "tokenizer_2", pad_token="!")  # SDXL's second tokenizer pads with "!"
    unet = _tiny_unet(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=64,  # 32 (text_encoder) + 32 (text_encoder_2), concatenated
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + pooled projection 32
    )
    vae = _seeded(1, _tiny_vae)
    text_encoder = _seeded(2, CLIPTextModel, text_encoder_config(len(tokenizer), tokenizer))
    text_encoder_2 = _seeded(3, CLIPTextModelWithProjection, text_encoder_config(len(tokenizer_2), tokenizer_2))
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=EulerDiscreteScheduler.from_config(_SDXL_SCHEDULER),
    )
    pipe.save_pretrained(folder)


def _blip_config(tokenizer):
    from transformers import BlipConfig

    return BlipConfig(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            # BlipVisionConfig defaults to 1e-10, which makes a random BLIP ignore its image entirely; at 0.02 the
            # caption NLL still varies by only ~1e-4 between images. 0.2 (here and in the text decoder) gives a
            # judge whose NLL varies by ~0.3 between images, so the demo's loss visibly responds to training.
            initializer_range=0.2,
        ),
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            encoder_hidden_size=32,
            max_position_embeddings=64,
            bos_token_id=tokenizer.bos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            sep_token_id=tokenizer.sep_token_id,
            eos_token_id=tokenizer.sep_token_id,
            initializer_range=0.2,
        ),
        projection_dim=32,
    )


def _build_blip(folder: Path, question_answering: bool = False) -> None:
    """The captioner (``tiny://blip``), or with ``question_answering`` the VQA model (``tiny://blip-vqa``: the same
    sizes, a vocabulary with "yes", "no" and the official evaluator's ``[ENC]`` question token)."""
    from transformers import BlipForConditionalGeneration, BlipForQuestionAnswering, BlipImageProcessor, BlipProcessor

    tokenizer = bert_tokenizer(folder, words=(*WORDS, "yes", "no", "[ENC]")) if question_answering else bert_tokenizer(folder)
    torch.manual_seed(0)
    model = (BlipForQuestionAnswering if question_answering else BlipForConditionalGeneration)(_blip_config(tokenizer))
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    model.save_pretrained(folder)


def _build_clip(folder: Path) -> None:
    """A CLIPModel (32 px images, 8 px patches, 16-d joint embedding) and its CLIPProcessor, for the CLIP score."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = clip_tokenizer(folder, pad_token="<|endoftext|>")
    config = CLIPConfig(
        text_config=text_encoder_config(len(tokenizer), tokenizer, projection_dim=16).to_dict(),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8),
        projection_dim=16,
    )
    model = _seeded(0, CLIPModel, config)
    # The PIL backend is what CLIPImageProcessor falls back to without torchvision; naming it avoids that warning
    # here, and the saved config loads with either backend.
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    model.save_pretrained(folder)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Build the tiny offline models (normally done on first use).")
    parser.add_argument("names", nargs="*", help=f"any of {', '.join(TINY_MODELS)} (default: all)")
    for name in parser.parse_args().names or TINY_MODELS:
        print(name, "->", resolve_model_path(TINY_SCHEME + name))


if __name__ == "__main__":
    main()
