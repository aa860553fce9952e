"""Loading a Stable Diffusion 1.x/2.x or SDXL model from a hub id or a local folder, and encoding prompts.

:class:`DiffusionBackbone` is an ``nn.Module`` (so Lightning moves it between devices and precisions) that holds
the UNet, the VAE and one or two text encoders, plus the tokenizers and the scheduler config. It reproduces the
prompt encoding of diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` exactly, which is
what the parity tests against those pipelines check.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from torch import nn

from comat_lightning.errors import InputError, MissingInputFile
from comat_lightning.tiny.zoo import resolve_model_path

ModelFamily = Literal["auto", "sd", "sdxl"]
# A real CLIP tokenizer has 49,408 tokens. Offline, `from_pretrained` of a hub id that is not cached (or of an
# empty folder) silently returns a tokenizer with only the special tokens; anything this small is that case.
_MIN_TOKENIZER_SIZE = 10


@dataclass
class Conditioning:
    """What the UNet is conditioned on for one batch. SD: ``embeds`` only. SDXL: also ``pooled`` and
    ``time_ids`` (passed as ``added_cond_kwargs``)."""

    embeds: torch.Tensor  # (B, 77, D)
    pooled: Optional[torch.Tensor] = None  # (B, P), SDXL
    time_ids: Optional[torch.Tensor] = None  # (B, 6), SDXL

    def added_cond_kwargs(self) -> Optional[dict]:
        if self.pooled is None:
            return None
        return {"text_embeds": self.pooled, "time_ids": self.time_ids}

    def expand(self, batch_size: int) -> "Conditioning":
        """Repeat a batch-1 conditioning (the cached empty prompt) to ``batch_size``."""
        rep = lambda t: None if t is None else t.expand(batch_size, *t.shape[1:])  # noqa: E731
        return Conditioning(rep(self.embeds), rep(self.pooled), rep(self.time_ids))

    def to(self, device) -> "Conditioning":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Conditioning(move(self.embeds), move(self.pooled), move(self.time_ids))

    @staticmethod
    def cat(first: "Conditioning", second: "Conditioning") -> "Conditioning":
        cat = lambda a, b: None if a is None else torch.cat([a, b])  # noqa: E731
        return Conditioning(cat(first.embeds, second.embeds), cat(first.pooled, second.pooled), cat(first.time_ids, second.time_ids))


@dataclass(frozen=True)
class TextKeys:
    """Which keys of the captured attention maps are the prompt's tokens, and whose token positions index them.

    UNet families and SD3 / SD3.5: the (first) CLIP tokenizer; key 0 is its start token and the last of its 77 slots
    end-of-text or padding, so concept maps cover keys 1..75 (Attend-and-Excite's ``[1:-1]``); SD3's T5 keys after
    the 77 CLIP keys are not read. FLUX.1: the T5 tokenizer, whose tokens are all the text keys; T5 has no start
    token, so concept maps cover keys 0..L-2 (the last slot is end-of-text or padding)."""

    tokenizer: Any
    first: int  # first key a concept map's softmax covers
    end: int  # one past the last

    @classmethod
    def for_clip(cls, tokenizer) -> "TextKeys":
        """A CLIP tokenizer's keys: the start token and the last of its ``model_max_length`` slots are not read."""
        return cls(tokenizer, first=1, end=tokenizer.model_max_length - 1)

    def describe(self) -> str:
        return describe_key_range(self.first, self.end)


def describe_key_range(first: int, end: int) -> str:
    """The readable key positions ``first .. end - 1``, as error messages name them."""
    return f"{first}..{end - 1}" + (" (0 is the start token)" if first else "")


def _read_model_index(path: str, revision: Optional[str]) -> dict:
    local = Path(path)
    if local.is_dir():
        index = local / "model_index.json"
        if not index.is_file():
            raise MissingInputFile(
                f"model.pretrained_model: {path} is a folder but has no model_index.json: expected a diffusers pipeline "
                "folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
            )
        try:
            content = json.loads(index.read_bytes())
        except (ValueError, RecursionError) as err:  # not UTF-8, not JSON
            raise InputError(f"model.pretrained_model: {index} is not a JSON file ({err})") from None
        if not isinstance(content, dict):
            raise InputError(f"model.pretrained_model: {index} must hold a JSON object, got {type(content).__name__}")
        return content
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(path, revision=revision)
    except Exception as err:  # hub errors come in many types; the message is what matters
        raise OSError(
            f"could not read the pipeline index of {path!r} (not a local folder; as a hub id: {err}). "
            "Offline (HF_HUB_OFFLINE=1) a hub id works only if it is in the local cache."
        ) from err


def detect_family(path: str, revision: Optional[str] = None) -> Literal["sd", "sdxl"]:
    index = _read_model_index(path, revision)
    if "unet" not in index and "transformer" in index:  # SD3 / SD3.5, FLUX.1, PixArt, ...: MMDiT, flow matching
        raise InputError(
            f"model.pretrained_model: {path} is a {index.get('_class_name', 'pipeline')} with a transformer backbone; "
            "supported so far: the UNet families (StableDiffusionPipeline, StableDiffusionXLPipeline)"
        )
    return "sdxl" if "text_encoder_2" in index or "XL" in index.get("_class_name", "") else "sd"


def load_tokenizer(path: str, subfolder: Optional[str] = "tokenizer", revision: Optional[str] = None):
    """Load a CLIP tokenizer and refuse the empty one that an offline miss returns."""
    from transformers import CLIPTokenizer

    path = resolve_model_path(path)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder=subfolder, revision=revision)
    if len(tokenizer) < _MIN_TOKENIZER_SIZE:
        where = f"{path}/{subfolder}" if subfolder else path
        raise OSError(
            f"the tokenizer loaded from {where} has only {len(tokenizer)} tokens: its vocab.json/merges.txt were not "
            "found (a hub id that is not cached while offline, or a folder without tokenizer files)"
        )
    return tokenizer


