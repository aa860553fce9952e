"""The shapes judge as a validation metric: binding accuracy of the images the module generates for the validation
prompts (same seeds at every validation), logged as ``val/shapes/binding_accuracy`` and
``val/shapes/all_objects_right``, so a fine-tune's TensorBoard shows binding move as it trains. The core knows
nothing of it: it asks evaluation callbacks for nothing but ``evaluation_layers`` (then hands over the decoded
images as the validation step's output); the config names it.

    - class_path: benchmarks.shapes.binding_metric.ShapesBindingAccuracy
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from lightning.pytorch import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))

from judge import judge_image  # noqa: E402
from world import parse_caption  # noqa: E402


class ShapesBindingAccuracy(Callback):
    """Judge every validation image against its prompt (``world.parse_caption``); log the means over the run's
    validation set. Prompts outside the world's grammar are an error (the demo and benchmark prompts are in it)."""

    def __init__(self):
        self._results: list[dict] = []

    def evaluation_layers(self, default_layers) -> Optional[list]:  # EvaluatesRollouts: images only, no maps
        return None

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._results = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking or outputs is None or getattr(outputs, "images", None) is None:
            return
        pixels = (outputs.images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        for image, prompt in zip(pixels, outputs.prompts):
            self._results.append(judge_image(image, parse_caption(prompt)))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not self._results:
            return
        count = len(self._results)
        binding = sum(r["binding_accuracy"] for r in self._results) / count
        all_right = sum(r["all_correct"] for r in self._results) / count
        pl_module.log("val/shapes/binding_accuracy", binding, sync_dist=True)
        pl_module.log("val/shapes/all_objects_right", all_right, sync_dist=True)
        self._results = []
