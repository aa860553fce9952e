"""CoMat's Concept Matching loss: the captioner's negative log-likelihood of the prompt given the image."""

from __future__ import annotations

from typing import Literal, Optional

import torch

from callbacks.loss_base import GeneratedBatch, LossCallback, LossNeeds
from comat_lightning.captioner import CaptionScorer, FirstToken, Reduction, reduce_caption_nll
from comat_lightning.errors import InputError
from comat_lightning.input_checks import check_local_path


class ConceptMatchingLoss(LossCallback):
    """Push the online model towards images from which a frozen BLIP captioner reads back the whole prompt.

    Args:
        captioner: BLIP captioning model, hub id or folder (``BlipForConditionalGeneration`` + its processor).
        weight: loss weight (CoMat: 1.0).
        prefix: caption prefix before the lower-cased prompt; its tokens are context, not scored.
        label_smoothing: 0.0 = plain NLL (transformers' default); the official code ran with 0.1.
        first_token: "cls" as transformers' BLIP forward and the official code; "dec" as BLIP ``generate``.
        reduction: "sample_mean" (each caption weighs the same) or "token_mean" (official: each token).
        max_crop: random crop of up to this many pixels before resizing (official: 2; 0 disables).
    """

    needs = LossNeeds(decoded_image=True)

    def __init__(
        self,
        captioner: str = "Salesforce/blip-image-captioning-large",
        weight: float = 1.0,
        prefix: str = "a photography of ",
        label_smoothing: float = 0.0,
        first_token: FirstToken = "cls",
        reduction: Reduction = "sample_mean",
        max_crop: int = 2,
        name: str = "concept_matching",
    ):
        super().__init__(weight=weight, name=name)
        if not 0.0 <= label_smoothing < 1.0:
            raise InputError(f"ConceptMatchingLoss: label_smoothing must be in [0, 1), got {label_smoothing}")
        if reduction not in ("sample_mean", "token_mean"):
            raise InputError(f"ConceptMatchingLoss: reduction must be 'sample_mean' or 'token_mean', got {reduction!r}")
        if first_token not in ("cls", "dec"):
            raise InputError(f"ConceptMatchingLoss: first_token must be 'cls' or 'dec', got {first_token!r}")
        if max_crop < 0:
            raise InputError(f"ConceptMatchingLoss: max_crop must be >= 0, got {max_crop}")
        check_local_path("ConceptMatchingLoss.captioner", captioner, "captioner folder")
        self.captioner = captioner
        self.prefix = prefix
        self.label_smoothing = label_smoothing
        self.first_token: Literal["cls", "dec"] = first_token
        self.reduction = reduction
        self.max_crop = max_crop
        self._reward_norm: Optional[torch.Tensor] = None

    def build(self, pl_module) -> CaptionScorer:
        return CaptionScorer(
            self.captioner,
            prefix=self.prefix,
            label_smoothing=self.label_smoothing,
            first_token=self.first_token,
            max_crop=self.max_crop,
        )

    def compute(self, pl_module, generated: GeneratedBatch):
        scorer: CaptionScorer = pl_module.loss_modules[self.name]
        images = generated.images
        if images.requires_grad:
            # A node of our own in front of the captioner: its gradient is the captioner's share only (other losses
            # may read the same images), seen once by the hook during the generator's backward.
            images = images.view_as(images)
            images.register_hook(self._record_reward_norm)
        per_sample, counts = scorer(images, generated.prompts, generator=generated.generators)
        return reduce_caption_nll(per_sample, counts, self.reduction), {}

    def _record_reward_norm(self, grad: torch.Tensor) -> None:
        # Official CoMat's `reward_norm`: how hard the judge pulls on the pixels. Per-image L2 norm of the gradient of
        # the unweighted caption loss w.r.t. the decoded image, averaged over the batch.
        per_image = torch.linalg.vector_norm(grad.detach().float().flatten(1), dim=1)
        self._reward_norm = per_image.mean() / (self.weight if self.weight > 0 else 1.0)

    def gradient_logs(self) -> dict[str, torch.Tensor]:
        norm, self._reward_norm = self._reward_norm, None
        return {} if norm is None else {"reward_norm": norm}
