"""Loss terms, monitoring and evaluation callbacks, and training utilities that plug into ``trainer.callbacks``."""

from callbacks.attention_segregation import AttentionRetentionLoss, AttentionSegregationLoss
from callbacks.attribute_concentration import AttributeConcentrationLoss
from callbacks.composition_metrics import CompositionMetrics
from callbacks.concept_matching import ConceptMatchingLoss
from callbacks.fidelity_preservation import FidelityPreservationLoss
from callbacks.graceful_stop import GracefulStop
from callbacks.image_logging import AttentionMapLogger, SampleImageLogger
from callbacks.lora_export import ExportLoRA
from callbacks.prediction_writer import ImageWriter
from callbacks.progress import GeneratorStepProgressBar, GeneratorStepRichProgressBar
from callbacks.loss_base import AdversarialLoss, GeneratedBatch, LossCallback, LossNeeds

__all__ = [
    "AttentionMapLogger",
    "AttentionRetentionLoss",
    "AttentionSegregationLoss",
    "AttributeConcentrationLoss",
    "CompositionMetrics",
    "ConceptMatchingLoss",
    "FidelityPreservationLoss",
    "ExportLoRA",
    "GeneratorStepProgressBar",
    "GracefulStop",
    "GeneratorStepRichProgressBar",
    "ImageWriter",
    "SampleImageLogger",
    "AdversarialLoss",
    "GeneratedBatch",
    "LossCallback",
    "LossNeeds",
]
