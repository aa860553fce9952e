"""Evaluation of compositional alignment in ``validate`` / ``test`` (and the validation runs inside ``fit``).

Each validation/test batch is one gradient-free rollout of the current model with fixed seeds (the module's
``validation_step``); this callback scores the images with torchmetrics ``Metric`` objects, which reduce across
ranks by their summed states (sum and count), so a DDP run reports the same value as one process on the same data:

- ``caption_nll``: CoMat's judge as a metric: the BLIP captioner's negative log-likelihood of
  ``prefix + prompt`` given the image (no random crop), lower = the captioner reads the prompt back better;
- ``concept_overlap``: A-STAR's segregation measure: per image, the mean over noun pairs and over all denoising
  steps of ``overlap(A_m, A_n)`` of their concept maps (in [0, 0.5], lower = objects attend to separate regions);
  images with fewer than two nouns are not counted;
- ``clip_score``: torchmetrics' CLIPScore (100 x cosine of CLIP image and prompt embeddings), when ``clip_model``
  is set.

Logged as ``<stage>/metrics/<name>`` and written (rank 0) to ``<log dir>/metrics/<stage>_step<N>.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import Callback

from comat_lightning.attention.capture import Block, LayerSelection, layer_selection
from comat_lightning.errors import InputError
from comat_lightning.files.paths import check_local_path


class CompositionMetrics(Callback):
    """Args:
        captioner: BLIP captioning model for ``caption_nll``; None reuses the active ConceptMatchingLoss's judge (the
            metric is skipped if there is neither).
        caption_prefix: caption prefix when ``captioner`` is set (the loss's own prefix otherwise).
        clip_model: CLIP model (hub id or folder, e.g. openai/clip-vit-large-patch14) for ``clip_score``; None: off.
        concept_overlap: compute ``concept_overlap`` (needs the cross-attention of the read layers at every step).
        attention_blocks / attention_resolution: layers read for ``concept_overlap`` (default: the module's
            guidance layers, i.e. those A-STAR reads: the latent size / 4).
        output_dir: folder for the JSON results (default: ``<log dir>/metrics``).
    """

    def __init__(
        self,
        captioner: Optional[str] = None,
        caption_prefix: str = "a photography of ",
        clip_model: Optional[str] = None,
        concept_overlap: bool = True,
        attention_blocks: Optional[list[Block]] = None,
        attention_resolution: Optional[int] = None,
        output_dir: Optional[str] = None,
    ):
        self.captioner, self.caption_prefix, self.clip_model = captioner, caption_prefix, clip_model
        self.concept_overlap = concept_overlap
        self.attention_blocks, self.attention_resolution = attention_blocks, attention_resolution
        if attention_resolution is not None and attention_resolution < 1:
            raise InputError(f"CompositionMetrics: attention_resolution must be >= 1, got {attention_resolution}")
        if attention_blocks:  # the resolution may default to the module's: checked here for the blocks
            layer_selection("CompositionMetrics attention_blocks", attention_blocks, None)
        check_local_path("CompositionMetrics.captioner", captioner, "captioner folder")
        check_local_path("CompositionMetrics.clip_model", clip_model, "CLIP model folder")
        self.output_dir = output_dir
        self.metrics: dict[str, Any] = {}
        self._own_scorer = None
        self.written: list[Path] = []

    # ------------------------------------------------------------------------------------------ set-up

    def evaluation_layers(self, default_layers: LayerSelection) -> Optional[LayerSelection]:
        """The layers whose step-averaged maps the module must hand over (None: no maps needed); by default
        guidance's (``default_layers``: latent size / 4)."""
        if not self.concept_overlap:
            return None
        blocks = tuple(self.attention_blocks) if self.attention_blocks else default_layers.blocks
        resolutions = (self.attention_resolution,) if self.attention_resolution else default_layers.resolutions
        return LayerSelection(blocks, resolutions)

    def attention_requests(self, stage: str, default_layers: LayerSelection) -> list[tuple[str, LayerSelection]]:
        selection = self.evaluation_layers(default_layers) if stage in ("fit", "validate", "test") else None
        return [] if selection is None else [("CompositionMetrics.attention_blocks / attention_resolution", selection)]

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage not in ("fit", "validate", "test"):
            return
        from comat_lightning.judges.metrics import CaptionNLL, ConceptOverlap, PromptCLIPScore

        metrics: dict[str, Any] = {}
        # Callbacks' setup runs before the module's, so the loss list is read from the trainer here.
        if self.captioner is not None or _concept_matching(trainer.callbacks) is not None:
            metrics["caption_nll"] = CaptionNLL()
        if self.concept_overlap:
            metrics["concept_overlap"] = ConceptOverlap()
        if self.clip_model is not None:
            metrics["clip_score"] = PromptCLIPScore(self.clip_model)
        self.metrics = metrics

    def _caption_scorer(self, pl_module):
        if self.captioner is None:
            loss = _concept_matching(pl_module.trainer.callbacks)
            return pl_module.loss_modules[loss.name]
        if self._own_scorer is None:
            from comat_lightning.judges.captioner import CaptionScorer

            self._own_scorer = CaptionScorer(self.captioner, prefix=self.caption_prefix).to(pl_module.device)
        return self._own_scorer

    # ------------------------------------------------------------------------------------------ per batch

    @torch.no_grad()
    def update(self, pl_module, generated) -> None:
        images = generated.images.float().clamp(0, 1)
        if "caption_nll" in self.metrics:
            per_sample, counts = self._caption_scorer(pl_module)(images, generated.prompts, crop=False)
            self.metrics["caption_nll"].update(per_sample, counts)
        if "clip_score" in self.metrics:
            self.metrics["clip_score"].update(images, generated.prompts)
        if "concept_overlap" in self.metrics:
            self.metrics["concept_overlap"].update(self._concept_maps(pl_module, generated))

    def _concept_maps(self, pl_module, generated) -> list[torch.Tensor]:
        """Per image a (S, C, r, r) stack: its nouns' concept maps (A-STAR's definition) at every step."""
        from comat_lightning.attention.concept_maps import concept_maps
        from comat_lightning.sampling.prediction import concept_positions

        summary = generated.attention_summary
        if summary is None:
            raise RuntimeError("CompositionMetrics: the rollout carries no attention summary (was it produced by validation_step?)")
        steps = summary.stacked()  # (S, B, r, r, T)
        keys = pl_module.backbone.text_keys
        out = []
        for b, record in enumerate(generated.records()):
            try:
                _, positions = concept_positions(record, keys, pl_module.concept_parser)
            except ValueError:  # no noun found: the image has no pair to measure (counted as skipped)
                positions = []
            if not positions:
                out.append(steps.new_zeros(steps.shape[0], 0, *steps.shape[2:4]))
                continue
            out.append(torch.stack([concept_maps(step[b : b + 1], [positions], first=keys.first, end=keys.end)[0] for step in steps]))
        return out

    def _to_device(self, pl_module) -> None:
        for metric in self.metrics.values():  # the module is on its device by the time evaluation starts
            metric.to(pl_module.device)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._to_device(pl_module)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._to_device(pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self.update(pl_module, outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.update(pl_module, outputs)

    # ------------------------------------------------------------------------------------------ per run

    def finish(self, trainer, pl_module, stage: str) -> dict[str, float]:
        """Reduce across ranks, log ``<stage>/metrics/<name>``, write the JSON (rank 0) and reset."""
        values: dict[str, float] = {}
        for name, metric in self.metrics.items():
            # Nothing seen (an empty validation set). Lightning's distributed sampler gives every rank the same number
            # of batches, so all ranks skip alike and none waits in the metric's all-gather.
            if metric.update_count == 0:
                continue
            value = metric.compute()
            values[name] = float(value)
            metric.reset()
        for name, value in values.items():
            # Already reduced by the metric, so equal on every rank: sync_dist averages equal values (and tells
            # Lightning the value is global).
            pl_module.log(f"{stage}/metrics/{name}", value, sync_dist=True)
        # trainer.log_dir is a collective (rank 0 broadcasts it): every rank asks, only rank 0 writes.
        root = Path(self.output_dir) if self.output_dir else Path(trainer.log_dir or trainer.default_root_dir) / "metrics"
        if trainer.is_global_zero and values:
            self._write_json(trainer, pl_module, root, stage, values)
        return values

    def _write_json(self, trainer, pl_module, root: Path, stage: str, values: dict[str, float]) -> None:
        from comat_lightning.files.atomic import write_bytes_atomically

        path = root / f"{stage}_step{pl_module.generator_step:07d}.json"
        result = {
            "stage": stage,
            "generator_step": pl_module.generator_step,
            "epoch": trainer.current_epoch,
            "metrics": values,
            "checkpoint": str(trainer.ckpt_path) if trainer.ckpt_path else None,
            "model": pl_module.model_source,
            "lora_weights": pl_module.lora_weights,
        }
        root.mkdir(parents=True, exist_ok=True)
        write_bytes_atomically(path, (json.dumps(result, indent=2) + "\n").encode())
        self.written.append(path)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            for metric in self.metrics.values():
                metric.reset()
            return
        self.finish(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self.finish(trainer, pl_module, "test")


def _concept_matching(callbacks):
    from callbacks.concept_matching import ConceptMatchingLoss

    return next((cb for cb in callbacks if isinstance(cb, ConceptMatchingLoss)), None)


__all__ = ["CompositionMetrics"]
