"""Start-up checks of what a run is given, made before any model is loaded.

- Paths: an option that names a local file or folder (it starts like a path, or its parent folder exists) must
  exist; a hub id ("owner/name") is left to the loader, which may download it.
- The model against the options: which cross-attention layers the attention losses, guidance and evaluation read,
  and which modules the LoRA adapters target, are checked against the UNet the run will load. Only config files
  are read: the UNet is built from its config on the meta device (no memory, no weights, well under a second even
  for SDXL), so its layers are listed exactly as the loaded model will have them.

:func:`check_model_inputs` is called from ``CoMatModule.setup``, which Lightning runs before ``configure_model``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from comat_lightning.attention.capture import CrossAttentionLayer, LayerSelection, cross_attention_layers
from comat_lightning.errors import InputError
from comat_lightning.files.paths import check_local_path, user_path
from comat_lightning.tiny.zoo import resolve_model_path
from comat_lightning.training.callback_contracts import ReadsAttention

# Module types peft can put a LoRA on (a target that names e.g. a whole attention block is refused by peft).
_LORA_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


@dataclass
class ModelLayout:
    """What the configs say about the model a run will load."""

    where: str  # the option (and value) the UNet config came from, for messages
    unet: nn.Module  # built from its config on the meta device: module names and block structure only
    vae_factor: int  # image px per latent px


def _read_config(cls: Any, option: str, value: str, subfolders: Sequence[Optional[str]], revision: Optional[str]) -> Optional[dict]:
    """``cls.load_config`` from the first subfolder that has one. A local folder without it is refused; a hub id
    that cannot be read now (offline, not cached) gives None and is left to the loader, which reports it."""
    resolved = resolve_model_path(value)
    error: Optional[Exception] = None
    for subfolder in subfolders:
        try:
            return dict(cls.load_config(resolved, subfolder=subfolder, revision=revision))
        except Exception as err:  # hub and file errors come in many types; only the message is reported
            error = err
    if user_path(resolved).is_dir():
        wanted = " or ".join(f"{sub}/config.json" if sub else "config.json" for sub in subfolders)
        raise InputError(f"{option}={value!r}: the folder has no readable {wanted} of a {cls.__name__} ({error})")
    return None


def read_model_layout(source: dict[str, Any]) -> Optional[ModelLayout]:
    """The layout of the model ``CoMatModule.model_source`` describes (path, unet_path, vae_path, revision), from
    config files only; None when a hub id's configs cannot be read now."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    path, unet_path, vae_path, revision = source["path"], source.get("unet_path"), source.get("vae_path"), source.get("revision")
    if unet_path:
        nested = user_path(resolve_model_path(unet_path)).joinpath("unet").is_dir()  # as the loader: unet/ if present
        where = f"model.unet_path={unet_path!r}"
        unet_config = _read_config(UNet2DConditionModel, "model.unet_path", unet_path, ["unet"] if nested else [None, "unet"], revision)
    else:
        where = f"model.pretrained_model={path!r}"
        unet_config = _read_config(UNet2DConditionModel, "model.pretrained_model", path, ["unet"], revision)
    if vae_path:
        vae_config = _read_config(AutoencoderKL, "model.vae_path", vae_path, [None], revision)
    else:
        vae_config = _read_config(AutoencoderKL, "model.pretrained_model", path, ["vae"], revision)
    if unet_config is None or vae_config is None:
        return None
    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(unet_config)
    except Exception as err:  # a config the loader could not build either
        raise InputError(f"{where}: its UNet config does not describe a UNet2DConditionModel ({err})") from None
    channels = vae_config.get("block_out_channels")
    if not isinstance(channels, (list, tuple)) or not channels:
        raise InputError(f"{where}: its VAE config has no block_out_channels list (got {channels!r})")
    return ModelLayout(where=where, unet=unet, vae_factor=2 ** (len(channels) - 1))


