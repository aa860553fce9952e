"""Write the online denoiser's LoRA in diffusers' format, loadable with ``pipe.load_lora_weights(folder)``: the
UNet of SD 1.x/2.x and SDXL, or the transformer of SD3 / SD3.5 and FLUX.1."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from comat_lightning.errors import InputError
from comat_lightning.files.atomic import atomic_folder

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default name, found by load_lora_weights

# family -> (the diffusers pipeline whose save_lora_weights writes the file, the denoiser's prefix in it)
_PIPELINES = {
    "sd": ("StableDiffusionPipeline", "unet"),
    "sdxl": ("StableDiffusionXLPipeline", "unet"),
    "sd3": ("StableDiffusion3Pipeline", "transformer"),
    "flux": ("FluxPipeline", "transformer"),
}


def denoiser_prefix(model) -> str:
    """"unet" for a UNet, "transformer" for an MMDiT: the key prefix of the denoiser's layers in a LoRA file."""
    return "unet" if type(model).__name__.startswith("UNet") else "transformer"


def save_denoiser_lora(model, family: str, folder: str | os.PathLike, adapter_name: str = "default", write: bool = True) -> Optional[Path]:
    """Save ``model``'s (UNet or transformer) PEFT adapter as ``folder/pytorch_lora_weights.safetensors`` (with its
    LoRA config as metadata, so a rank != alpha scale survives). Written to a temporary sibling and renamed: a folder
    that exists is complete. A sharded (FSDP2) model's weights are gathered from every rank first: then every rank
    must call this, and all but one pass ``write=False``."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from comat_lightning.models.sharding import full_state

    folder = Path(folder)
    pipeline_name, prefix = _PIPELINES[family]
    layers = get_peft_model_state_dict(model, adapter_name=adapter_name)
    if prefix == "unet":  # diffusers' UNet LoRA keys (lora.down / lora.up); its transformer loaders read PEFT's names
        layers = convert_state_dict_to_diffusers(layers)
    layers = full_state(layers)
    if not write:
        return None
    layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
    with atomic_folder(folder) as tmp:
        getattr(diffusers, pipeline_name).save_lora_weights(
            tmp, weight_name=WEIGHT_NAME,
            **{f"{prefix}_lora_layers": layers, f"{prefix}_lora_adapter_metadata": model.peft_config[adapter_name].to_dict()},
        )  # fmt: skip
    return folder


def load_denoiser_lora(model, path: str | os.PathLike, adapter_name: str = "default") -> None:
    """Load a diffusers-format LoRA (ours, or any ``save_lora_weights`` / kohya-converted file diffusers reads) into
    ``model`` (UNet or transformer) as adapter ``adapter_name``, trainable (so a run can also continue from it)."""
    from comat_lightning.tiny.zoo import resolve_model_path

    source = Path(resolve_model_path(str(path)))
    kwargs = {"weight_name": source.name if source.is_file() else WEIGHT_NAME, "use_safetensors": True}
    folder = source.parent if source.is_file() else source
    prefix = denoiser_prefix(model)
    try:
        model.load_lora_adapter(str(folder), prefix=prefix, adapter_name=adapter_name, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"model.lora_weights={str(path)!r}: not a diffusers-format {prefix} LoRA ({err})") from err
    for name, param in model.named_parameters():
        if f".{adapter_name}." in name:
            param.requires_grad_(True)
