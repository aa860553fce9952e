"""Stable Diffusion 3 / 3.5 and FLUX.1 (MMDiT transformers, flow matching): loading, prompt encoding, the scheduler
and one denoiser call, exactly as diffusers' ``StableDiffusion3Pipeline`` and ``FluxPipeline`` do them
(``tests/models/test_mmdit_parity.py`` compares latents).

The latent chain is kept in the VAE's (B, C, h, w) layout for both families: FLUX's 2x2 packing into (B, h*w/4,
4C) tokens happens only around the transformer call. The Euler flow-matching update ``x + (sigma_next - sigma) * v``
is elementwise, so stepping packed or unpacked latents gives the same numbers, and every tool that reads latents
(fidelity preservation's real latents, decoding, monitoring) sees one layout for every family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
from torch import nn

from comat_lightning.errors import InputError
from comat_lightning.models.backbone import TextKeys
from comat_lightning.tiny.zoo import resolve_model_path

MMDiTFamily = Literal["sd3", "flux"]


@dataclass
class FlowConditioning:
    """What an MMDiT is conditioned on for one batch: the text tokens of the joint attention and the pooled vector;
    FLUX also positions the text tokens for RoPE (all zeros, as the pipeline)."""

    embeds: torch.Tensor  # (B, T, D): SD3 = 77 CLIP tokens (L|G, padded to T5's width) then the T5 tokens; FLUX = T5
    pooled: torch.Tensor  # (B, P): SD3 = CLIP-L | CLIP-G projections; FLUX = CLIP-L pooler output

    @property
    def device(self) -> torch.device:
        return self.embeds.device

    def to(self, device) -> "FlowConditioning":
        return FlowConditioning(self.embeds.to(device), self.pooled.to(device))

    def expand(self, batch_size: int) -> "FlowConditioning":
        return FlowConditioning(self.embeds.expand(batch_size, *self.embeds.shape[1:]), self.pooled.expand(batch_size, *self.pooled.shape[1:]))

    @staticmethod
    def cat(first: "FlowConditioning", second: "FlowConditioning") -> "FlowConditioning":
        return FlowConditioning(torch.cat([first.embeds, second.embeds]), torch.cat([first.pooled, second.pooled]))


def detect_mmdit_family(index: dict) -> Optional[MMDiTFamily]:
    """"sd3" / "flux" from a pipeline's model_index.json, None for anything else."""
    name = index.get("_class_name", "")
    if "transformer" not in index:
        return None
    if name.startswith("StableDiffusion3"):
        return "sd3"
    if name.startswith("Flux"):
        return "flux"
    return None


def mmdit_family(path: str, revision: Optional[str] = None) -> Optional[MMDiTFamily]:
    """"sd3" / "flux" for a pipeline folder or hub id of those families, None for any other (or unreadable) one."""
    from comat_lightning.models.backbone import _read_model_index

    try:
        return detect_mmdit_family(_read_model_index(resolve_model_path(path), revision))
    except (OSError, InputError):
        return None  # the UNet path reports what is wrong with it


