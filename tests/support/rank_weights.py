"""Test-only callback: each rank writes the trainable weights it holds at the end of ``fit``, so a test can check
that data-parallel ranks agree (the shipped ExportLoRA writes rank 0's copy only)."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback


class SaveRankWeights(Callback):
    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    def on_fit_end(self, trainer, pl_module) -> None:
        from safetensors.torch import save_file
        from torch.distributed.tensor import DTensor

        weights = {}
        for name, param in pl_module.named_parameters():
            if param.requires_grad or ".lora_" in name:
                local = param.to_local() if isinstance(param, DTensor) else param  # a shard's own part under FSDP2
                weights[name] = local.detach().float().cpu().contiguous()
        self.dirpath.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(self.dirpath / f"rank{trainer.global_rank}.safetensors"))
