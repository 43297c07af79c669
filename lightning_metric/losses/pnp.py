"""PNP loss: rank positives before negatives, with a choice of how a rank is penalised.

Under DDP it computes the whole gathered batch on every rank (``gather_mode = "global"``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..distances import BaseDistance, CosineSimilarity
from ..indices import label_masks
from ._reduction import SubLoss
from .base import BaseMetricLoss

VARIANTS = ("Ds", "Dq", "Iu", "Ib", "O")


class PNPLoss(BaseMetricLoss):
    """Rethinking the Optimization of Average Precision: Only Penalizing Negative Instances
    before Positive Ones is Enough (Li et al., AAAI 2022, https://arxiv.org/abs/2102.04640).

    For a query ``q`` (an item with at least one positive) and each of its positives ``i``,
    ``q`` itself included, the smoothed number of negatives ranked above ``i`` is::

        R(q, i) = sum over negatives j of q of sigmoid((s_qj - s_qi) / anneal)

    (cosine similarities ``s``; the sigmoid's argument clamped to ``[-50, 50]``), and::

        loss = mean over queries of  mean over i of f(R(q, i))

    with ``f`` the ``variant``: ``"O"`` ``R``; ``"Ds"`` ``log(1 + R)``; ``"Dq"``
    ``1 / (1 + R) ** alpha`` (the loss is then ``1 -`` the mean); ``"Iu"``
    ``(1 + R) * log(1 + R)``; ``"Ib"`` ``(b * R - log(1 + b * R)) / b**2``. Reduced already:
    the reducer does not apply. Computed on the ``(positive pairs, B)`` entries only, not
    PML's ``(B, B, B)`` tensor.

    Args:
        b: the ``Ib`` variant's ``b``, 2.
        alpha: the ``Dq`` variant's exponent, 1.
        anneal: the sigmoid's temperature, 0.01.
        variant: one of ``"Ds"``, ``"Dq"``, ``"Iu"``, ``"Ib"``, ``"O"`` (default, PNP-O).
        **kwargs: ``distance`` (cosine, the default, only), ``embedding_regularizer``, ...

    Inputs: ``embeddings`` ``(B, D)`` with ``labels`` ``(B,)`` (required). An
    ``indices_tuple`` (or a miner) or ``ref_emb`` is a ValueError (PML refuses them too).
    A batch where no item has a positive gives a connected zero.

    Example::

        >>> loss_fn = PNPLoss(variant="Dq")
        >>> loss = loss_fn(torch.randn(32, 64), torch.arange(8).repeat(4))
    """

    VARIANTS = VARIANTS

    def __init__(self, b: float = 2, alpha: float = 1, anneal: float = 0.01,
                 variant: str = "O", **kwargs):
        super().__init__(**kwargs)
        if not isinstance(self.distance, CosineSimilarity):
            raise ValueError(f"PNPLoss needs distance='cosine', got {type(self.distance).__name__}")
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r} but must be one of {list(VARIANTS)}")
        if anneal <= 0:
            raise ValueError(f"anneal must be positive, got {anneal!r}")
        self.b = b
        self.alpha = alpha
        self.anneal = anneal
        self.variant = variant

    def default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels, same_set):
        if labels is None:
            raise ValueError("PNPLoss needs labels")
        if indices_tuple is not None:
            raise ValueError("PNPLoss does not support an indices_tuple (nor a miner)")
        if not same_set:
            raise ValueError("PNPLoss does not support ref_emb / ref_labels")
        positive, negative = label_masks(labels, labels, True)
        has_positive = positive.any(dim=1)
        if not has_positive.any():
            return {}
        # Each query with a positive counts itself as one of its positives (as PML does).
        positive = positive | torch.diag(has_positive)
        query, item = torch.where(positive)
        sims = self.distance(embeddings)
        above = (sims[query] - sims[query, item].unsqueeze(1)) / self.anneal
        ranks = (torch.sigmoid(above.clamp(-50, 50)) * negative[query]).sum(dim=1)
        per_pair = self._penalty(ranks)
        counts = positive.sum(dim=1).to(sims.dtype)
        per_query = sims.new_zeros(len(labels)).index_add(0, query, per_pair / counts[query])
        loss = per_query.sum() / has_positive.sum()
        if self.variant == "Dq":
            loss = 1 - loss
        return {"loss": SubLoss(loss, reduced=True)}

    def _penalty(self, ranks: Tensor) -> Tensor:
        if self.variant == "Ds":
            return torch.log(1 + ranks)
        if self.variant == "Dq":
            return 1 / (1 + ranks) ** self.alpha
        if self.variant == "Iu":
            return (1 + ranks) * torch.log(1 + ranks)
        if self.variant == "Ib":
            return (self.b * ranks - torch.log(1 + self.b * ranks)) / self.b**2
        return ranks

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, anneal={self.anneal}, b={self.b}, alpha={self.alpha}"
