"""What a checkpoint must hold beyond Lightning's defaults, and how it is written.

- RNG states (torch CPU and CUDA, Python, NumPy): training draws its noise from per-step seeded generators, so
  these only matter for code that uses the global generators, but a resumed run then continues exactly anyway.
- Atomic writes: Lightning's local save goes through an fsspec transaction that writes a temporary file in the
  system temp folder and moves it; across filesystems that move is a copy, which a crash can leave half-written at
  the checkpoint's own path. :class:`AtomicCheckpointIO` writes next to the target, fsyncs and renames.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from comat_lightning.files.atomic import atomic_write


def capture_rng_states() -> dict[str, Any]:
    import numpy as np

    # NumPy's state holds an ndarray: stored as a tensor so that checkpoints load with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Optional[dict[str, Any]]) -> None:
    if not states:
        return
    import numpy as np

    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file in the checkpoint's folder, fsync, then ``os.replace``: the checkpoint
    path holds either the previous complete file or the new complete file, never a partial one. Loads with
    ``torch.load(weights_only=True)`` only."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        if "://" in str(path):  # remote filesystems keep Lightning's own (transactional) writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only: Optional[bool] = None) -> dict[str, Any]:
        # A checkpoint is a file from disk like any other input: tensors and plain values only, never arbitrary
        # pickled objects (which run code when unpickled), whatever the caller asked for.
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


def use_atomic_checkpoint_io(trainer) -> None:
    """Swap the strategy's plain local checkpoint writer for :class:`AtomicCheckpointIO` (distributed-checkpoint
    strategies and user-chosen plugins are left alone)."""
    strategy = trainer.strategy
    if type(getattr(strategy, "checkpoint_io", None)) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
