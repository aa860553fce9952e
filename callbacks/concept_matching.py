"""CoMat's Concept Matching loss: the captioner's negative log-likelihood of the prompt given the image."""

from __future__ import annotations

from typing import Literal, Optional, Union

import torch

from comat_lightning.errors import InputError
from comat_lightning.files.paths import check_local_path
from comat_lightning.judges.captioner import CaptionScorer, CropPer, FirstToken, Reduction, reduce_caption_nll
from comat_lightning.sampling.seeds import CROP_OFFSET
from comat_lightning.training.losses import GeneratedBatch, LossCallback, LossContext, LossNeeds, check_choice


class ConceptMatchingLoss(LossCallback):
    """Push the online model towards images from which a frozen BLIP captioner reads back the whole prompt.

    Defaults are the official code's (the faithful recipes); ``configs/comat_plus_*.yaml`` set our variants.

    Args:
        captioner: BLIP captioning model, hub id or folder (``BlipForConditionalGeneration`` + its processor).
        weight: loss weight (CoMat: 1.0).
        prefix: caption prefix before the lower-cased prompt; its tokens are context, not scored.
        label_smoothing: 0.1 as the official code (transformers' BLIP of its day smoothed every caption loss);
            0.0 = the plain caption negative log-likelihood.
        first_token: "cls" as transformers' BLIP forward and the official code; "dec" as BLIP ``generate``, which
            starts every caption it writes from [DEC] (the captioner then scores captions the way it writes them).
        reduction: "token_mean" (official: one mean over every caption token of the batch, so long prompts weigh
            more) or "sample_mean" (mean per caption, then over the batch: each prompt weighs the same).
        max_crop: random crop of this many pixels less per side before resizing; "auto" = resolution // 224 as the
            official code (2 at 512 px, 0 below 448 px); 0 disables.
        crop_per: "batch" (official: one random offset for the whole batch) or "image" (one per image: more
            augmentation per step, and an image's crop does not depend on the batch it lands in).
        max_caption_tokens: None (official: captions are never truncated; a caption longer than the captioner's
            position table is refused) or truncate captions to this many tokens.
    """

    needs = LossNeeds(decoded_image=True)

    def __init__(
        self,
        captioner: str = "Salesforce/blip-image-captioning-large",
        weight: float = 1.0,
        prefix: str = "a photography of ",
        label_smoothing: float = 0.1,
        first_token: FirstToken = "cls",
        reduction: Reduction = "token_mean",
        max_crop: Union[int, Literal["auto"]] = "auto",
        crop_per: CropPer = "batch",
        max_caption_tokens: Optional[int] = None,
        name: str = "concept_matching",
    ):
        super().__init__(weight=weight, name=name)
        owner = "ConceptMatchingLoss"
        if not 0.0 <= label_smoothing < 1.0:
            raise InputError(f"{owner}: label_smoothing must be in [0, 1), got {label_smoothing}")
        check_choice(owner, "reduction", reduction, ("token_mean", "sample_mean"))
        check_choice(owner, "first_token", first_token, ("cls", "dec"))
        check_choice(owner, "crop_per", crop_per, ("batch", "image"))
        if max_crop != "auto" and (isinstance(max_crop, bool) or not isinstance(max_crop, int) or max_crop < 0):
            raise InputError(f"{owner}: max_crop must be 'auto' or an integer >= 0, got {max_crop!r}")
        if max_caption_tokens is not None and (isinstance(max_caption_tokens, bool) or not isinstance(max_caption_tokens, int) or max_caption_tokens < 2):
            raise InputError(f"{owner}: max_caption_tokens must be null (no truncation) or an integer >= 2, got {max_caption_tokens!r}")
        check_local_path(f"{owner}.captioner", captioner, "captioner folder")
        self.captioner = captioner
        self.prefix = prefix
        self.label_smoothing = label_smoothing
        self.first_token: Literal["cls", "dec"] = first_token
        self.reduction = reduction
        self.max_crop = max_crop
        self.crop_per = crop_per
        self.max_caption_tokens = max_caption_tokens
        self._reward_norm: Optional[torch.Tensor] = None

    def crop_pixels(self, resolution: int) -> int:
        """How many pixels the random crop removes per side at ``resolution`` (official: resolution // 224)."""
        return resolution // 224 if self.max_crop == "auto" else int(self.max_crop)

    def build(self, context: LossContext) -> CaptionScorer:
        return CaptionScorer(
            self.captioner,
            prefix=self.prefix,
            label_smoothing=self.label_smoothing,
            first_token=self.first_token,
            max_crop=self.crop_pixels(context.sampler.resolution),
            crop_per=self.crop_per,
            max_length=self.max_caption_tokens,
        )

    def compute(self, context: LossContext, generated: GeneratedBatch):
        scorer: CaptionScorer = context.helper(self.name)
        images = generated.images
        if images.requires_grad:
            # A node of our own in front of the captioner: its gradient is the captioner's share only (other losses
            # may read the same images), seen once by the hook during the generator's backward.
            images = images.view_as(images)
            images.register_hook(self._record_reward_norm)
        if self.crop_per == "batch":
            # One offset for the batch, from the step's seed: the same on every rank, so N ranks crop as one process
            # with N x the batch would.
            generator = None if generated.batch_seed is None else torch.Generator().manual_seed(generated.batch_seed + CROP_OFFSET)
        else:
            generator = generated.generators
        per_sample, counts = scorer(images, generated.prompts, generator=generator)
        return reduce_caption_nll(per_sample, counts, self.reduction), {}

    def _record_reward_norm(self, grad: torch.Tensor) -> None:
        # Official CoMat's `reward_norm`: how hard the judge pulls on the pixels. Per-image L2 norm of the gradient of
        # the unweighted caption loss w.r.t. the decoded image, averaged over the batch.
        per_image = torch.linalg.vector_norm(grad.detach().float().flatten(1), dim=1)
        self._reward_norm = per_image.mean() / (self.weight if self.weight > 0 else 1.0)

    def gradient_logs(self) -> dict[str, torch.Tensor]:
        norm, self._reward_norm = self._reward_norm, None
        return {} if norm is None else {"reward_norm": norm}
