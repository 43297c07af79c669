"""Losses for metric learning: embeddings (and labels) in, scalar out.

Every labelled loss is called ``loss(embeddings, labels, indices_tuple=None,
ref_emb=None, ref_labels=None)`` and matches pytorch-metric-learning 2.9's
loss of the same name (parameters, defaults, units, values).
"""

from .base import BaseMetricLoss
from .infonce import NTXentLoss, SupConLoss
from .margin_softmax import (
    ArcFaceLoss,
    CosFaceLoss,
    LargeMarginSoftmaxLoss,
    NormalizedSoftmaxLoss,
    SphereFaceLoss,
    SubCenterArcFaceLoss,
)
from .neighbourhood import NCALoss, NPairsLoss
from .pair import (
    CircleLoss,
    ContrastiveLoss,
    GeneralizedLiftedStructureLoss,
    IntraPairVarianceLoss,
    LiftedStructureLoss,
    MultiSimilarityLoss,
    SiameseLoss,
    SignalToNoiseRatioContrastiveLoss,
    TupletMarginLoss,
)
from .proxy import ProxyAnchorLoss, ProxyNCALoss, SoftTripleLoss
from .ranking import FastAPLoss
from .registry import LOSSES, get_entry, resolve_sampler
from .triplet import AngularLoss, MarginLoss, TripletLoss, TripletMarginLoss
from .wrappers import CrossBatchMemory, MultipleLosses

__all__ = [
    "LOSSES",
    "AngularLoss",
    "ArcFaceLoss",
    "BaseMetricLoss",
    "CircleLoss",
    "ContrastiveLoss",
    "CosFaceLoss",
    "CrossBatchMemory",
    "FastAPLoss",
    "GeneralizedLiftedStructureLoss",
    "IntraPairVarianceLoss",
    "LargeMarginSoftmaxLoss",
    "LiftedStructureLoss",
    "MarginLoss",
    "MultiSimilarityLoss",
    "MultipleLosses",
    "NCALoss",
    "NPairsLoss",
    "NTXentLoss",
    "NormalizedSoftmaxLoss",
    "ProxyAnchorLoss",
    "ProxyNCALoss",
    "SiameseLoss",
    "SignalToNoiseRatioContrastiveLoss",
    "SoftTripleLoss",
    "SphereFaceLoss",
    "SubCenterArcFaceLoss",
    "SupConLoss",
    "TripletLoss",
    "TripletMarginLoss",
    "TupletMarginLoss",
    "get_entry",
    "resolve_sampler",
]
