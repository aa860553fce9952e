"""Open-vocabulary masks of generated images: GroundingDINO finds each entity's box, SAM turns it into a mask.

CoMat's Attribute Concentration loss needs, for each noun of the prompt, where that noun is in the image the
online model just generated. Per batch this runs one GroundingDINO forward (all images, each with its own
"cat. teddy bear." text), keeps for each phrase the best box whose predicted label is exactly that phrase, then
runs one SAM forward prompted with all kept boxes of the batch. Both models come from transformers and are
loaded with ``from_pretrained`` (a hub id, a folder, or ``tiny://grounding-dino`` / ``tiny://sam``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from comat_lightning.errors import InputError
from comat_lightning.files.paths import check_local_path
from comat_lightning.judges.masks import MaskProvider, Masks
from comat_lightning.tiny.zoo import resolve_model_path

# GroundingDINO's modeling code splits the text into phrases at these BERT-uncased ids ([CLS], [SEP], ".", "?");
# a tokenizer with another layout would silently merge all phrases into one.
_DELIMITER_IDS = {"[CLS]": 101, "[SEP]": 102, ".": 1012, "?": 1029}


@dataclass
class Detection:
    """One kept GroundingDINO box: (x0, y0, x1, y1) in image pixels, its score and its predicted label."""

    box: torch.Tensor
    score: float
    label: str


def normalize_phrase(text: str) -> str:
    """Lower-case, strip and collapse inner whitespace: how phrases and predicted labels are compared."""
    return " ".join(text.lower().split())


def match_boxes(
    phrases: Sequence[str], scores: Union[torch.Tensor, Sequence[float]], labels: Sequence[str]
) -> list[Optional[int]]:
    """For each phrase, the index of the highest-scoring detection whose label equals the phrase exactly (after
    :func:`normalize_phrase`), or None. A label naming several phrases ("cat dog") matches none of them: its box
    may cover both objects. Ties keep the first detection."""
    scores = [float(s) for s in scores]
    if len(scores) != len(labels):
        raise ValueError(f"match_boxes: {len(scores)} scores for {len(labels)} labels")
    best: dict[str, int] = {}
    for index, (score, label) in enumerate(zip(scores, labels)):
        key = normalize_phrase(label)
        if key not in best or score > scores[best[key]]:
            best[key] = index
    return [best.get(normalize_phrase(phrase)) if normalize_phrase(phrase) else None for phrase in phrases]


def detection_text(phrases: Sequence[str]) -> str:
    """GroundingDINO's prompt format: unique phrases, each followed by a period, e.g. "cat. teddy bear."."""
    unique = dict.fromkeys(p for p in (normalize_phrase(p) for p in phrases) if p)
    return " ".join(f"{phrase}." for phrase in unique)


def to_pil_images(images: torch.Tensor) -> list:
    """(B, 3, H, W) float images, nominally [0, 1] -> B RGB PIL images (clamped, rounded to 8 bits)."""
    from PIL import Image

    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    from comat_lightning.files.images import to_uint8

    pixels = to_uint8(images)
    return [Image.fromarray(array) for array in pixels.permute(0, 2, 3, 1).cpu().numpy()]