class DiffusionBackbone(nn.Module):
    """UNet + VAE + text encoder(s) of one SD or SDXL model; tokenizers and scheduler config ride along."""

    def __init__(self, family, unet, vae, text_encoders, tokenizers, scheduler_config: dict):
        super().__init__()
        self.family: Literal["sd", "sdxl"] = family
        self.unet = unet
        self.vae = vae
        self.text_encoders = nn.ModuleList(text_encoders)
        self.tokenizers = list(tokenizers)
        self.scheduler_config = dict(scheduler_config)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        unet_path: Optional[str] = None,
        vae_path: Optional[str] = None,
        family: ModelFamily = "auto",
        revision: Optional[str] = None,
        variant: Optional[str] = None,
        torch_dtype: Optional[torch.dtype] = None,
    ) -> "DiffusionBackbone":
        """Load from a hub id or a pipeline folder. ``unet_path`` (a UNet folder or hub id, with or without a
        ``unet/`` subfolder) replaces the pipeline's UNet, e.g. the 512-px SDXL UNet of the CoMat paper."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        path = resolve_model_path(path)
        if family == "auto":
            family = detect_family(path, revision)
        kw = dict(revision=revision, torch_dtype=torch_dtype)
        unet = _load_unet(unet_path, revision, torch_dtype) if unet_path else UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=variant, **kw)
        if vae_path:
            vae = AutoencoderKL.from_pretrained(resolve_model_path(vae_path), torch_dtype=torch_dtype)
        else:
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=variant, **kw)
        tokenizers = [load_tokenizer(path, "tokenizer", revision)]
        text_encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=variant, **kw)]
        if family == "sdxl":
            tokenizers.append(load_tokenizer(path, "tokenizer_2", revision))
            text_encoders.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", variant=variant, **kw))
        from diffusers import DDPMScheduler

        scheduler_config = DDPMScheduler.load_config(path, subfolder="scheduler", revision=revision)
        backbone = cls(family, unet, vae, text_encoders, tokenizers, scheduler_config)
        backbone._check_shapes(path, unet_path)
        return backbone

    def _check_shapes(self, path: str, unet_path: Optional[str]) -> None:
        text_dim = sum(
            enc.config.hidden_size for enc in self.text_encoders
        )  # SDXL concatenates both encoders' hidden states
        if self.unet.config.cross_attention_dim != text_dim:
            raise ValueError(
                f"UNet from {unet_path or path} expects text states of width {self.unet.config.cross_attention_dim}, "
                f"but the text encoder(s) of {path} give {text_dim}: the UNet does not belong to this model family"
            )

    # ----------------------------------------------------------------------------------------------- text

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    def latents_for_vae(self, latents: torch.Tensor) -> torch.Tensor:
        """The pipelines' ``latents / scaling_factor`` before ``vae.decode``."""
        return latents / self.vae.config.scaling_factor

    @property
    def max_prompt_tokens(self) -> int:
        return self.tokenizers[0].model_max_length

    @property
    def text_keys(self) -> TextKeys:
        """The cross-attention keys are the first tokenizer's 77 positions (SDXL's second shares its BPE)."""
        return TextKeys.for_clip(self.tokenizers[0])

    def _token_ids(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        return ids.to(self.unet.device)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], resolution: int) -> Conditioning:
        """Frozen text encoding, identical to the diffusers pipelines (no clip-skip, no prompt weighting)."""
        if self.family == "sd":
            encoder = self.text_encoders[0]
            ids = self._token_ids(self.tokenizers[0], prompts)
            mask = None
            if getattr(encoder.config, "use_attention_mask", False):
                mask = (ids != self.tokenizers[0].pad_token_id).long()
            return Conditioning(embeds=encoder(ids, attention_mask=mask)[0].float())
        # SDXL: penultimate hidden states of both encoders, concatenated; pooled projection of the second.
        outputs = [
            encoder(self._token_ids(tokenizer, prompts), output_hidden_states=True)
            for tokenizer, encoder in zip(self.tokenizers, self.text_encoders)
        ]
        states = [out.hidden_states[-2] for out in outputs]
        pooled = outputs[-1].text_embeds  # CLIPTextModelWithProjection's projected pooled output
        # (original size, crop top-left, target size): (512, 512, 0, 0, 512, 512) at 512 px, as in the paper.
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=pooled.device)
        return Conditioning(
            embeds=torch.cat(states, dim=-1).float(),
            pooled=pooled.float(),
            time_ids=time_ids.float().expand(len(prompts), 6),
        )


def _load_unet(unet_path: str, revision: Optional[str], torch_dtype):
    from diffusers import UNet2DConditionModel

    unet_path = resolve_model_path(unet_path)
    local = Path(unet_path)
    subfolder = "unet" if (local / "unet").is_dir() else None
    try:
        return UNet2DConditionModel.from_pretrained(unet_path, subfolder=subfolder, revision=revision, torch_dtype=torch_dtype)
    except (OSError, EnvironmentError):
        if local.is_dir():
            raise
        # A hub id may be a whole pipeline repo: look in its unet/ subfolder.
        return UNet2DConditionModel.from_pretrained(unet_path, subfolder="unet", revision=revision, torch_dtype=torch_dtype)
