"""Loss terms (and, later, logging callbacks) that plug into ``trainer.callbacks``."""

from callbacks.concept_matching import ConceptMatchingLoss
from callbacks.loss_base import GeneratedBatch, LossCallback, LossNeeds

__all__ = ["ConceptMatchingLoss", "GeneratedBatch", "LossCallback", "LossNeeds"]
