"""GenEval's judges through ``transformers``: COCO instance segmentation (Mask2Former) and zero-shot colour (CLIP).

The official evaluator (djghosh13/geneval ``evaluation/evaluate_images.py``) runs mmdet 2.x's Mask2Former Swin-S
and open_clip's ViT-L/14 "openai"; here ``facebook/mask2former-swin-small-coco-instance`` and
``openai/clip-vit-large-patch14`` stand in (docs/evaluation.md). Detections come back as
:class:`comat_lightning.evaluation.geneval.Detection` with GenEval's class names (the detector's class index -> its
``OBJECT_NAMES`` entry, the same COCO order), box = the bounding box of the binary mask, score = class
probability x mean mask probability inside the mask (transformers' instance post-processing, as mmdet's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from comat_lightning.errors import InputError
from comat_lightning.evaluation.geneval import BACKGROUND_GREY, OBJECT_NAMES, Detection, colour_prompts
from comat_lightning.judges.metrics import clip_embedding

DEFAULT_SEGMENTER = "facebook/mask2former-swin-small-coco-instance"
DEFAULT_COLOUR_CLIP = "openai/clip-vit-large-patch14"


class InstanceSegmenter:
    """Instances of one image, every score above ``threshold`` (GenEval filters further by tag)."""

    def __init__(self, path: str = DEFAULT_SEGMENTER, device: str = "cpu", threshold: float = 0.3):
        from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

        from comat_lightning.tiny.zoo import resolve_model_path

        folder = resolve_model_path(path)
        self.processor = Mask2FormerImageProcessor.from_pretrained(folder)
        self.model = Mask2FormerForUniversalSegmentation.from_pretrained(folder).to(device).eval().requires_grad_(False)
        self.device, self.threshold = device, threshold
        labels = self.model.config.id2label
        # COCO instance checkpoints list the 80 classes in GenEval's order under COCO's own names ("mouse", "remote")
        self.names = list(OBJECT_NAMES) if len(labels) == len(OBJECT_NAMES) else [labels[i] for i in range(len(labels))]

    @torch.no_grad()
    def detect(self, image) -> list[Detection]:
        array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
        inputs = self.processor(images=[array], return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        result = self.processor.post_process_instance_segmentation(
            outputs, threshold=self.threshold, target_sizes=[array.shape[:2]], return_binary_maps=True
        )[0]
        found = []
        for k, info in enumerate(result["segments_info"]):
            mask = result["segmentation"][k].bool().cpu().numpy()
            if not mask.any():
                continue
            ys, xs = np.nonzero(mask)
            box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
            found.append(Detection(self.names[info["label_id"]], float(info["score"]), box, mask))
        return found


class ColourClassifier:
    """GenEval's colour of an object: the image pasted over grey #999 through the object's mask, cropped to its box,
    classified zero-shot by CLIP among 10 colours (per class: three templates per colour, normalised, averaged and
    renormalised; the highest 100 x cosine wins)."""

    def __init__(self, path: str = DEFAULT_COLOUR_CLIP, device: str = "cpu"):
        from comat_lightning.judges.metrics import load_clip

        self.model, self.processor = load_clip(path)
        self.model.to(device)
        self.device = device
        self._weights: dict[str, tuple[list[str], torch.Tensor]] = {}

    @torch.no_grad()
    def _classifier(self, classname: str) -> tuple[list[str], torch.Tensor]:
        if classname not in self._weights:
            texts = colour_prompts(classname)
            columns = []
            for prompts in texts.values():
                tokens = self.processor.tokenizer(prompts, padding=True, return_tensors="pt").to(self.device)
                features = clip_embedding(self.model.get_text_features(**tokens))
                mean = torch.nn.functional.normalize(features, dim=-1).mean(0)
                columns.append(torch.nn.functional.normalize(mean, dim=0))
            self._weights[classname] = (list(texts), torch.stack(columns, dim=1))  # (D, colours)
        return self._weights[classname]

    @torch.no_grad()
    def colour(self, image, detection: Detection) -> str:
        array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
        if detection.mask is not None:
            composite = np.empty_like(array)
            composite[:] = BACKGROUND_GREY
            composite[detection.mask] = array[detection.mask]
        else:
            composite = array
        x0, y0, x1, y1 = (int(round(v)) for v in detection.box)
        crop = composite[y0:y1, x0:x1]
        pixels = self.processor.image_processor([crop], return_tensors="pt").pixel_values.to(self.device)
        features = torch.nn.functional.normalize(clip_embedding(self.model.get_image_features(pixel_values=pixels)), dim=-1)
        names, weights = self._classifier(detection.cls)
        return names[int((100 * features @ weights).argmax())]


def judge_images(prompts: Sequence, images: Sequence, segmenter: InstanceSegmenter, colours: Optional[ColourClassifier]) -> list[dict]:
    """GenEval's verdict for each (metadata prompt, image): correct, why not, and what was detected."""
    from comat_lightning.evaluation.geneval import judge

    results = []
    for prompt, image in zip(prompts, images):
        detections = segmenter.detect(image)
        correct, reason = judge(prompt, detections, lambda d, image=image: colours.colour(image, d))
        found = sorted({d.cls for d in detections})
        results.append({"correct": correct, "reason": reason, "tag": prompt.tag, "classes_found": found})
    return results


class GenEvalJudge:
    """GenEval: Mask2Former instances and CLIP colours judged by the prompt's metadata (matched by prompt text)."""

    def __init__(self, metadata: Path, segmenter: str, colour_clip: str, device: str):
        from comat_lightning.evaluation.geneval import read_metadata

        self.prompts = {p.prompt: p for p in read_metadata(metadata)}
        self.segmenter = InstanceSegmenter(segmenter, device)
        self.colours = ColourClassifier(colour_clip, device)
        self.settings = {"segmenter": segmenter, "colour_clip": colour_clip, "metadata": str(metadata)}

    def score(self, images: list, prompts: list[str]) -> list[dict]:
        unknown = [p for p in prompts if p not in self.prompts]
        if unknown:
            raise InputError(f"{self.settings['metadata']}: no metadata for the generated prompt {unknown[0]!r}")
        results = judge_images([self.prompts[p] for p in prompts], images, self.segmenter, self.colours)
        return [{**r, "score": float(r["correct"])} for r in results]
