"""Loss terms and training utilities that plug into ``trainer.callbacks``."""

from callbacks.attention_segregation import AttentionRetentionLoss, AttentionSegregationLoss
from callbacks.attribute_concentration import AttributeConcentrationLoss
from callbacks.concept_matching import ConceptMatchingLoss
from callbacks.fidelity_preservation import FidelityPreservationLoss
from callbacks.lora_export import ExportLoRA
from callbacks.prediction_writer import ImageWriter
from callbacks.loss_base import AdversarialLoss, GeneratedBatch, LossCallback, LossNeeds

__all__ = ["AttentionRetentionLoss", "AttentionSegregationLoss", "AttributeConcentrationLoss", "ConceptMatchingLoss", "FidelityPreservationLoss", "ExportLoRA", "ImageWriter", "AdversarialLoss", "GeneratedBatch", "LossCallback", "LossNeeds"]