def vae_geometry(pipeline: str) -> Optional[tuple[int, int]]:
    """(image px per latent px, latent channels) of a pipeline's VAE, from its config file only; None when a hub
    id's config cannot be read now."""
    from diffusers import AutoencoderKL

    config = _read_config(AutoencoderKL, "model.pretrained_model", pipeline, ["vae"], None)
    if config is None or not isinstance(config.get("block_out_channels"), (list, tuple)):
        return None
    return 2 ** (len(config["block_out_channels"]) - 1), int(config.get("latent_channels", 4))


def _attention_requests(module, stage: str, latent_size: int, joint: bool = False) -> list[tuple[str, LayerSelection]]:
    """(options, layers) of everything that will read cross-attention maps in this stage: the active losses, guidance
    and any callback that reads maps (:class:`ReadsAttention`). ``joint``: the model is an MMDiT."""
    default = module.guidance_selection(latent_size, joint=joint)
    requests = [request for loss in module.losses for request in loss.attention_requests(stage, default)]
    if module.guidance is not None:
        requests.append(("model.guidance_blocks / model.guidance_resolution", default))
    trainer = module._trainer
    for callback in trainer.callbacks if trainer is not None else []:
        if isinstance(callback, ReadsAttention) and callback not in module.losses:
            requests.extend(callback.attention_requests(stage, default))
    return requests


def _lora_targets(module, stage: str) -> list[tuple[str, list[str]]]:
    """(option, target modules) of every LoRA adapter configure_model will add to the run's UNet."""
    targets = []
    if module.finetune == "lora" and module.lora_weights is None and stage != "predict":
        targets.append(("model.lora.target_modules", list(module.lora.target_modules)))
    for loss in module.losses:
        targets.extend(loss.lora_targets(stage))
    return targets


