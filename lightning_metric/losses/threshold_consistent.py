"""Threshold-consistent margin loss: a regulariser that makes one similarity threshold fit
every class, by penalising hard positive pairs below ``margin_plus`` and hard negative
pairs above ``margin_minus``.

Under DDP it computes the whole gathered batch on every rank (``gather_mode = "global"``).
"""

from __future__ import annotations

import torch

from ..distances import BaseDistance, CosineSimilarity
from ..indices import label_masks, to_pairs
from ._reduction import SubLoss, masked_mean
from .base import BaseMetricLoss


class ThresholdConsistentMarginLoss(BaseMetricLoss):
    """Threshold-Consistent Margin loss (Zhang et al., "Threshold-Consistent Margin Loss for
    Open-World Deep Metric Learning", ICLR 2024, https://arxiv.org/abs/2307.04047).

    With ``s`` the cosine similarity of a pair::

        loss = lambda_plus  * mean over positive pairs with s <= margin_plus  of (margin_plus - s)
             + lambda_minus * mean over negative pairs with s >= margin_minus of (s - margin_minus)

    (a mean over no pairs is 0). Reduced already: the reducer does not apply. Meant to be
    added to a main loss (e.g. with :class:`~lightning_metric.losses.MultipleLosses`).

    Args:
        lambda_plus: the weight of the positive pairs' term, 1.
        lambda_minus: the weight of the negative pairs' term, 1.
        margin_plus: the similarity every positive pair should exceed, 0.9.
        margin_minus: the similarity every negative pair should stay below, 0.5.
        **kwargs: ``distance`` (cosine, the default, only), ``miner``,
            ``embedding_regularizer``, ...

    Inputs: ``embeddings`` ``(B, D)`` with ``labels`` ``(B,)``: every pair of the batch, or
    the pairs of ``indices_tuple`` (triplets give their two pairs); ``ref_emb`` with
    ``ref_labels`` as a reference set (the pairs' second items are its rows).

    Differences from PML 2.9: with ``ref_emb``, PML takes the pairs' second items from
    ``embeddings`` instead of ``ref_emb`` (wrong values, or an IndexError when ``ref_emb``
    has more rows); here they come from ``ref_emb``. PML computes ``F.cosine_similarity``
    and ignores the distance's ``power``; here the distance computes the similarities, so a
    ``CosineSimilarity(power=2)`` squares them.

    Example::

        >>> loss_fn = MultipleLosses([MultiSimilarityLoss(), ThresholdConsistentMarginLoss()])
        >>> loss = loss_fn(torch.randn(32, 64), torch.arange(8).repeat(4))
    """

    def __init__(self, lambda_plus: float = 1.0, lambda_minus: float = 1.0,
                 margin_plus: float = 0.9, margin_minus: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(self.distance, CosineSimilarity):
            raise ValueError(
                "ThresholdConsistentMarginLoss needs distance='cosine', got "
                f"{type(self.distance).__name__}"
            )
        self.lambda_plus = lambda_plus
        self.lambda_minus = lambda_minus
        self.margin_plus = margin_plus
        self.margin_minus = margin_minus

    def default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels, same_set):
        if labels is None and indices_tuple is None:
            raise ValueError("ThresholdConsistentMarginLoss needs labels or an indices_tuple")
        sims = self.distance(embeddings, ref_emb)
        if indices_tuple is None:  # every pair: masks of the (N, M) matrix, no index lists
            positive, negative = label_masks(labels, ref_labels, same_set)
            pos_sims = neg_sims = sims
        else:
            a1, p, a2, n = to_pairs(indices_tuple, labels, ref_labels, same_set)
            pos_sims, neg_sims = sims[a1, p], sims[a2, n]
            positive = torch.ones_like(pos_sims, dtype=torch.bool)
            negative = torch.ones_like(neg_sims, dtype=torch.bool)
        if not (positive.any() or negative.any()):
            return {}
        pos = masked_mean(self.margin_plus - pos_sims, positive & (pos_sims <= self.margin_plus))
        neg = masked_mean(neg_sims - self.margin_minus, negative & (neg_sims >= self.margin_minus))
        loss = self.lambda_plus * pos + self.lambda_minus * neg
        return {"loss": SubLoss(loss, reduced=True)}

    def extra_repr(self) -> str:
        return (f"lambda_plus={self.lambda_plus}, lambda_minus={self.lambda_minus}, "
                f"margin_plus={self.margin_plus}, margin_minus={self.margin_minus}")
