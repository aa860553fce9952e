"""Export the generator's LoRA in diffusers' format at every checkpoint and when training ends."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from lightning.pytorch import Callback

EXPORTED_STEP = "exported_lora_step"  # checkpoint key: the generator step whose LoRA export goes with it


class ExportLoRA(Callback):
    """Write ``pytorch_lora_weights.safetensors`` (diffusers format) for ``pipe.load_lora_weights(folder)`` on the
    same base model:

    - at the end of ``fit``: ``<dirpath>/``;
    - whenever a checkpoint is saved (``at_checkpoints``): ``<dirpath>_checkpoints/step_<generator step>/``, so
      every checkpoint has a LoRA you can sample with directly. A checkpoint names its LoRA's step
      (``exported_lora_step``); when ModelCheckpoint deletes a checkpoint (``save_top_k``), its LoRA folder is
      deleted too (at the next save and at the end of ``fit``).

    ``dirpath`` defaults to ``<log dir>/lora``. Only the generator's adapter is written (never the
    discriminator's). Only rank 0 writes; under FSDP2 the LoRA is first gathered from every rank's shard. Each folder is written to a
    temporary sibling and renamed, so a folder that exists is complete.
    """

    def __init__(self, dirpath: Optional[str] = None, at_checkpoints: bool = True):
        self.dirpath = dirpath
        self.at_checkpoints = at_checkpoints
        self.last_export: Optional[Path] = None
        self._exported_step: Optional[int] = None

    def _target(self, trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else Path(trainer.log_dir or trainer.default_root_dir) / "lora"

    def _export(self, trainer, pl_module, target: Path) -> None:
        if pl_module.finetune != "lora":
            return
        from comat_lightning.models.lora_files import save_denoiser_lora

        # Every rank takes part (FSDP2 gathers the shards from all of them); rank 0 writes.
        written = save_denoiser_lora(pl_module.backbone.unet, pl_module.backbone.family, target, write=trainer.is_global_zero)
        if written is not None:
            self.last_export = written

    def _checkpoint_exports(self, trainer) -> Path:
        target = self._target(trainer)
        return target.with_name(target.name + "_checkpoints")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        step = pl_module.generator_step
        if not self.at_checkpoints:
            return
        checkpoint[EXPORTED_STEP] = step
        if step == self._exported_step:  # e.g. `last.ckpt` saved beside a step checkpoint
            return
        self._exported_step = step
        self._prune(trainer, keep={step})
        self._export(trainer, pl_module, self._checkpoint_exports(trainer) / f"step_{step}")

    def on_fit_end(self, trainer, pl_module) -> None:
        self._export(trainer, pl_module, self._target(trainer))
        if self.at_checkpoints:
            self._prune(trainer)

    def _prune(self, trainer, keep: set[int] = frozenset()) -> None:
        """Delete ``step_N`` exports whose checkpoints are all gone (ModelCheckpoint's retention)."""
        folder = self._checkpoint_exports(trainer)
        if not trainer.is_global_zero or not folder.is_dir():
            return
        from comat_lightning.runtime.checkpoint_files import checkpoint_folders, checkpoint_values

        kept = set(keep) | checkpoint_values(checkpoint_folders(trainer), EXPORTED_STEP)
        for export in folder.glob("step_*"):
            step = export.name.removeprefix("step_")
            if step.isdigit() and int(step) not in kept:
                shutil.rmtree(export, ignore_errors=True)
