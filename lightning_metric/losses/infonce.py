"""InfoNCE losses: a positive pair against its anchor's softmax of candidates.

One formula serves NT-Xent, SupCon, N-pairs (and CLIP, MNRL): for an anchor
``i`` with positive ``j`` and logits ``s`` (similarities over a temperature),

    loss_ij = -log( exp(s_ij) / sum_{k in C(i)} exp(s_ik) ),

where the candidates ``C(i)`` are either the anchor's negatives plus the
positive itself (NT-Xent, MNRL) or a fixed set that already holds the
positive (SupCon, N-pairs, CLIP: a plain cross-entropy over a row).

Under DDP, NT-Xent and SupCon gather every rank's batch (``gather_distributed``, see
:class:`~lightning_metric.losses.BaseMetricLoss`): each rank's items are anchors against the
candidates of all ranks, and the value and encoder gradients are those of the whole batch.
:func:`info_nce` computes it from a logits matrix with a per-row
``logsumexp``, never a ``(num_pos_pairs, num_neg_pairs)`` matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..distances import BaseDistance, CosineSimilarity, to_compute_dtype
from ..indices import label_masks, pair_masks, to_pairs
from ._reduction import SubLoss
from .base import BaseMetricLoss, LocalAnchors, exclude_self, self_index_of


def similarity_logits(
    distance: BaseDistance, query: Tensor, ref: Tensor | None, scale: float | Tensor
) -> Tensor:
    """``distance(query, ref)`` in "larger is closer" units (distances negated), times ``scale``
    (a number, or a 0-d tensor such as CLIP's learnable scale, which then gets a gradient).

    Half-precision matrices (from autocast) are computed on in float32. The raw matrix
    is not kept: only the scaled one lives on.
    """
    mat = to_compute_dtype(distance(query, ref))
    return mat * (scale if distance.is_inverted else -scale)


class _RowLogSumExp(torch.autograd.Function):
    """Row-wise logsumexp of ``(N, M)`` logits, with the softmax as its saved gradient.

    One fused softmax kernel forward and one product backward (``torch.logsumexp``
    makes several passes both ways). ``lse = max(x) - log(max(softmax(x)))``: the
    largest probability is at least ``1/M``, so its log loses nothing. Differentiable
    once (no double backward).
    """

    @staticmethod
    def forward(ctx, logits: Tensor) -> Tensor:
        probs = torch.softmax(logits, dim=1)
        ctx.save_for_backward(probs)
        return logits.amax(dim=1) - probs.amax(dim=1).log()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        (probs,) = ctx.saved_tensors
        return probs * grad.unsqueeze(1)


def masked_logsumexp(logits: Tensor, weights: Tensor | None = None) -> Tensor:
    """Row-wise ``log(sum_k w_ik * exp(x_ik))`` of a ``(N, M)`` matrix; ``(N,)``.

    ``weights``: a boolean mask of the entries to include, or non-negative counts
    (an entry counted twice weighs twice); None includes every entry. A row with
    nothing to include gives ``-inf``, with zero (not NaN) gradients.
    """
    if weights is None:
        return _RowLogSumExp.apply(logits)
    has_any = weights.sum(dim=1) > 0
    if weights.dtype == torch.bool:
        # Excluded entries move to about -finfo.max, where exp() is exactly 0.
        penalty = weights.to(logits.dtype).sub_(1).mul_(torch.finfo(logits.dtype).max)
        logits = logits + penalty
    else:
        logits = logits + weights.to(logits.dtype).log()
    if has_any.all():
        return _RowLogSumExp.apply(logits)
    # Empty rows are computed on zeros, then set to -inf (their gradient is then 0).
    lse = _RowLogSumExp.apply(logits.masked_fill(~has_any.unsqueeze(1), 0.0))
    return lse.masked_fill(~has_any, float("-inf"))


def info_nce(
    logits: Tensor,
    rows: Tensor,
    cols: Tensor,
    candidates: Tensor | None = None,
    add_positive: bool = False,
) -> Tensor:
    """InfoNCE loss of every positive ``(rows[k], cols[k])`` of a logits matrix; ``(P,)``.

    ``loss_k = -log(exp(s_k) / Z_k)`` with ``s_k = logits[rows[k], cols[k]]`` and
    ``log Z_k`` the :func:`masked_logsumexp` of row ``rows[k]`` over ``candidates``
    (mask or counts, None for the whole row). With ``add_positive`` the positive's own
    ``exp(s_k)`` is added to ``Z_k``: the candidates are then the anchor's negatives and a
    row without any gives loss 0.
    """
    positive = logits[rows, cols]
    log_z = masked_logsumexp(logits, candidates)[rows]
    if add_positive:
        # log(exp(s) + exp(log_z)) - s, without overflow; softplus(-inf) = 0.
        return F.softplus(log_z - positive)
    return log_z - positive


def pair_counts(
    anchors: Tensor, others: Tensor, shape: tuple[int, int], dtype: torch.dtype
) -> Tensor:
    """``(N, M)`` matrix counting how often each pair appears in ``(anchors, others)``."""
    counts = torch.zeros(shape, dtype=dtype, device=anchors.device)
    ones = torch.ones(len(anchors), dtype=dtype, device=anchors.device)
    return counts.index_put_((anchors, others), ones, accumulate=True)


def too_few_pairs(num_positive_pairs: int, num_negative_pairs: int) -> bool:
    """PML's pair losses return 0 when there is at most one positive and one negative pair.

    Kept for parity: a single triplet gives 0.
    """
    return max(num_positive_pairs, num_negative_pairs) <= 1


class NTXentLoss(BaseMetricLoss):
    """Normalised temperature-scaled cross-entropy (NT-Xent, the SimCLR / InfoNCE loss).

    For self-supervised and supervised contrastive learning: each positive pair
    ``(i, j)`` is a softmax classification of ``j`` against the anchor's negatives,

        loss_ij = -log( exp(s_ij / t) / (exp(s_ij / t) + sum_{k in N(i)} exp(s_ik / t)) ),

    averaged over positive pairs. ``s`` is the cosine similarity by default (a
    distance is negated). Other positives of the anchor are not in the
    denominator (compare :class:`SupConLoss`). An anchor with no negative gives
    its pairs loss 0; a batch without positive or without negative pairs gives 0.

    Inputs: ``embeddings`` ``(B, D)``, ``labels`` ``(B,)`` (for two views of ``B/2``
    images, label each pair of views alike), optionally pairs or triplets
    ``indices_tuple`` (repeated negative pairs are counted repeatedly) and a
    reference set ``ref_emb`` ``(M, D)`` with ``ref_labels`` ``(M,)``.

    Args:
        temperature: the divisor of the similarities (unitless); smaller is sharper.

    Paper: Chen et al., "A Simple Framework for Contrastive Learning of Visual
    Representations" (SimCLR), 2020. Same values as PML's ``NTXentLoss``.

    Example::

        >>> loss_fn = NTXentLoss(temperature=0.1)
        >>> views = torch.randn(64, 128)            # two views of 32 images
        >>> loss = loss_fn(views, torch.arange(32).repeat(2))
    """

    def __init__(self, temperature: float = 0.07, **kwargs):
        super().__init__(**kwargs)
        self.temperature = temperature

    def default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    gather_mode = "local"

    def compute_loss(
        self, embeddings, labels, indices_tuple, ref_emb, ref_labels, same_set,
        local: LocalAnchors | None = None,
    ):
        shape = (len(embeddings), len(ref_emb))
        if indices_tuple is None:
            positive, negatives = label_masks(labels, ref_labels, same_set)
            exclude_self(positive, None, self_index_of(local))
            rows, cols = torch.where(positive)
            num_negatives = int(negatives.sum())
        else:
            rows, cols, a2, n = to_pairs(indices_tuple, labels, ref_labels, same_set)
            negatives = pair_counts(a2, n, shape, embeddings.dtype)
            num_negatives = len(a2)
        if local is not None:
            if len(rows) == 0:
                return {}
        elif self.too_few_pairs(len(rows), num_negatives):
            return {}
        ref = None if same_set else ref_emb
        logits = similarity_logits(self.distance, embeddings, ref, 1 / self.temperature)
        return {"loss": SubLoss(info_nce(logits, rows, cols, negatives, add_positive=True))}

    def too_few_pairs(self, num_positive: int, num_negative: int) -> bool:
        return min(num_positive, num_negative) == 0 or too_few_pairs(num_positive, num_negative)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class SupConLoss(BaseMetricLoss):
    """Supervised contrastive loss: every same-label item is a positive of the anchor.

    For supervised representation learning with labels: for anchor ``i`` with
    positives ``P(i)`` and candidates ``C(i) = P(i) + N(i)`` (every positive and
    negative, never ``i`` itself),

        loss_i = -1/|P(i)| sum_{j in P(i)} log( exp(s_ij / t) / sum_{k in C(i)} exp(s_ik / t) ),

    then averaged over the anchors with a non-zero loss (reducer ``"avg_non_zero"``).
    ``s`` is the cosine similarity by default. Anchors without positives give 0; a
    batch without any positive or any negative pair gives 0.

    Inputs: ``embeddings`` ``(B, D)``, ``labels`` ``(B,)``, optionally pairs or
    triplets ``indices_tuple`` (each distinct pair counted once; a pair may not be both
    positive and negative) and ``ref_emb`` ``(M, D)`` with ``ref_labels`` ``(M,)``.

    Args:
        temperature: the divisor of the similarities (unitless).

    Paper: Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020 (the
    "L_out" form). Same values as PML's ``SupConLoss``.

    Example::

        >>> loss_fn = SupConLoss(temperature=0.1)
        >>> embeddings, labels = torch.randn(32, 128), torch.arange(8).repeat(4)
        >>> loss = loss_fn(embeddings, labels)
    """

    default_reducer = "avg_non_zero"
    gather_mode = "local"

    def __init__(self, temperature: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.temperature = temperature

    def default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def compute_loss(
        self, embeddings, labels, indices_tuple, ref_emb, ref_labels, same_set,
        local: LocalAnchors | None = None,
    ):
        shape = (len(embeddings), len(ref_emb))
        if indices_tuple is None:
            positive, negative = label_masks(labels, ref_labels, same_set)
            exclude_self(positive, negative, self_index_of(local))
            num_pairs = int(positive.sum()), int(negative.sum())
        else:
            pairs = to_pairs(indices_tuple, labels, ref_labels, same_set)
            positive, negative = pair_masks(pairs, shape, embeddings.device)
            num_pairs = len(pairs[0]), len(pairs[2])
            if (positive & negative).any():
                raise ValueError("a pair of indices_tuple is both positive and negative")
        if local is not None:
            if num_pairs[0] == 0:
                return {}
        elif self.too_few_pairs(*num_pairs):
            return {}
        ref = None if same_set else ref_emb
        logits = similarity_logits(self.distance, embeddings, ref, 1 / self.temperature)
        rows, cols = torch.where(positive)
        per_pair = info_nce(logits, rows, cols, positive | negative)
        per_anchor = torch.zeros(shape[0], dtype=logits.dtype, device=logits.device)
        per_anchor = per_anchor.index_add(0, rows, per_pair)
        return {"loss": SubLoss(per_anchor / positive.sum(dim=1).clamp(min=1))}

    def too_few_pairs(self, num_positive: int, num_negative: int) -> bool:
        return min(num_positive, num_negative) == 0 or too_few_pairs(num_positive, num_negative)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
