"""Neighbourhood losses: a softmax over the batch says who is whose neighbour.

:class:`NCALoss` maximises the probability that an item's stochastic nearest
neighbour has its label; :class:`NPairsLoss` classifies, for one anchor per
class, its positive among the positives of every other class.

Under DDP (``gather_distributed``) both compute the whole gathered batch on every rank
(``gather_mode = "global"``, see :class:`~lightning_metric.losses.BaseMetricLoss`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import IndicesTuple
from ..distances import BaseDistance, DotProductSimilarity, LpDistance
from ..indices import to_pairs
from ._reduction import SubLoss
from .base import BaseMetricLoss
from .infonce import info_nce, masked_logsumexp, similarity_logits


def occurrence_weights(
    indices_tuple: IndicesTuple | None,
    n: int,
    anchors_only: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """Per-item weights ``(n,)`` from how often each item appears in ``indices_tuple``.

    PML's ``convert_to_weights``: count / largest count, 0 for items never used; all
    ones without a tuple (or with an empty one). ``anchors_only`` counts only the
    anchors (used against a reference set, whose indices are not the batch's).
    """
    if indices_tuple is None or all(len(indices) == 0 for indices in indices_tuple):
        return torch.ones(n, dtype=dtype, device=device)
    if anchors_only:
        used = indices_tuple[:1] if len(indices_tuple) == 3 else indices_tuple[::2]
    else:
        used = indices_tuple
    counts = torch.bincount(torch.cat(list(used)).to(device), minlength=n).to(dtype)
    return counts / counts.max()


def first_two_per_label(labels: Tensor) -> tuple[Tensor, Tensor]:
    """The first and second item of every label that has two, sorted by label.

    The same pairs as :func:`first_pair_per_label` on all positive pairs (in
    row-major order a label's first pair is its first item with its second item),
    without building the ``(B, B)`` pair list.
    """
    sorted_labels, order = torch.sort(labels, stable=True)
    counts = torch.unique_consecutive(sorted_labels, return_counts=True)[1]
    starts = (counts.cumsum(0) - counts)[counts >= 2]
    return order[starts], order[starts + 1]


def first_pair_per_label(
    anchors: Tensor, positives: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor]:
    """The first pair (in list order) of every anchor label, sorted by label.

    What PML's ``convert_to_pos_pairs_with_unique_labels`` selects with
    ``np.unique(return_index=True)``, computed on the tensors' own device.
    """
    unique, inverse = torch.unique(labels[anchors], return_inverse=True)
    order = torch.arange(len(anchors), device=anchors.device)
    first = torch.full((len(unique),), len(anchors), dtype=order.dtype, device=order.device)
    first = first.scatter_reduce(0, inverse, order, reduce="amin")
    return anchors[first], positives[first]


def neighbour_nll(logits: Tensor, positive: Tensor) -> Tensor:
    """``-log(sum_j positive_ij * softmax(logits)_ij)`` per row: ``(N,)``.

    ``positive``: a 0/1 float matrix. One fused softmax in the common case; rows whose
    probability mass underflows (below the dtype's ``tiny``) are recomputed in log
    space, ``logsumexp(all) - logsumexp(positives)``, instead of losing their gradient.
    Rows without positives are meaningless (``-log(tiny)``): callers drop them.
    """
    tiny = torch.finfo(logits.dtype).tiny
    mass = (torch.softmax(logits, dim=1) * positive).sum(dim=1)
    losses = -mass.clamp(min=tiny).log()
    underflow = (mass < tiny) & (positive.sum(dim=1) > 0)
    if underflow.any():
        rows = torch.where(underflow)[0]
        exact = masked_logsumexp(logits[rows]) - masked_logsumexp(logits[rows], positive[rows] > 0)
        losses = losses.index_put((rows,), exact)
    return losses


class NCALoss(BaseMetricLoss):
    """Neighbourhood Components Analysis: the log-probability of a correct stochastic neighbour.

    Each item picks a neighbour ``k`` among the other items with probability
    ``softmax_k(softmax_scale * s_ik)`` (``s``: negated squared Euclidean distance by
    default); the loss is ``-log`` of the probability that the neighbour has the same
    label, averaged over the items that have a same-label item. Items absent from a
    given ``indices_tuple`` weigh 0 (PML's miner weights).

    Inputs: ``embeddings`` ``(B, D)``, ``labels`` ``(B,)`` (required), optionally
    ``indices_tuple`` (only used to weigh items) and ``ref_emb`` ``(M, D)`` with
    ``ref_labels`` ``(M,)`` as the neighbours to pick from.

    Args:
        softmax_scale: multiplies the similarities in the softmax (an inverse temperature).

    Paper: Goldberger et al., "Neighbourhood Components Analysis", NeurIPS 2004.
    Same values as PML's ``NCALoss``.

    Example::

        >>> loss_fn = NCALoss(softmax_scale=1)
        >>> embeddings, labels = torch.randn(32, 64), torch.arange(8).repeat(4)
        >>> loss = loss_fn(embeddings, labels)
    """

    def __init__(self, softmax_scale: float = 1, **kwargs):
        super().__init__(**kwargs)
        self.softmax_scale = softmax_scale

    def default_distance(self) -> BaseDistance:
        return LpDistance(power=2)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels, same_set):
        if labels is None:
            raise ValueError("NCALoss needs labels")
        if len(embeddings) <= 1:
            return {}
        ref = None if same_set else ref_emb
        logits = similarity_logits(self.distance, embeddings, ref, self.softmax_scale)
        positive = (labels.unsqueeze(1) == ref_labels.unsqueeze(0)).to(logits.dtype)
        if same_set:
            positive.fill_diagonal_(0)
            logits.fill_diagonal_(float("-inf"))  # an item is not its own neighbour
        has_positive = positive.sum(dim=1) > 0
        losses = neighbour_nll(logits, positive)
        weights = occurrence_weights(
            indices_tuple, len(embeddings), not same_set, logits.dtype, logits.device
        )
        return {"loss": SubLoss(losses[has_positive] * weights[has_positive])}

    def extra_repr(self) -> str:
        return f"softmax_scale={self.softmax_scale}"


class NPairsLoss(BaseMetricLoss):
    """Multi-class N-pair loss: one anchor per class picks its positive among N.

    From the batch's positive pairs, the first pair of every label is kept: ``N``
    anchors ``a_c`` and positives ``p_c``, one per class. Each anchor's loss is the
    cross-entropy of ``softmax_c'(s(a_c, p_c'))`` against its own positive ``c``
    (``s``: dot product of normalised embeddings by default), averaged over anchors.

    Inputs: ``embeddings`` ``(B, D)`` with ``labels`` ``(B,)`` (required; at least two
    items of a class for it to count), optionally pairs or triplets ``indices_tuple``
    to draw the positive pairs from. A reference set is not supported.

    Paper: Sohn, "Improved Deep Metric Learning with Multi-class N-pair Loss
    Objective", NeurIPS 2016. Same values as PML's ``NPairsLoss`` (use
    ``embedding_regularizer="lp"`` for the paper's L2 penalty).

    Example::

        >>> loss_fn = NPairsLoss()
        >>> embeddings, labels = torch.randn(32, 64), torch.arange(16).repeat(2)
        >>> loss = loss_fn(embeddings, labels)
    """

    def default_distance(self) -> BaseDistance:
        return DotProductSimilarity()

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels, same_set):
        if labels is None:
            raise ValueError("NPairsLoss needs labels")
        if not same_set:
            raise ValueError("NPairsLoss does not support ref_emb / ref_labels")
        if indices_tuple is None:
            anchors, positives = first_two_per_label(labels)
        else:
            anchors, positives, _, _ = to_pairs(indices_tuple, labels, labels, True)
            anchors, positives = first_pair_per_label(anchors, positives, labels)
        if len(anchors) == 0:
            return {}
        logits = similarity_logits(self.distance, embeddings[anchors], embeddings[positives], 1)
        diagonal = torch.arange(len(anchors), device=logits.device)
        return {"loss": SubLoss(info_nce(logits, diagonal, diagonal))}
