"""lightning-metric: PyTorch Lightning training recipes for deep metric learning."""

from . import (
    backbones,
    callbacks,
    distances,
    distributed,
    evaluation,
    losses,
    metrics,
    miners,
    regularizers,
    samplers,
    synthesis,
    transforms,
)
from .backbones import HFTextEncoder, TimmEncoder
from .evaluation import retrieval_metrics
from .metrics import RetrievalMetric
from .module import MetricLearningModule
from .transforms import build_transforms

__version__ = "0.1.0"

__all__ = [
    "HFTextEncoder",
    "MetricLearningModule",
    "RetrievalMetric",
    "TimmEncoder",
    "backbones",
    "build_transforms",
    "callbacks",
    "distances",
    "distributed",
    "evaluation",
    "losses",
    "metrics",
    "miners",
    "regularizers",
    "retrieval_metrics",
    "samplers",
    "synthesis",
    "transforms",
]
