"""lightning-metric: PyTorch Lightning training recipes for deep metric learning."""

from . import distances, losses, miners, regularizers, samplers
from .module import MetricLearningModule

__version__ = "0.1.0"

__all__ = ["MetricLearningModule", "distances", "losses", "miners", "regularizers", "samplers"]
