"""Ranked list loss: pull positives inside ``alpha - margin``, push negatives beyond ``alpha``.

Under DDP it computes the whole gathered batch on every rank (``gather_mode = "global"``).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..indices import label_masks
from ._reduction import SubLoss
from .base import BaseMetricLoss

_EPS = 1e-5  # PML's: added to every weight of a row, so an empty row divides 0 by B * 1e-5


class RankedListLoss(BaseMetricLoss):
    """Ranked List Loss (Wang et al., CVPR 2019, https://arxiv.org/abs/1903.03238); the
    defaults are RLL-Simpler (``Tp = 0``: positives weighted equally).

    For each anchor ``i``, with distances ``d`` (default: Euclidean of unit rows), the
    positives farther than ``alpha - margin`` and the negatives closer than ``alpha``
    (both at a non-zero distance) are weighted by ``w+ = exp(Tp * (d - (alpha - margin)))``
    and ``w- = exp(Tn * (alpha - d))``, and::

        L+_i = sum w+ * (d - (alpha - margin)) / (sum w+ + B * 1e-5)
        L-_i = sum w- * (alpha - d) / (sum w- + B * 1e-5)
        loss_i = (1 - imbalance) * L+_i + imbalance * L-_i

    one loss per anchor (``B`` of them), reduced with the reducer (default ``"mean"``). The
    weights are not detached (the gradient flows through them), as in PML.

    Args:
        margin: the gap between the positives' boundary ``alpha - margin`` and the
            negatives' ``alpha`` (required, a distance).
        Tn: the temperature of the negatives' weights (required; 0 weighs them equally).
        imbalance: the weight of the negatives' term, in ``[0, 1]``, 0.5.
        alpha: the negatives' boundary; None (default): ``1 + margin / 2``.
        Tp: the temperature of the positives' weights, 0.
        **kwargs: ``distance`` (default Euclidean of unit rows; a similarity is refused),
            ``reducer``, ``embedding_regularizer``, ...

    Inputs: ``embeddings`` ``(B, D)`` with ``labels`` ``(B,)`` (required). An
    ``indices_tuple`` (or a miner) or ``ref_emb`` is a ValueError (PML refuses them too).

    Differences from PML 2.9: a similarity (e.g. ``CosineSimilarity``) is a ValueError here,
    where PML compares it with the distance thresholds as if it were a distance; an
    ``imbalance`` outside ``[0, 1]`` is a ValueError (PML: an ``assert``).

    Example::

        >>> loss_fn = RankedListLoss(margin=0.4, Tn=10)
        >>> loss = loss_fn(torch.randn(32, 64), torch.arange(8).repeat(4))
    """

    def __init__(self, margin: float, Tn: float, imbalance: float = 0.5,
                 alpha: float | None = None, Tp: float = 0, **kwargs):
        super().__init__(**kwargs)
        if self.distance.is_inverted:
            raise ValueError(
                "RankedListLoss thresholds distances (smaller means closer): distance must not "
                f"be a similarity, got {type(self.distance).__name__}"
            )
        if not 0 <= imbalance <= 1:
            raise ValueError(f"imbalance must lie in [0, 1], got {imbalance!r}")
        if Tp > 5 or Tn > 5:
            warnings.warn(
                f"RankedListLoss: Tp={Tp} or Tn={Tn} is above 5: such temperatures may "
                "overflow exp()", stacklevel=2,
            )
        self.margin = margin
        self.imbalance = imbalance
        self.alpha = 1 + margin / 2 if alpha is None else alpha
        self.Tp = Tp
        self.Tn = Tn

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels, same_set):
        if labels is None:
            raise ValueError("RankedListLoss needs labels")
        if indices_tuple is not None:
            raise ValueError("RankedListLoss does not support an indices_tuple (nor a miner)")
        if not same_set:
            raise ValueError("RankedListLoss does not support ref_emb / ref_labels")
        mat = self.distance(embeddings)
        # The diagonal is in neither mask (a positive needs i != j, a negative another label);
        # PML also skips the pairs at distance 0 (duplicates).
        positive, negative = label_masks(labels, labels, True)
        nonzero = mat > 0
        pos_boundary = self.alpha - self.margin
        active_pos = positive.logical_and_(mat > pos_boundary).logical_and_(nonzero)
        active_neg = negative.logical_and_(mat < self.alpha).logical_and_(nonzero)
        del nonzero
        loss_pos = _weighted_mean(mat - pos_boundary, self.Tp, active_pos)
        loss_neg = _weighted_mean(self.alpha - mat, self.Tn, active_neg)
        loss = (1 - self.imbalance) * loss_pos + self.imbalance * loss_neg
        return {"loss": SubLoss(loss)}

    def extra_repr(self) -> str:
        return (f"margin={self.margin}, alpha={self.alpha}, imbalance={self.imbalance}, "
                f"Tp={self.Tp}, Tn={self.Tn}")


def _weighted_mean(excess: Tensor, temperature: float, active: Tensor) -> Tensor:
    """Per row, ``sum w * excess / (sum w + cols * eps)`` over the active entries,
    ``w = exp(temperature * excess)``; ``excess`` (a fresh tensor) is overwritten."""
    inactive = ~active
    excess = excess.masked_fill_(inactive, 0)
    cols_eps = excess.shape[1] * _EPS
    if temperature == 0:  # w = 1: the weights are the mask, with nothing to differentiate
        return excess.sum(dim=1) / (active.sum(dim=1, dtype=excess.dtype) + cols_eps)
    weights = torch.exp(temperature * excess)  # 1 where inactive, but excess is 0 there
    return (weights * excess).sum(dim=1) / (weights.masked_fill(inactive, 0).sum(dim=1) + cols_eps)