def box_mask(box: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(height, width) bool mask of the pixels whose centres lie inside the (x0, y0, x1, y1) box."""
    ys = torch.arange(height, device=box.device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=box.device, dtype=torch.float32) + 0.5
    x0, y0, x1, y1 = box.float().tolist()
    return ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]


class GroundedSAMMasks(MaskProvider):
    """GroundingDINO boxes -> SAM masks, one per entity phrase, at the generated image's resolution.

    ``box_threshold``: a box is kept when its best token probability exceeds it; ``text_threshold``: the tokens
    whose probability exceeds it form the box's predicted label (both as in GroundingDINO's post-processing). A
    phrase gets the highest-scoring box labelled exactly with it, or None. SAM's mask is binarised at logit 0;
    when it comes out empty, the box itself is the mask (an empty mask would push the entity's attention to zero).
    """

    def __init__(
        self,
        detector: str = "IDEA-Research/grounding-dino-tiny",
        segmenter: Optional[str] = "facebook/sam-vit-base",
        box_threshold: float = 0.3,
        text_threshold: float = 0.25,
    ) -> None:
        super().__init__()
        for option, value in (("box_threshold", box_threshold), ("text_threshold", text_threshold)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise InputError(f"GroundedSAMMasks: {option} must be a number in [0, 1], got {value!r}")
        check_local_path("GroundedSAMMasks.detector", detector, "detector folder")
        if segmenter is not None:  # None: detection only (e.g. the spatial evaluation's detector)
            check_local_path("GroundedSAMMasks.segmenter", segmenter, "segmenter folder")
        self.detector_id, self.segmenter_id = detector, segmenter
        self.box_threshold, self.text_threshold = float(box_threshold), float(text_threshold)

        self.detector = self.segmenter = None  # loaded by load(): a config can name them without loading them
        self.detector_processor = self.segmenter_processor = None

    def load(self) -> "GroundedSAMMasks":
        if self.detector is not None:
            return self
        from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor, SamModel, SamProcessor

        detector_processor = _load("detector", self.detector_id, GroundingDinoProcessor)
        tokenizer = detector_processor.tokenizer
        found = dict(zip(_DELIMITER_IDS, tokenizer.convert_tokens_to_ids(list(_DELIMITER_IDS))))
        if found != _DELIMITER_IDS:
            raise ValueError(
                f"GroundedSAMMasks: the tokenizer of detector {self.detector_id!r} gives delimiter ids {found}; "
                f"GroundingDINO's modeling code expects BERT-uncased's {_DELIMITER_IDS} "
                "(is it a GroundingDINO checkpoint?)"
            )
        self.detector_processor = detector_processor
        self.detector = _load("detector", self.detector_id, GroundingDinoForObjectDetection).to(self.device)
        if self.segmenter_id is not None:
            self.segmenter_processor = _load("segmenter", self.segmenter_id, SamProcessor)
            self.segmenter = _load("segmenter", self.segmenter_id, SamModel).to(self.device)
        self.requires_grad_(False)
        self.train(False)
        return self

    def extra_repr(self) -> str:
        return (
            f"detector={self.detector_id!r}, segmenter={self.segmenter_id!r}, "
            f"box_threshold={self.box_threshold}, text_threshold={self.text_threshold}"
        )

    def canonical_phrase(self, phrase: str) -> str:
        """The phrase as the detector's tokenizer decodes it: what a predicted label equal to it looks like
        (e.g. BERT decodes "t-shirt" as "t - shirt")."""
        tokenizer = self.detector_processor.tokenizer
        ids = tokenizer(normalize_phrase(phrase), add_special_tokens=False)["input_ids"]
        return normalize_phrase(tokenizer.decode(ids))

    @torch.no_grad()
    def detect(self, images: torch.Tensor, phrases: list[list[str]]) -> list[list[Optional[Detection]]]:
        """One GroundingDINO forward for the whole batch -> per sample, per phrase, the kept box or None."""
        self.load()
        if images.shape[0] != len(phrases):
            raise ValueError(f"GroundedSAMMasks: {images.shape[0]} images but {len(phrases)} phrase lists")
        detections: list[list[Optional[Detection]]] = [[None] * len(p) for p in phrases]
        active = [b for b, p in enumerate(phrases) if detection_text(p)]  # samples with something to look for
        if not active:
            return detections
        height, width = images.shape[-2:]
        inputs = self.detector_processor(
            images=to_pil_images(images[active]),
            text=[detection_text(phrases[b]) for b in active],
            padding="longest",  # texts differ in length; padding tokens are masked out of every attention
            return_tensors="pt",
        )
        inputs = _to(inputs, self.detector)
        outputs = self.detector(**inputs)
        results = self.detector_processor.post_process_grounded_object_detection(
            outputs,
            input_ids=inputs["input_ids"],
            threshold=self.box_threshold,
            text_threshold=self.text_threshold,
            target_sizes=[(height, width)] * len(active),
        )
        for b, result in zip(active, results):
            if len(result["scores"]) == 0:
                continue  # nothing kept; transformers then still returns text_labels == [""] (batch_decode of [])
            canonical = [self.canonical_phrase(p) for p in phrases[b]]
            for i, index in enumerate(match_boxes(canonical, result["scores"], result["text_labels"])):
                if index is not None:
                    detections[b][i] = Detection(
                        box=result["boxes"][index].float().to(images.device),
                        score=float(result["scores"][index]),
                        label=result["text_labels"][index],
                    )
        return detections

    @torch.no_grad()
    def segment(self, images: torch.Tensor, detections: list[list[Optional[Detection]]]) -> Masks:
        """One SAM forward prompted with every kept box of the batch -> (H, W) float32 {0, 1} masks."""
        if self.segmenter_id is None:
            raise ValueError("GroundedSAMMasks(segmenter=None) only detects; name a SAM checkpoint to segment")
        self.load()
        height, width = images.shape[-2:]
        masks: Masks = [[None] * len(d) for d in detections]
        active = [b for b, d in enumerate(detections) if any(x is not None for x in d)]
        if not active:
            return masks
        # SAM takes a rectangular (images, boxes per image, 4) prompt: pad each image's box list by repeating its
        # first box. The mask decoder treats boxes independently, so padding does not change the real boxes' masks.
        boxes = [[d.box.tolist() for d in detections[b] if d is not None] for b in active]
        most = max(len(b) for b in boxes)
        padded = [b + [b[0]] * (most - len(b)) for b in boxes]
        inputs = self.segmenter_processor(images=to_pil_images(images[active]), input_boxes=padded, return_tensors="pt")
        inputs = _to(inputs, self.segmenter)
        outputs = self.segmenter(
            pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"], multimask_output=False
        )
        # pred_masks: (images, boxes, 1, h, w) low-resolution logits -> per image (boxes, 1, H, W) bool
        binary = self.segmenter_processor.post_process_masks(
            outputs.pred_masks.float(), inputs["original_sizes"], inputs["reshaped_input_sizes"], mask_threshold=0.0
        )
        for row, b in enumerate(active):
            kept = [i for i, d in enumerate(detections[b]) if d is not None]
            for slot, i in enumerate(kept):
                mask = binary[row][slot, 0].to(images.device)
                if not mask.any():
                    mask = box_mask(detections[b][i].box, height, width)
                masks[b][i] = mask.float() if mask.any() else None
        return masks

    @torch.no_grad()
    def forward(self, images: Optional[torch.Tensor], phrases: list[list[str]], records: list[dict]) -> Masks:
        if images is None:
            raise ValueError("GroundedSAMMasks needs the generated images (got images=None)")
        return self.segment(images, self.detect(images, phrases))


def _load(option: str, name: str, cls):
    """``cls.from_pretrained`` of a hub id, folder or tiny:// id, with an error naming the option on failure."""
    path = resolve_model_path(name)
    try:
        return cls.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise OSError(f"GroundedSAMMasks: cannot load {option} {name!r} as {cls.__name__}: {error}") from error


def _to(inputs, model) -> dict:
    """Processor outputs onto the model's device; floating tensors (pixel values, SAM's float64 boxes) in the
    model's dtype."""
    moved = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(model.device, dtype=model.dtype if value.is_floating_point() else None)
        moved[key] = value
    return moved
