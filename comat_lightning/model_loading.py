"""Loading the models a CoMatModule trains and judges with (mixed into :class:`comat_lightning.module.CoMatModule`).

``configure_model`` runs after ``setup`` has checked every option, so a bad config fails before gigabytes load:
the pipeline (UNet, VAE, text encoders) through ``from_pretrained``, the online LoRA (or full fine-tuning with a
frozen copy as the base), gradient checkpointing, attention capture on the layers the losses read, the frozen
helper models each loss ``build``s (captioner, discriminator, segmenters), bf16 storage of frozen weights, and FSDP2
sharding under ``ModelParallelStrategy``.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch

from comat_lightning.adapters import checkpoint_keeping_adapters
from comat_lightning.attention_capture import LayerSelection, install_capture, select_layers
from comat_lightning.diffusion_model import DiffusionBackbone
from comat_lightning.options import check_resolution
from comat_lightning.sharding import is_model_parallel, shard_trainable, shard_unet


class ModelLoading:
    """Expects the module's options (``model_source``, ``finetune``, ``lora``, ``lora_weights``, ``sampler``,
    ``gradient_checkpointing``, ``frozen_dtype``, ``guidance``, ``guidance_layers``), ``losses`` and ``adversary``."""

    def configure_model(self) -> None:
        if self.backbone is not None:  # Lightning may call this once per stage
            return
        backbone = DiffusionBackbone.from_pretrained(**self.model_source)
        check_resolution(self.sampler.resolution, backbone)
        backbone.requires_grad_(False)
        unet = backbone.unet
        if self.finetune == "full":
            self.base_unet = copy.deepcopy(unet).eval()
            unet.requires_grad_(True)
        elif self.lora_weights:
            from comat_lightning.lora_export import load_unet_lora

            load_unet_lora(unet, self.lora_weights)
        elif self._trainer is None or self.trainer.state.fn != "predict":  # sampling the base: no empty adapter
            from peft import LoraConfig as PeftLoraConfig

            from comat_lightning.options import peft_init

            unet.add_adapter(
                PeftLoraConfig(
                    r=self.lora.rank,
                    lora_alpha=self.lora.alpha or self.lora.rank,
                    target_modules=list(self.lora.target_modules),
                    init_lora_weights=peft_init(self.lora.init),  # B = 0: training starts exactly at the base model
                )
            )
        if self.gradient_checkpointing:
            # Non-reentrant (works with detached inputs and frozen bases); re-runs use the adapter their forward used.
            unet.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_keeping_adapters)
            backbone.vae.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_keeping_adapters)
        self.backbone = backbone
        self._install_attention_capture()
        for loss in self.losses:
            helper = loss.build(self)
            if helper is not None:
                self.loss_modules[loss.name] = helper.requires_grad_(False)
        if self.adversary is not None:  # the discriminator's LoRA and head are the only helper weights that train
            for param in self.adversary.discriminator_parameters(self):
                param.requires_grad_(True)
        self._store_frozen_weights()
        if is_model_parallel(self._trainer):  # FSDP2 over the data-parallel ranks: the UNet and what else trains
            mesh = self.device_mesh["data_parallel"]
            shard_unet(unet, mesh)
            for helper in self.loss_modules.values():
                shard_trainable(helper, mesh)

    def _store_frozen_weights(self) -> None:
        """Cast frozen parameters to ``frozen_dtype``; trainable ones (and buffers such as normalisation constants)
        stay float32. The VAE in bf16 is safe (bf16 has fp32's range; fp16 is what overflows in SDXL's decoder)."""
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        auto = torch.bfloat16 if precision == "bf16-mixed" else None
        dtype = {"auto": auto, "float32": None, "bfloat16": torch.bfloat16}[self.frozen_dtype]
        if dtype is None:
            return
        backbone = self.backbone
        frozen = [backbone.unet, backbone.vae, *backbone.text_encoders, self.base_unet, *self.loss_modules.values()]
        for module in frozen:
            for param in module.parameters() if module is not None else ():
                if not param.requires_grad and param.is_floating_point():
                    param.data = param.data.to(dtype)

    def _install_attention_capture(self) -> None:
        """Explicit-softmax processors on the union of the layers the active losses read; SDPA elsewhere."""
        latent_size = self.sampler.resolution // self.backbone.vae_scale_factor
        selections = [loss.needs.attention.layers for loss in self.losses if loss.needs.attention is not None]
        if self.guidance is not None:
            selections.append(self.guidance_selection())
        if not selections:
            return
        layers = {layer.name: layer for sel in selections for layer in select_layers(self.backbone.unet, sel, latent_size)}
        install_capture(self.backbone.unet, list(layers.values()), self.attention_store)

    def guidance_selection(self, latent_size: Optional[int] = None) -> LayerSelection:
        """The layers guidance reads. Default resolution: a quarter of the latent size (16 at 512 px for SD1.5).
        ``latent_size`` is given by the start-up checks, before the VAE is loaded; else it is the loaded VAE's."""
        layers = self.guidance_layers
        if layers.resolutions is None:
            latent = latent_size if latent_size is not None else self.sampler.resolution // self.backbone.vae_scale_factor
            layers = LayerSelection(layers.blocks, (max(latent // 4, 1),))
        return layers

    def train(self, mode: bool = True):
        super().train(mode)
        self.loss_modules.eval()  # frozen judges (captioner, detectors) never train: no dropout, no batch stats
        if self.backbone is not None:
            for frozen in (self.backbone.vae, self.backbone.text_encoders, self.base_unet):
                if frozen is not None:
                    frozen.eval()
        return self


__all__ = ["ModelLoading"]
