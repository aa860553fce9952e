"""The Concept Matching judge: a frozen BLIP captioner scoring how likely the prompt is as a caption of an image.

``CaptionScorer(images, prompts)`` returns the per-sample negative log-likelihood of
``prefix + prompt.lower()`` given each image, differentiable with respect to the images. Preprocessing is done
with torch ops (random crop, fp32 bicubic antialiased resize, CLIP mean/std), not with the PIL image processor,
so the gradient reaches the diffusion model.

Choices that change the number are explicit options (the official CoMat code's values in brackets):
``label_smoothing`` [0.1; transformers' default is 0.0], ``first_token`` ["cls": BLIP's forward keeps the
tokenizer's [CLS]; "dec" puts the [DEC] token that ``generate`` starts from], ``reduction``
["token_mean": one mean over every caption token in the batch; "sample_mean": mean per caption, then over
the batch, so short prompts are not drowned by long ones], ``max_crop`` and ``crop_per`` [a crop of
``resolution // 224`` pixels less, at one random offset for the whole batch], ``max_length`` [None: captions are
never truncated].
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from comat_lightning.errors import InputError
from comat_lightning.tiny.zoo import resolve_model_path

FirstToken = Literal["cls", "dec"]
Reduction = Literal["sample_mean", "token_mean"]
CropPer = Literal["batch", "image"]
Generators = Union[torch.Generator, Sequence[torch.Generator], None]


class CaptionScorer(nn.Module):
    def __init__(
        self,
        path: str,
        prefix: str = "a photography of ",
        label_smoothing: float = 0.0,
        first_token: FirstToken = "cls",
        max_crop: int = 0,
        crop_per: CropPer = "image",
        max_length: Optional[int] = None,
    ):
        super().__init__()
        from transformers import AutoTokenizer, BlipForConditionalGeneration, BlipImageProcessor

        path = resolve_model_path(path)
        self.model = BlipForConditionalGeneration.from_pretrained(path)
        self.model.requires_grad_(False).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        processor = BlipImageProcessor.from_pretrained(path)
        size = processor.size
        self.image_size = (size["height"], size["width"])
        self.register_buffer("mean", torch.tensor(processor.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(processor.image_std).view(1, 3, 1, 1), persistent=False)
        self.prefix = prefix
        # [CLS] + the prefix's word pieces; these positions are context, not scored.
        self.prefix_length = len(self.tokenizer(prefix.strip(), add_special_tokens=False).input_ids) + 1
        self.label_smoothing = label_smoothing
        self.first_token = first_token
        self.max_crop = max_crop
        self.crop_per = crop_per
        # Captions longer than the decoder's position table cannot be scored at all; None truncates nowhere else.
        self.position_limit = self.model.config.text_config.max_position_embeddings
        self.max_length = self.position_limit if max_length is None else min(max_length, self.position_limit)
        self.truncate = max_length is not None

    def train(self, mode: bool = True):  # the judge is frozen: dropout stays off whatever Lightning asks
        return super().train(False)

    # ------------------------------------------------------------------------------------------ inputs

    def preprocess(self, images: torch.Tensor, generator: Generators = None, crop: bool = True) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] (not clamped) -> (B, 3, S, S) BLIP pixel values, differentiably.

        The random crop keeps ``H - max_crop`` x ``W - max_crop`` pixels at an offset in ``[0, max_crop]`` per axis:
        ``crop_per="batch"`` draws one (top, left) for the whole batch from ``generator`` (a single generator, as the
        official code); ``"image"`` draws one per image, from ``generator[i]`` when a list is given (then an
        image's crop does not depend on its batch). ``crop=False`` skips the crop (evaluation scores the whole
        image, deterministically)."""
        if crop and self.max_crop > 0:
            if self.crop_per == "batch":
                if isinstance(generator, (list, tuple)):
                    raise ValueError("CaptionScorer(crop_per='batch') draws one offset: pass one generator, not a list")
                offsets = [torch.randint(0, self.max_crop + 1, (2,), generator=generator).tolist()] * images.shape[0]
            elif isinstance(generator, (list, tuple)):
                offsets = [torch.randint(0, self.max_crop + 1, (2,), generator=g).tolist() for g in generator]
            else:
                offsets = torch.randint(0, self.max_crop + 1, (images.shape[0], 2), generator=generator).tolist()
            h, w = images.shape[-2] - self.max_crop, images.shape[-1] - self.max_crop
            images = torch.stack([img[:, top : top + h, left : left + w] for img, (top, left) in zip(images, offsets)])
        # Bicubic has no bf16 CPU kernel, and resizing is cheap: always fp32.
        with torch.autocast(images.device.type, enabled=False):
            resized = F.interpolate(images.float(), size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
            return (resized - self.mean) / self.std

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Caption token ids, attention mask and labels (-100 on the prefix and on padding)."""
        texts = [self.prefix + p.lower() for p in prompts]
        if not self.truncate:
            lengths = [len(ids) for ids in self.tokenizer(texts).input_ids]
            too_long = [(n, p) for n, p in zip(lengths, prompts) if n > self.position_limit]
            if too_long:
                n, prompt = too_long[0]
                raise InputError(
                    f"the caption of prompt {prompt[:80]!r}... is {n} tokens, more than the captioner's {self.position_limit} "
                    f"positions; shorten the prompt (or truncate: ConceptMatchingLoss max_caption_tokens: {self.position_limit})"
                )
        enc = self.tokenizer(texts, padding="longest", truncation=self.truncate, max_length=self.max_length, return_tensors="pt")
        input_ids, attention_mask = enc.input_ids, enc.attention_mask
        if self.first_token == "dec":
            input_ids = input_ids.clone()
            input_ids[:, 0] = self.model.config.text_config.bos_token_id
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, : self.prefix_length] = -100
        device = self.mean.device
        return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), "labels": labels.to(device)}

    # ------------------------------------------------------------------------------------------ scoring

    def token_losses(self, pixel_values: torch.Tensor, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token cross-entropy (B, T-1) of next-token prediction, and the mask of scored tokens (B, T-1).
        Computed from the logits because transformers' BLIP returns only one batch-mean scalar."""
        logits = self.model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask).logits
        shifted_logits, shifted_labels = logits[:, :-1].float(), labels[:, 1:]
        losses = F.cross_entropy(
            shifted_logits.transpose(1, 2), shifted_labels, ignore_index=-100, reduction="none", label_smoothing=self.label_smoothing
        )
        return losses, shifted_labels != -100

    def forward(
        self, images: torch.Tensor, prompts: list[str], generator: Generators = None, crop: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(per_sample_nll (B,), token_counts (B,))``; reduce with :func:`reduce_caption_nll`."""
        text = self.tokenize(prompts)
        losses, scored = self.token_losses(self.preprocess(images, generator, crop=crop), **text)
        counts = scored.sum(dim=1)
        return losses.sum(dim=1) / counts.clamp(min=1), counts


def reduce_caption_nll(per_sample: torch.Tensor, counts: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "sample_mean":
        return per_sample.mean()
    if reduction == "token_mean":  # the official code: every caption token in the (data-parallel) batch weighs the same
        from comat_lightning.runtime.data_parallel import data_parallel_mean

        return data_parallel_mean((per_sample * counts).sum(), counts.sum())
    raise ValueError(f"unknown reduction {reduction!r}; expected 'sample_mean' or 'token_mean'")
