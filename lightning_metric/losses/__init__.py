"""Losses for metric learning: embeddings (and labels) in, scalar out."""

from .base import BaseMetricLoss

__all__ = ["BaseMetricLoss"]
