"""lightning-metric: PyTorch Lightning training recipes for deep metric learning."""

from . import (
    callbacks,
    distances,
    distributed,
    evaluation,
    losses,
    metrics,
    miners,
    regularizers,
    samplers,
)
from .evaluation import retrieval_metrics
from .metrics import RetrievalMetric
from .module import MetricLearningModule

__version__ = "0.1.0"

__all__ = [
    "MetricLearningModule",
    "RetrievalMetric",
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
]
