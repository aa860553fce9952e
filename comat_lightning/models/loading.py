"""Loading the diffusion backbone for a run, as plain functions the training module calls from ``configure_model``:
the pipeline's models (with the online LoRA, a loaded LoRA, or a frozen copy for full fine-tuning), gradient
checkpointing, and the storage dtype of frozen weights."""

from __future__ import annotations

import copy
from typing import Iterable, Optional

import torch
from torch import nn

from comat_lightning.errors import InputError
from comat_lightning.models.adapters import LoraConfig, checkpoint_keeping_adapters
from comat_lightning.models.backbone import DiffusionBackbone


def load_backbone(
    source: dict,
    resolution: int,
    finetune: str,
    lora: LoraConfig,
    lora_weights: Optional[str],
    gradient_checkpointing: bool,
    add_lora: bool,
) -> tuple[DiffusionBackbone, Optional[nn.Module]]:
    """(backbone with every weight frozen but the online adapter's, the frozen base UNet for full fine-tuning).

    ``source``: ``from_pretrained`` arguments (path, unet_path, vae_path, family, revision, variant). The online
    UNet gets: for ``finetune="full"`` all its weights trainable (a frozen copy is returned as the base); else the
    LoRA of ``lora_weights`` if given, else a fresh ``lora`` adapter when ``add_lora`` (not when only sampling the
    base)."""
    backbone = _from_pretrained(source)
    if resolution % backbone.vae_scale_factor:
        raise InputError(f"model.sampler.resolution={resolution} is not divisible by this VAE's factor {backbone.vae_scale_factor}")
    backbone.requires_grad_(False)
    unet, base_unet = backbone.unet, None
    if finetune == "full":
        base_unet = copy.deepcopy(unet).eval()
        unet.requires_grad_(True)
    elif lora_weights:
        from comat_lightning.models.lora_files import load_denoiser_lora

        load_denoiser_lora(unet, lora_weights)
    elif add_lora:
        unet.add_adapter(lora.peft_config())  # B = 0: training starts exactly at the base model
    if gradient_checkpointing:
        # Non-reentrant (works with detached inputs and frozen bases); re-runs use the adapter their forward used.
        unet.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_keeping_adapters)
        backbone.vae.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_keeping_adapters)
    return backbone, base_unet


def _from_pretrained(source: dict):
    """A DiffusionBackbone (UNet families) or an MMDiTBackbone (SD3 / FLUX.1), by the pipeline's model_index.json."""
    from comat_lightning.models.mmdit import MMDiTBackbone, mmdit_family

    if mmdit_family(source["path"], source.get("revision")) is None:
        return DiffusionBackbone.from_pretrained(**source)
    refuse_component_paths(source)
    return MMDiTBackbone.from_pretrained(source["path"], revision=source.get("revision"), variant=source.get("variant"))


def refuse_component_paths(source: dict) -> None:
    """SD3 / FLUX.1 pipelines load whole: ``unet_path`` / ``vae_path`` replace UNet-family components only."""
    for option in ("unet_path", "vae_path"):
        if source.get(option):
            raise InputError(f"model.{option}: replacing a component is supported for the UNet families only")


def frozen_weight_dtype(option: str, precision: str) -> Optional[torch.dtype]:
    """The storage dtype of frozen weights for ``model.frozen_dtype`` under ``trainer.precision`` (None: keep
    float32). "auto" is bf16 under bf16-mixed: autocast computes in bf16 anyway, and it halves their memory."""
    auto = torch.bfloat16 if precision == "bf16-mixed" else None
    return {"auto": auto, "float32": None, "bfloat16": torch.bfloat16}[option]


def store_frozen_weights(modules: Iterable[Optional[nn.Module]], dtype: Optional[torch.dtype]) -> None:
    """Cast frozen parameters to ``dtype``; trainable ones (and buffers such as normalisation constants) stay
    float32. The VAE in bf16 is safe (bf16 has fp32's range; fp16 is what overflows in SDXL's decoder)."""
    if dtype is None:
        return
    for module in modules:
        for param in module.parameters() if module is not None else ():
            if not param.requires_grad and param.is_floating_point():
                param.data = param.data.to(dtype)


__all__ = ["frozen_weight_dtype", "load_backbone", "store_frozen_weights"]
