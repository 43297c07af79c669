"""lightning-metric: PyTorch Lightning training recipes for deep metric learning."""

from . import distances, losses, miners, regularizers, samplers

__version__ = "0.1.0"

__all__ = ["distances", "losses", "miners", "regularizers", "samplers"]
