"""Losses for metric learning: embeddings (and labels) in, scalar out.

Every labelled loss is called ``loss(embeddings, labels, indices_tuple=None,
ref_emb=None, ref_labels=None)`` and matches pytorch-metric-learning 2.9's
loss of the same name (parameters, defaults, units, values).

The losses on paired fields take one ``(B, D)`` embedding per field instead of labels:
query-document (``MultipleNegativesRankingLoss``, ``CosineSimilarityLoss``, ...; see
``query_document``) and image-text (``CLIPLoss``); ``PAIR_LOSSES`` says each one's batch
shape. They match sentence-transformers 6.2, open_clip 3.3 or torch.nn.
"""

from .base import BaseMetricLoss
from .clip import CLIPLoss
from .dynamic_soft_margin import DynamicSoftMarginLoss
from .histogram import HistogramLoss
from .infonce import NTXentLoss, SupConLoss
from .instance import InstanceLoss
from .manifold import ManifoldLoss
from .margin_softmax import (
    ArcFaceLoss,
    CosFaceLoss,
    LargeMarginSoftmaxLoss,
    NormalizedSoftmaxLoss,
    SphereFaceLoss,
    SubCenterArcFaceLoss,
)
from .neighbourhood import NCALoss, NPairsLoss
from .p2sgrad import P2SGradLoss
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
from .pnp import PNPLoss
from .proxy import ProxyAnchorLoss, ProxyNCALoss, SoftTripleLoss
from .query_document import (
    CosineEmbeddingLoss,
    CosineSimilarityLoss,
    MarginMSELoss,
    MarginRankingLoss,
    MNRLoss,
    MultipleNegativesRankingLoss,
)
from .ranked_list import RankedListLoss
from .ranking import FastAPLoss
from .registry import LOSSES, PAIR_LOSSES, get_entry, resolve_sampler
from .self_supervised import SelfSupervisedLoss, VICRegLoss
from .threshold_consistent import ThresholdConsistentMarginLoss
from .triplet import AngularLoss, MarginLoss, TripletLoss, TripletMarginLoss
from .wrappers import CrossBatchMemory, MultipleLosses

__all__ = [
    "LOSSES",
    "PAIR_LOSSES",
    "AngularLoss",
    "ArcFaceLoss",
    "BaseMetricLoss",
    "CLIPLoss",
    "CircleLoss",
    "ContrastiveLoss",
    "CosFaceLoss",
    "CosineEmbeddingLoss",
    "CosineSimilarityLoss",
    "CrossBatchMemory",
    "DynamicSoftMarginLoss",
    "FastAPLoss",
    "GeneralizedLiftedStructureLoss",
    "HistogramLoss",
    "InstanceLoss",
    "IntraPairVarianceLoss",
    "LargeMarginSoftmaxLoss",
    "LiftedStructureLoss",
    "ManifoldLoss",
    "MNRLoss",
    "MarginLoss",
    "MarginMSELoss",
    "MarginRankingLoss",
    "MultiSimilarityLoss",
    "MultipleLosses",
    "MultipleNegativesRankingLoss",
    "NCALoss",
    "NPairsLoss",
    "NTXentLoss",
    "NormalizedSoftmaxLoss",
    "P2SGradLoss",
    "PNPLoss",
    "ProxyAnchorLoss",
    "ProxyNCALoss",
    "RankedListLoss",
    "SelfSupervisedLoss",
    "SiameseLoss",
    "SignalToNoiseRatioContrastiveLoss",
    "SoftTripleLoss",
    "SphereFaceLoss",
    "SubCenterArcFaceLoss",
    "SupConLoss",
    "ThresholdConsistentMarginLoss",
    "TripletLoss",
    "TripletMarginLoss",
    "TupletMarginLoss",
    "VICRegLoss",
    "get_entry",
    "resolve_sampler",
]
