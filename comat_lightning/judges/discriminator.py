"""CoMat's latent discriminator: a UNet backbone run at the last timestep with the empty prompt, whose 4-channel
output a Linear(4, 1) head maps to one real/fake logit per latent pixel. On SD3 / FLUX.1 the backbone is the
transformer (its velocity output, 16 channels per latent pixel, FLUX unpacked from its 2x2 packs), the same way.

Default backbone: the generator's own frozen base UNet under a second LoRA adapter ("discriminator"), so no
extra UNet is held; each forward runs with only that adapter active (:func:`using_adapter`), and checkpointed
blocks re-run with it in backward (:func:`checkpoint_keeping_adapters`). Option: a separate backbone (e.g. an
SD1.5 UNet for SDXL, as the official code), with its own empty-prompt embedding and its own LoRA.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from comat_lightning.models.adapters import LoraConfig, using_adapter

DISCRIMINATOR_ADAPTER = "discriminator"


class LatentDiscriminator(nn.Module):
    """Per-pixel logits (B, h, w) for latents (B, C, h, w).

    ``unet`` is not registered as a submodule when it is shared with the generator (its weights then belong to the
    generator's backbone, and the discriminator's LoRA weights live inside it); a separate backbone is registered.
    """

    def __init__(self, unet: nn.Module, empty_prompt, timestep: torch.Tensor, scheduler, shared: bool, flow=None, guidance: float = 1.0):
        """``flow``: the MMDiTBackbone whose transformer ``unet`` is (its ``velocity`` runs it); ``guidance``: FLUX-dev's
        guidance-embedding value for that call (the sampler's)."""
        super().__init__()
        self._flow = [flow] if flow is not None else []  # a list: not a submodule (the backbone belongs to the generator)
        self.guidance = guidance
        if shared:
            self._shared_unet = [unet]  # a list hides it from nn.Module registration (no duplicate state_dict keys)
        else:
            self.backbone = unet
        self.shared = shared
        channels = flow.latent_channels if flow is not None else unet.config.out_channels
        self.head = nn.Linear(channels, 1)
        self.empty_prompt = empty_prompt
        self.register_buffer("timestep", timestep.clone(), persistent=False)
        self.scheduler = scheduler  # only scale_model_input is used (identity for DDPM, sigma scaling for Euler)

    @property
    def unet(self) -> nn.Module:
        return self._shared_unet[0] if self.shared else self.backbone

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.unet.named_parameters() if f".{DISCRIMINATOR_ADAPTER}." in n]

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        unet = self.unet
        cond = self.empty_prompt
        if cond.embeds.device != latents.device:
            cond = self.empty_prompt = cond.to(latents.device)
        cond = cond.expand(latents.shape[0])
        t = self.timestep
        adapter = using_adapter(unet, DISCRIMINATOR_ADAPTER) if DISCRIMINATOR_ADAPTER in getattr(unet, "peft_config", {}) else contextlib.nullcontext()
        with adapter:
            if self._flow:  # (B, C, h, w) velocity, fp32
                features = self._flow[0].velocity(unet, latents, t, cond, guidance=self.guidance)
            else:
                model_input = self.scheduler.scale_model_input(latents, t).to(unet.dtype)
                features = unet(model_input, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=cond.added_cond_kwargs()).sample
        # (B, C, h, w) -> (B, h, w, C) -> head -> (B, h, w); the head runs in fp32 (tiny, and logits feed BCE)
        with torch.autocast(latents.device.type, enabled=False):
            return self.head(features.float().permute(0, 2, 3, 1)).squeeze(-1)


def add_discriminator_lora(unet: nn.Module, lora: LoraConfig) -> None:
    """Add the discriminator's adapter without changing which adapter is active or what requires grad (diffusers'
    ``add_adapter`` activates the new adapter and freezes the others)."""
    from comat_lightning.models.adapters import adapter_state, apply_adapter_state

    previous = adapter_state(unet)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    with warnings.catch_warnings():  # PEFT warns that a second adapter is being added: that is the point here
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        unet.add_adapter(lora.peft_config(), adapter_name=DISCRIMINATOR_ADAPTER)
    apply_adapter_state(unet, previous)
    for name, param in unet.named_parameters():
        param.requires_grad_(name in trainable or f".{DISCRIMINATOR_ADAPTER}." in name)
