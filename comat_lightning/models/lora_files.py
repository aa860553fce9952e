"""Write the online UNet's LoRA in diffusers' format, loadable with ``pipe.load_lora_weights(folder)``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from comat_lightning.errors import InputError
from comat_lightning.files.atomic import atomic_folder

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default name, found by load_lora_weights


def save_unet_lora(unet, family: str, folder: str | os.PathLike, adapter_name: str = "default", write: bool = True) -> Optional[Path]:
    """Save ``unet``'s PEFT adapter as ``folder/pytorch_lora_weights.safetensors`` (with its LoRA config as
    metadata, so a rank != alpha scale survives). Written to a temporary sibling and renamed: a folder that
    exists is complete. A sharded (FSDP2) UNet's weights are gathered from every rank first: then every rank must
    call this, and all but one pass ``write=False``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from comat_lightning.models.sharding import full_state

    folder = Path(folder)
    layers = full_state(convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=adapter_name)))
    if not write:
        return None
    layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
    pipeline_cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    with atomic_folder(folder) as tmp:
        pipeline_cls.save_lora_weights(
            tmp, unet_lora_layers=layers, unet_lora_adapter_metadata=unet.peft_config[adapter_name].to_dict(), weight_name=WEIGHT_NAME
        )
    return folder


def load_unet_lora(unet, path: str | os.PathLike, adapter_name: str = "default") -> None:
    """Load a diffusers-format LoRA (ours, or any ``save_lora_weights`` / kohya-converted file diffusers reads) into
    ``unet`` as adapter ``adapter_name``, trainable (so a run can also continue from it)."""
    from comat_lightning.tiny.zoo import resolve_model_path

    source = Path(resolve_model_path(str(path)))
    kwargs = {"weight_name": source.name if source.is_file() else WEIGHT_NAME, "use_safetensors": True}
    folder = source.parent if source.is_file() else source
    try:
        unet.load_lora_adapter(str(folder), prefix="unet", adapter_name=adapter_name, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"model.lora_weights={str(path)!r}: not a diffusers-format UNet LoRA ({err})") from err
    for name, param in unet.named_parameters():
        if f".{adapter_name}." in name:
            param.requires_grad_(True)
