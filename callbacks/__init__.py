"""Loss terms, monitoring and evaluation callbacks, and training utilities that plug into ``trainer.callbacks``."""

from callbacks.astar_losses import AttentionRetentionLoss, AttentionSegregationLoss
from callbacks.attribute_concentration import AttributeConcentrationLoss
from callbacks.composition_metrics import CompositionMetrics
from callbacks.concept_matching import ConceptMatchingLoss
from callbacks.fidelity_preservation import FidelityPreservationLoss
from callbacks.image_logging import AttentionMapLogger, SampleImageLogger
from callbacks.lora_export import ExportLoRA
from callbacks.prediction_writer import ImageWriter
from comat_lightning.runtime.graceful_stop import GracefulStop
from comat_lightning.runtime.progress import GeneratorStepProgress, GeneratorStepProgressBar, GeneratorStepRichProgressBar
from comat_lightning.training.losses import AdversarialLoss, GeneratedBatch, LossCallback, LossNeeds

__all__ = [
    "AttentionMapLogger",
    "AttentionRetentionLoss",
    "AttentionSegregationLoss",
    "AttributeConcentrationLoss",
    "CompositionMetrics",
    "ConceptMatchingLoss",
    "FidelityPreservationLoss",
    "ExportLoRA",
    "GeneratorStepProgress",
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
