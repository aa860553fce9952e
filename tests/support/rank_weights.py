"""Test-only callback: each rank writes the trainable weights as it sees them at the end of ``fit``, so a test can
check that data-parallel ranks agree (the shipped ExportLoRA writes rank 0's copy only)."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback


class SaveRankWeights(Callback):
    """``rank<r>.safetensors``: full weights (FSDP2 shards gathered on every rank); ``rank<r>_local.safetensors``:
    the part this rank stores (its shard under FSDP2, everything under DDP)."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    def on_fit_end(self, trainer, pl_module) -> None:
        from safetensors.torch import save_file

        full, local = {}, {}
        for name, param in pl_module.named_parameters():
            if param.requires_grad or ".lora_" in name:
                full[name] = (param.full_tensor() if hasattr(param, "full_tensor") else param).detach().float().cpu().contiguous()
                local[name] = (param.to_local() if hasattr(param, "to_local") else param).detach().float().cpu().contiguous()
        self.dirpath.mkdir(parents=True, exist_ok=True)
        save_file(full, str(self.dirpath / f"rank{trainer.global_rank}.safetensors"))
        save_file(local, str(self.dirpath / f"rank{trainer.global_rank}_local.safetensors"))
