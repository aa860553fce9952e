"""T2I-CompBench's judges: the models behind each category's score (comat_lightning/evaluation/t2i_compbench.py
holds the rules). Each has ``score(images, prompts) -> [dict with "score", ...]`` and ``settings`` (what it ran with)."""

from __future__ import annotations

from pathlib import Path

from comat_lightning.errors import InputError


class AttributeBindingJudge:
    """T2I-CompBench's attribute binding: BLIP-VQA P(yes) of each noun chunk, multiplied."""

    def __init__(self, vqa_model: str, device: str, spacy_model: str):
        from comat_lightning.judges.vqa import BlipVqa
        from comat_lightning.text.entities import EntityParser

        self.vqa = BlipVqa(vqa_model, device=device)
        self.nlp = EntityParser(spacy_model).nlp
        self.settings = {"vqa_model": vqa_model, "enc_token": self.vqa.uses_enc_token, "image_size": self.vqa.image_size, "spacy_model": spacy_model}

    def score(self, images: list, prompts: list[str]) -> list[dict]:
        from comat_lightning.evaluation.t2i_compbench import attribute_binding_score, noun_chunk_questions

        questions = [noun_chunk_questions(p, self.nlp) for p in prompts]
        flat = [(i, q) for i, qs in enumerate(questions) for q in qs]
        yes = self.vqa.yes_probabilities([images[i] for i, _ in flat], [q for _, q in flat]).tolist() if flat else []
        per_image: list[list[float]] = [[] for _ in prompts]
        for (i, _), p in zip(flat, yes):
            per_image[i].append(round(p, 4))
        return [{"score": attribute_binding_score(y), "questions": q, "yes": y} for q, y in zip(questions, per_image)]


class ClipSimilarityJudge:
    """T2I-CompBench's non-spatial score: the cosine of CLIP image and prompt embeddings (no x100, x2.5 or floor)."""

    def __init__(self, clip_model: str, device: str):
        from comat_lightning.judges.metrics import load_clip

        self.model, self.processor = load_clip(clip_model)
        self.model.to(device)
        self.device = device
        self.settings = {"clip_model": clip_model}

    def score(self, images: list, prompts: list[str]) -> list[dict]:
        import torch

        from comat_lightning.judges.metrics import clip_embedding

        with torch.no_grad():
            pixels = self.processor.image_processor(images, return_tensors="pt").pixel_values.to(self.device)
            text = self.processor.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(self.device)
            image_features = clip_embedding(self.model.get_image_features(pixel_values=pixels))
            text_features = clip_embedding(self.model.get_text_features(**text))
            cosine = torch.nn.functional.cosine_similarity(image_features, text_features, dim=-1)
        return [{"score": float(c)} for c in cosine]


class SpatialJudge:
    """T2I-CompBench's spatial score with GroundingDINO in place of UniDet (no transformers port of it exists):
    the prompt's first and last nouns are detected, the best box of each above ``box_threshold`` is kept, and the
    official position and combination rules score the image."""

    def __init__(self, detector: str, device: str, spacy_model: str, box_threshold: float = 0.35, complex_prompts: bool = False):
        from comat_lightning.judges.grounded_sam import GroundedSAMMasks
        from comat_lightning.text.entities import EntityParser

        self.detector = GroundedSAMMasks(detector=detector, segmenter=None, box_threshold=box_threshold).to(device).load()
        self.nlp = EntityParser(spacy_model).nlp
        self.box_threshold, self.device, self.complex_prompts = box_threshold, device, complex_prompts
        self.settings = {"detector": detector, "box_threshold": box_threshold, "spacy_model": spacy_model}

    def score(self, images: list, prompts: list[str]) -> list[dict]:
        import numpy as np
        import torch

        from comat_lightning.evaluation.t2i_compbench import Box, complex_spatial_objects, spatial_objects, spatial_score

        objects = complex_spatial_objects if self.complex_prompts else spatial_objects
        results = []
        for image, prompt in zip(images, prompts):  # one image at a time: images may differ in size
            names = [n for n in objects(prompt, self.nlp) if n is not None]
            pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None].to(self.device)
            found = self.detector.detect(pixels, [names])[0] if names else []
            detections = [(name, Box(*d.box.tolist(), d.score)) for name, d in zip(names, found) if d is not None]
            score = spatial_score(prompt, self.nlp, detections, image_size=max(image.size), threshold=self.box_threshold,
                                  complex_prompt=self.complex_prompts)  # fmt: skip
            results.append({"score": score, "objects": names, "boxes": [[*b.centre(), b.score] for _, b in detections]})
        return results


class ComplexJudge:
    """T2I-CompBench's complex score (3-in-1): per image, the mean of the attribute score and the spatial score
    (prompts of the spatial list), the action score (prompts of the action list: CLIP on the prompt without its
    adjectives), or both (prompts of neither list)."""

    def __init__(self, attribute: AttributeBindingJudge, spatial: SpatialJudge, action: ClipSimilarityJudge,
                 spatial_prompts: Path, action_prompts: Path):  # fmt: skip
        self.attribute, self.spatial, self.action = attribute, spatial, action
        self.spatial_set, self.action_set = complex_prompt_set(spatial_prompts), complex_prompt_set(action_prompts)
        self.settings = {**attribute.settings, **spatial.settings, **action.settings,
                         "spatial_prompts": str(spatial_prompts), "action_prompts": str(action_prompts)}  # fmt: skip

    def score(self, images: list, prompts: list[str]) -> list[dict]:
        from comat_lightning.evaluation.t2i_compbench import complex_score, without_adjectives

        attribute = self.attribute.score(images, prompts)
        spatial = self.spatial.score(images, prompts)
        action = self.action.score(images, [without_adjectives(p, self.attribute.nlp) for p in prompts])
        results = []
        for i, prompt in enumerate(prompts):
            key = normalise_complex_prompt(prompt)
            parts = {"attribute": attribute[i]["score"]}
            if key in self.spatial_set or key not in self.action_set:
                parts["spatial"] = spatial[i]["score"]
            if key in self.action_set or key not in self.spatial_set:
                parts["action"] = action[i]["score"]
            results.append({"score": complex_score(parts["attribute"], parts.get("spatial"), parts.get("action")), **parts})
        return results


def normalise_complex_prompt(line: str) -> str:
    """How the official 3-in-1 script compares prompts: the text before the first period, lower-cased."""
    return line.split(".")[0].lower().strip()


def complex_prompt_set(path: Path) -> set[str]:
    if not Path(path).exists():
        raise InputError(f"{path}: no such prompt list (T2I-CompBench's examples/dataset/complex_val_spatial.txt / _action.txt)")
    return {normalise_complex_prompt(line) for line in Path(path).read_text().splitlines() if line.strip()}
