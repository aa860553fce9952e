"""Evaluation metrics as torchmetrics ``Metric`` classes, so that they accumulate over batches and reduce under DDP.

Every state is a sum (``dist_reduce_fx="sum"``): a numerator and a count. After a DDP sync the value is the one
a single process would have computed on all the ranks' samples together, whatever the ranks' shares are (it is
never a mean of per-rank means).

- :class:`CaptionNLL`: the Concept Matching judge's caption negative log-likelihood (lower = the prompt is a
  likelier caption of the image);
- :class:`ConceptOverlap`: A-STAR's overlap between the cross-attention maps of different concepts (lower =
  concepts attend to separate regions);
- :class:`PromptCLIPScore`: the CLIP score of images and their prompts, from any local CLIP folder or hub id.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.multimodal import CLIPScore

from comat_lightning.attention.concept_maps import overlap
from comat_lightning.files.images import to_uint8
from comat_lightning.tiny.zoo import resolve_model_path

Reduction = Literal["sample_mean", "token_mean"]


class CaptionNLL(Metric):
    """Mean caption negative log-likelihood over all images seen, from ``CaptionScorer``'s outputs.

    With ``nll_i`` the per-sample NLL (mean over caption i's scored tokens) and ``count_i`` its number of scored
    tokens, over every sample i of every update (and every rank):

    - ``"sample_mean"``: ``sum_i nll_i / N`` (each caption weighs the same);
    - ``"token_mean"``: ``sum_i nll_i * count_i / sum_i count_i`` (each caption token weighs the same), as
      :func:`comat_lightning.judges.captioner.reduce_caption_nll` on one batch.

    ``compute()`` is NaN before any sample (or, for ``"token_mean"``, before any scored token) was seen.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False  # sums only: forward() may update the global state with the batch's state

    total: Tensor
    weight: Tensor

    def __init__(self, reduction: Reduction = "sample_mean", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if reduction not in ("sample_mean", "token_mean"):
            raise ValueError(f"unknown reduction {reduction!r}; expected 'sample_mean' or 'token_mean'")
        self.reduction = reduction
        # Numerator: sum of nll_i (sample_mean) or of nll_i * count_i (token_mean); denominator: N or sum count_i.
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("weight", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, per_sample_nll: Tensor, token_counts: Tensor) -> None:
        """``per_sample_nll`` (B,) and ``token_counts`` (B,), as returned by ``CaptionScorer``."""
        if per_sample_nll.ndim != 1 or token_counts.ndim != 1:
            raise ValueError(
                f"per_sample_nll and token_counts must be 1-D (B,), got shapes {tuple(per_sample_nll.shape)} and {tuple(token_counts.shape)}"
            )
        if per_sample_nll.shape != token_counts.shape:
            raise ValueError(f"per_sample_nll has {per_sample_nll.shape[0]} samples but token_counts has {token_counts.shape[0]}")
        nll = per_sample_nll.detach().float()
        if self.reduction == "sample_mean":
            self.total += nll.sum()
            self.weight += nll.shape[0]
        else:
            counts = token_counts.detach().long()
            self.total += (nll * counts).sum()
            self.weight += counts.sum()

    def compute(self) -> Tensor:
        return self.total / self.weight


class ConceptOverlap(Metric):
    """A-STAR's segregation measure: how much the attention maps of different concepts of a prompt overlap.

    For one image with concept maps ``A[s, m]`` (step s of S, concept m of C >= 2) and P = C (C - 1) / 2 concept
    pairs, its value is ``v = 1 / (S P) * sum_s sum_{m<n} overlap(A[s, m], A[s, n])`` with
    ``overlap(a, b) = sum(min(a, b)) / (sum(a + b) + 1e-8)`` (:func:`comat_lightning.attention.concept_maps.overlap`).
    ``compute()`` is the mean of v over the images counted, in [0, 0.5] for non-negative maps: 0 when the concepts
    attend to disjoint regions, 0.5 when their maps are identical. It is NaN when no image was counted.

    Images with fewer than two concepts have no pair: they are not counted, only tallied in the ``skipped`` state.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    total: Tensor
    counted: Tensor
    skipped: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("counted", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("skipped", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, concept_maps: Sequence[Tensor]) -> None:
        """One tensor per image: (S, C, r, r) maps of S denoising steps, or (C, r, r) for a single step.

        Images may differ in S, C and r, so this takes a list (as ``attention_guidance.concept_maps`` returns),
        not a batched tensor, whose leading dimension would be ambiguous."""
        if isinstance(concept_maps, Tensor):
            raise TypeError("concept_maps must be a sequence of per-image tensors (S, C, r, r) or (C, r, r), not one tensor")
        for i, maps in enumerate(concept_maps):
            if maps.ndim == 3:
                maps = maps.unsqueeze(0)
            if maps.ndim != 4:
                raise ValueError(f"concept maps of image {i} must be (S, C, r, r) or (C, r, r), got shape {tuple(maps.shape)}")
            num_concepts = maps.shape[1]
            if num_concepts < 2:
                self.skipped += 1
                continue
            first, second = torch.triu_indices(num_concepts, num_concepts, offset=1, device=maps.device)
            maps = maps.detach().float()
            pair_overlaps = overlap(maps[:, first], maps[:, second])  # (S, P)
            self.total += pair_overlaps.mean()
            self.counted += 1

    def compute(self) -> Tensor:
        return self.total / self.counted


def load_clip(path: str) -> tuple[Any, Any]:
    """A frozen ``CLIPModel`` in eval mode and its ``CLIPProcessor`` from a hub id, folder or ``tiny://clip``."""
    from transformers import CLIPModel, CLIPProcessor

    path = resolve_model_path(path)
    model = CLIPModel.from_pretrained(path)
    model.requires_grad_(False).eval()
    return model, CLIPProcessor.from_pretrained(path)


def clip_embedding(features: Any) -> Tensor:
    """The projected embedding of ``get_image_features`` / ``get_text_features``."""
    # transformers 5 returns a BaseModelOutputWithPooling from get_image_features / get_text_features, whose
    # pooler_output holds the projected embedding; transformers 4 returned that embedding as a plain tensor.
    return features if isinstance(features, Tensor) else features.pooler_output


class PromptCLIPScore(CLIPScore):
    """CLIP score of images and their prompts with the CLIP model of any local folder, hub id or ``tiny://clip``.

    With ``E_I`` and ``E_T`` the projected CLIP embeddings of image i and prompt i:
    ``compute() = 1 / N * sum_i max(100 * cos(E_I, E_T), 0)`` over every pair of every update (and every rank),
    in [0, 100], higher = images match their prompts better. NaN before any update.

    Differences from ``torchmetrics.multimodal.CLIPScore`` (whose states, ``compute`` and ``plot`` are reused):

    - any CLIP folder or hub id is accepted (``CLIPScore`` only takes a fixed list of names, or a loader callable,
      which this passes);
    - ``update(images, prompts)`` takes float images in [0, 1], as the diffusion pipeline decodes them; they are
      clamped and quantised to uint8 (as a saved PNG would be) before the ``CLIPProcessor``;
    - each pair's score is floored at 0 before averaging (CLIPScore's definition, Hessel et al. 2021);
      torchmetrics floors only the final mean, so one strongly negative pair would lower the others;
    - features are read in a way that works with transformers 5 (``CLIPScore.update`` fails there, see
      :func:`_embedding`); prompts longer than the text encoder's context are truncated by the tokenizer, which
      keeps the end-of-text token CLIP pools from (torchmetrics cuts the token ids, dropping it);
    - the CLIP model is frozen and stays in eval mode; its weights are not part of ``state_dict()`` (they are
      reloaded from ``path``), so checkpoints of a module holding this metric do not carry a copy of CLIP.
    """

    full_state_update = False  # score and n_samples are sums; True would run CLIP twice in every forward()

    def __init__(self, path: str, **kwargs: Any) -> None:
        super().__init__(model_name_or_path=partial(load_clip, path), **kwargs)
        self.path = path
        self.register_state_dict_post_hook(_drop_model_weights)
        self.register_load_state_dict_pre_hook(_keep_model_weights)

    def train(self, mode: bool = True) -> "PromptCLIPScore":
        super().train(mode)
        self.model.eval()  # a frozen judge: dropout stays off whatever Lightning asks of the module tree
        return self

    @torch.no_grad()
    def update(self, images: Tensor, prompts: Sequence[str]) -> None:  # type: ignore[override]
        """``images`` (B, 3, H, W) floats in [0, 1]; ``prompts`` B strings, one per image."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        if isinstance(prompts, str) or len(prompts) != images.shape[0]:
            raise ValueError(f"expected a list of {images.shape[0]} prompts, one per image, got {prompts!r}")
        pixels = to_uint8(images).cpu()
        device = self.model.device
        # Explicit layout: otherwise the processor infers it from the shape, which is ambiguous if a side is 3 pixels.
        image_inputs = self.processor(images=list(pixels), input_data_format="channels_first", return_tensors="pt")
        text_inputs = self.processor(
            text=list(prompts),
            padding=True,
            truncation=True,
            max_length=self.model.config.text_config.max_position_embeddings,
            return_tensors="pt",
        )
        image_embeds = clip_embedding(self.model.get_image_features(pixel_values=image_inputs["pixel_values"].to(device)))
        text_embeds = clip_embedding(
            self.model.get_text_features(input_ids=text_inputs["input_ids"].to(device), attention_mask=text_inputs["attention_mask"].to(device))
        )
        cosine = torch.nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
        self.score += (100 * cosine).clamp(min=0).sum().to(self.score)
        self.n_samples += images.shape[0]


def _drop_model_weights(module: PromptCLIPScore, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "model.")]:
        del state_dict[key]


def _keep_model_weights(module: PromptCLIPScore, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    # Checkpoints have no CLIP weights (see _drop_model_weights): keep the loaded ones, so strict loading works.
    for key, value in module.model.state_dict().items():
        state_dict.setdefault(prefix + "model." + key, value)