class MMDiTBackbone(nn.Module):
    """Transformer + VAE + text encoders of one SD3 or FLUX.1 model; tokenizers and scheduler config ride along."""

    def __init__(self, family: MMDiTFamily, transformer, vae, text_encoders, tokenizers, scheduler_config: dict, max_sequence_length: int):
        super().__init__()
        self.family = family
        self.transformer = transformer
        self.vae = vae
        self.text_encoders = nn.ModuleList(text_encoders)
        self.tokenizers = list(tokenizers)
        self.scheduler_config = dict(scheduler_config)
        self.max_sequence_length = max_sequence_length  # T5 tokens (SD3's pipeline default 256, FLUX-dev 512)

    @classmethod
    def from_pretrained(cls, path: str, max_sequence_length: Optional[int] = None, revision: Optional[str] = None,
                        variant: Optional[str] = None, torch_dtype: Optional[torch.dtype] = None) -> "MMDiTBackbone":  # fmt: skip
        from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

        path = resolve_model_path(path)
        family = detect_mmdit_family(DiffusionPipeline.load_config(path, revision=revision))
        if family is None:
            raise InputError(f"model.pretrained_model: {path} is not a StableDiffusion3Pipeline or FluxPipeline")
        kw = dict(revision=revision, variant=variant, torch_dtype=torch_dtype)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
        if family == "sd3":
            from diffusers import SD3Transformer2DModel

            transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", **kw)
            encoders = [CLIPTextModelWithProjection.from_pretrained(path, subfolder=f"text_encoder{s}", **kw) for s in ("", "_2")]
            encoders.append(T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3", **kw))
            tokenizers = [AutoTokenizer.from_pretrained(path, subfolder=f"tokenizer{s}", revision=revision) for s in ("", "_2", "_3")]
            default_length = 256
        else:
            from diffusers import FluxTransformer2DModel

            transformer = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer", **kw)
            encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw), T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", **kw)]
            tokenizers = [AutoTokenizer.from_pretrained(path, subfolder=f"tokenizer{s}", revision=revision) for s in ("", "_2")]
            default_length = 512
        length = max_sequence_length or min(default_length, tokenizers[-1].model_max_length)
        # The T5 prompt is cut at ``length`` tokens (the pipelines' max_sequence_length): words beyond it have no key.
        tokenizers[-1].model_max_length = min(tokenizers[-1].model_max_length, length)
        scheduler_config = FlowMatchEulerDiscreteScheduler.load_config(path, subfolder="scheduler", revision=revision)
        return cls(family, transformer, vae, encoders, tokenizers, scheduler_config, length)

    @property
    def unet(self) -> nn.Module:
        """The denoiser, under the name the module, rollout and capture use for every family."""
        return self.transformer

    # ------------------------------------------------------------------------------------------ geometry

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    def image_tokens(self, latent_size: int) -> int:
        """Image tokens of a square latent of side ``latent_size``: patches (SD3) or 2x2 packs (FLUX)."""
        patch = self.transformer.config.patch_size if self.family == "sd3" else 2
        return (latent_size // patch) ** 2

    # ------------------------------------------------------------------------------------------ text

    @property
    def text_keys(self) -> TextKeys:
        """Which text keys of the joint attention the concept readers use (see ``TextKeys``): SD3's first 77 keys are
        CLIP-L tokens (CLIP-G's share its positions), read as a UNet's; FLUX's keys are its T5 tokens."""
        if self.family == "sd3":
            return TextKeys.for_clip(self.tokenizers[0])
        return TextKeys(self.tokenizers[-1], first=0, end=self.max_sequence_length - 1)

    def _ids(self, tokenizer, prompts: list[str], length: int) -> torch.Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, add_special_tokens=True, return_tensors="pt").input_ids
        return ids.to(self.vae.device)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], resolution: Optional[int] = None) -> FlowConditioning:
        """Frozen text encoding, identical to the pipelines' ``encode_prompt`` (no clip-skip, no prompt weighting);
        ``resolution`` is unused (SDXL's size conditioning has no counterpart here)."""
        t5_tokenizer, t5 = self.tokenizers[-1], self.text_encoders[-1]
        t5_states = t5(self._ids(t5_tokenizer, prompts, self.max_sequence_length))[0]
        if self.family == "flux":
            clip_tokenizer, clip = self.tokenizers[0], self.text_encoders[0]
            pooled = clip(self._ids(clip_tokenizer, prompts, clip_tokenizer.model_max_length), output_hidden_states=False).pooler_output
            return FlowConditioning(embeds=t5_states.float(), pooled=pooled.float())
        states, pooled = [], []
        for tokenizer, encoder in zip(self.tokenizers[:2], self.text_encoders[:2]):
            out = encoder(self._ids(tokenizer, prompts, tokenizer.model_max_length), output_hidden_states=True)
            states.append(out.hidden_states[-2])  # penultimate layer, as the pipeline without clip_skip
            pooled.append(out[0])  # text_embeds: the projected pooled output
        clip_states = torch.cat(states, dim=-1)
        clip_states = nn.functional.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
        return FlowConditioning(embeds=torch.cat([clip_states, t5_states], dim=-2).float(), pooled=torch.cat(pooled, dim=-1).float())

    # ------------------------------------------------------------------------------------------ sampling

    def make_scheduler(self, num_steps: int, latent_size: int, device):
        """A fresh FlowMatchEulerDiscreteScheduler set to ``num_steps`` as the pipeline sets it: SD3 its default
        sigmas (with the config's shift); FLUX ``linspace(1, 1/n, n)`` with the resolution-dependent shift ``mu``."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        if self.family == "sd3" and not self.scheduler_config.get("use_dynamic_shifting"):
            scheduler.set_timesteps(num_steps, device=device)
            return scheduler
        cfg = self.scheduler_config
        seq_len = self.image_tokens(latent_size)
        slope = (cfg.get("max_shift", 1.15) - cfg.get("base_shift", 0.5)) / (cfg.get("max_image_seq_len", 4096) - cfg.get("base_image_seq_len", 256))
        mu = seq_len * slope + cfg.get("base_shift", 0.5) - slope * cfg.get("base_image_seq_len", 256)  # diffusers' calculate_shift
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps) if self.family == "flux" else None
        scheduler.set_timesteps(num_steps, device=device, sigmas=sigmas, mu=mu)
        return scheduler

    @property
    def guidance_distilled(self) -> bool:
        """FLUX.1-dev: the guidance scale is an input of the transformer, and there is no unconditional pass."""
        return self.family == "flux" and bool(self.transformer.config.guidance_embeds)

    def velocity(self, model: nn.Module, latents: torch.Tensor, t: torch.Tensor, cond: FlowConditioning,
                 guidance: Optional[float] = None) -> torch.Tensor:  # fmt: skip
        """The transformer's flow prediction for ``latents`` (B, C, h, w) at scheduler timestep ``t``, in the same
        layout, fp32. ``model`` is the transformer (online or frozen base); ``guidance`` feeds FLUX's guidance
        embedding."""
        batch, channels, height, width = latents.shape
        dtype = next(model.parameters()).dtype
        timestep = t.expand(batch)
        if self.family == "sd3":
            out = model(hidden_states=latents.to(dtype), timestep=timestep, encoder_hidden_states=cond.embeds.to(dtype),
                        pooled_projections=cond.pooled.to(dtype), return_dict=False)[0]  # fmt: skip
            return out.float()
        packed = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
        packed = packed.reshape(batch, (height // 2) * (width // 2), channels * 4)
        image_ids = torch.zeros(height // 2, width // 2, 3, device=latents.device)
        image_ids[..., 1] += torch.arange(height // 2, device=latents.device)[:, None]
        image_ids[..., 2] += torch.arange(width // 2, device=latents.device)[None, :]
        text_ids = torch.zeros(cond.embeds.shape[1], 3, device=latents.device)
        guidance_vector = None
        if self.transformer.config.guidance_embeds:
            guidance_vector = torch.full([batch], float(guidance if guidance is not None else 3.5), device=latents.device)
        out = model(hidden_states=packed.to(dtype), timestep=timestep / 1000, guidance=guidance_vector, pooled_projections=cond.pooled.to(dtype),
                    encoder_hidden_states=cond.embeds.to(dtype), txt_ids=text_ids, img_ids=image_ids.reshape(-1, 3), return_dict=False)[0]  # fmt: skip
        out = out.float().view(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(batch, channels, height, width)

    def latents_for_vae(self, latents: torch.Tensor) -> torch.Tensor:
        """The pipelines' ``latents / scaling_factor + shift_factor`` before ``vae.decode``."""
        return latents / self.vae.config.scaling_factor + self.vae.config.shift_factor


__all__ = ["FlowConditioning", "MMDiTBackbone", "MMDiTFamily", "detect_mmdit_family"]
