"""What the training module asks of callbacks that are not loss terms, as protocols: the core never imports a
concrete callback, it asks any callback that has the method (monitoring and evaluation callbacks implement them).
Loss terms have their own, wider contract (training/losses.py)."""

from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

from comat_lightning.attention.capture import LayerSelection


@runtime_checkable
class ReadsAttention(Protocol):
    """A callback that reads cross-attention maps: its layers are checked against the model before it loads."""

    def attention_requests(self, stage: str, default_layers: LayerSelection) -> list[tuple[str, LayerSelection]]:
        """(option, layers) read in ``stage``; ``default_layers`` are guidance's (latent size / 4)."""
        ...


@runtime_checkable
class EvaluatesRollouts(Protocol):
    """A callback that judges validation / test rollouts: the module decodes their images and, if it asks, hands
    over step-averaged maps of the layers it names (``generated.attention_summary``)."""

    def evaluation_layers(self, default_layers: LayerSelection) -> Optional[LayerSelection]:
        """The layers whose step-averaged maps it needs (None: no maps)."""
        ...


__all__ = ["EvaluatesRollouts", "ReadsAttention"]