def _short_name(name: str) -> str:
    """The end of a module name a LoRA target would use: "to_q", or "to_out.0" for an item of a list."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


def model_problems(module, stage: str, layout: ModelLayout) -> list[str]:
    """Every option of ``module`` (and of its trainer's callbacks) that asks the model for what it lacks."""
    problems = []
    resolution = module.sampler.resolution
    if resolution % layout.vae_factor:
        problems.append(f"model.sampler.resolution={resolution}: not divisible by the VAE factor {layout.vae_factor} of {layout.where}")
    else:
        latent = resolution // layout.vae_factor
        layers = cross_attention_layers(layout.unet, latent)
        sides = {block: sorted({layer.resolution for layer in layers if layer.block == block}) for block in ("down", "mid", "up")}
        have = "; ".join(f"{block}: {', '.join(map(str, found)) or 'none'}" for block, found in sides.items())
        for option, selection in _attention_requests(module, stage, latent):
            if not any(selection.matches(layer) for layer in layers):
                asked = list(selection.resolutions) if selection.resolutions else "all"
                problems.append(
                    f"{option}: blocks={list(selection.blocks)} resolutions={asked} match no cross-attention layer of "
                    f"{layout.where} at model.sampler.resolution={resolution} (latent {latent}x{latent}); its map sides "
                    f"are {have}"
                )
    names = [name for name, child in layout.unet.named_modules() if isinstance(child, _LORA_LAYER_TYPES)]
    for option, targets in _lora_targets(module, stage):
        missing = [t for t in targets if not any(name == t or name.endswith("." + t) for name in names)]
        if missing:
            examples = sorted({_short_name(name) for name in names if ".attn" in name})
            problems.append(
                f"{option}: {missing} name no Linear/Conv layer of the UNet of {layout.where} (a target matches the end "
                f"of a module name); its attention layers end in {examples}"
            )
    return problems


def check_run_settings(module, stage: str) -> None:
    """Refuse a run the module cannot do: fitting with no loss, fp16 with an adversarial loss, unsupported trainer
    settings (check_trainer), bf16 frozen weights without bf16 compute."""
    from comat_lightning.training.options import check_trainer

    if stage == "fit" and not module.losses:
        raise InputError(
            "no loss callback is active: add at least one under trainer.callbacks, e.g.\n"
            "  - class_path: callbacks.ConceptMatchingLoss\n    init_args: {captioner: Salesforce/blip-image-captioning-large}"
        )
    adversary, precision = module.adversary, str(module.trainer.precision)
    if adversary is not None and precision.startswith("16"):
        raise InputError(
            f"trainer.precision={precision}: fp16 loss scaling is not supported with {type(adversary).__name__} "
            "(its discriminator step bypasses the gradient scaler); use bf16-mixed or 32-true"
        )
    optimizers = {"model.optimizer.name": module.optimizer_config.name}
    if adversary is not None:
        optimizers[f"{type(adversary).__name__}.optimizer"] = getattr(adversary, "optimizer_name", "adamw")
    check_trainer(module.trainer, optimizers, adversarial=adversary is not None)
    if module.frozen_dtype == "bfloat16" and not precision.startswith("bf16"):
        raise InputError(
            f"model.frozen_dtype=bfloat16 with trainer.precision={precision}: bf16 weights need bf16 compute; "
            "use trainer.precision: bf16-mixed (or model.frozen_dtype: auto)"
        )


def _check_mmdit_support(module, stage: str, family: str) -> None:
    """SD3 / FLUX.1 run every method of the UNet families; what differs is checked here, before any weight loads:
    the layers read must be the joint attention layers, and components cannot be swapped."""
    from comat_lightning.models.loading import refuse_component_paths

    name = {"sd3": "SD3 / SD3.5", "flux": "FLUX.1"}[family]
    geometry = vae_geometry(module.model_source["path"])
    latent = module.sampler.resolution // (geometry[0] if geometry else 8)
    joint = CrossAttentionLayer(name="transformer_blocks.*.attn", block="joint", resolution=latent // 2, heads=0)
    for option, selection in _attention_requests(module, stage, latent, joint=True):
        if "joint" not in selection.blocks or (geometry and not selection.matches(joint)):  # the side needs the VAE's config
            asked = list(selection.resolutions) if selection.resolutions else "all"
            raise InputError(f"{option}: blocks={list(selection.blocks)} resolutions={asked} match no layer of this {name} model; its maps "
                             f"are block joint, side {latent // 2} at model.sampler.resolution={module.sampler.resolution}")  # fmt: skip
    if stage != "predict":
        separate = [loss for loss in module.losses if getattr(loss, "discriminator_model", None)]
        if separate:
            raise InputError(f"{type(separate[0]).__name__}.discriminator_model: a separate discriminator backbone is for the UNet families; "
                             f"on a {name} pipeline leave it null (the discriminator is a second LoRA on the transformer)")  # fmt: skip
    refuse_component_paths(module.model_source)


def check_model_inputs(module, stage: str) -> None:
    """Refuse, before ``configure_model`` loads any weights: model paths that do not exist, a resolution the VAE
    cannot encode, attention layers that the UNet lacks at the sampling resolution, LoRA targets it does not have."""
    source = module.model_source
    check_local_path("model.pretrained_model", source["path"], "pipeline folder")
    check_local_path("model.unet_path", source.get("unet_path"), "UNet folder")
    check_local_path("model.vae_path", source.get("vae_path"), "VAE folder")
    check_local_path("model.lora_weights", module.lora_weights, "LoRA file or folder")
    from comat_lightning.models.mmdit import mmdit_family

    family = mmdit_family(source["path"], source.get("revision"))
    if family is not None:
        _check_mmdit_support(module, stage, family)
        return
    if source.get("family", "auto") == "auto" and user_path(resolve_model_path(source["path"])).is_dir():
        from comat_lightning.models.backbone import detect_family

        detect_family(resolve_model_path(source["path"]), source.get("revision"))  # refuses a folder without model_index.json
    layout = read_model_layout(source)
    if layout is None:
        return
    problems = model_problems(module, stage, layout)
    if problems:
        raise InputError("the model cannot run these options:\n  " + "\n  ".join(problems))


__all__ = ["ModelLayout", "check_model_inputs", "check_run_settings", "read_model_layout", "vae_geometry"]
