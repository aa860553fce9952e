"""Export the trained LoRA in diffusers' format when training ends."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from lightning.pytorch import Callback


class ExportLoRA(Callback):
    """At the end of ``fit``, write ``<dirpath>/pytorch_lora_weights.safetensors`` (diffusers format).

    Use it with ``pipe.load_lora_weights(dirpath)`` on the same base model. ``dirpath`` defaults to
    ``<log dir>/lora``. Only rank 0 writes (every rank holds the same LoRA under DDP).
    """

    def __init__(self, dirpath: Optional[str] = None):
        self.dirpath = dirpath
        self.last_export: Optional[Path] = None

    def on_fit_end(self, trainer, pl_module) -> None:
        if pl_module.finetune != "lora" or not trainer.is_global_zero:
            return
        from comat_lightning.lora_export import save_unet_lora

        target = Path(self.dirpath) if self.dirpath else Path(trainer.log_dir or trainer.default_root_dir) / "lora"
        self.last_export = save_unet_lora(pl_module.backbone.unet, pl_module.backbone.family, target)
