"""Pair-based losses: every loss here looks at (anchor, positive) and (anchor, negative) pairs.

Each loss takes ``embeddings`` ``(B, D)`` and ``labels`` ``(B,)`` (or an ``indices_tuple`` of
pairs ``(a1, p, a2, n)`` or triplets ``(a, p, n)``, e.g. from a miner), optionally a reference
set ``ref_emb`` ``(M, D)`` / ``ref_labels`` ``(M,)``, and returns a scalar. Values match
pytorch-metric-learning 2.9 on the same inputs.

How the code is laid out: one ``(B, M)`` distance matrix, plus two ``(B, M)`` matrices saying
which entries are positive and negative pairs (how many times each pair is listed, for a mined
``indices_tuple``). Every formula is then an element-wise expression on the matrix followed by a
weighted reduction or a masked row-wise ``logsumexp``; no list of pairs, nor a
``(num_pos_pairs, num_neg_pairs)`` matrix, is ever built.

As in PML, a loss returns a connected zero when the pairs hold at most one positive and at most
one negative pair.

Under DDP (``gather_distributed``, see :class:`~lightning_metric.losses.BaseMetricLoss`) each
rank's items are anchors against the items of all ranks, reduced with the pair counts of all
ranks; :class:`LiftedStructureLoss` (a pair's negatives hang on two anchors) and
:class:`IntraPairVarianceLoss` (the mean of all pairs) compute the whole gathered batch on
every rank instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import IndicesTuple
from ..distances import BaseDistance, CosineSimilarity, SNRDistance
from ..indices import pair_masks, to_pairs
from ._reduction import SubLoss
from .base import BaseMetricLoss, LocalAnchors, self_index_of

__all__ = [
    "CircleLoss",
    "ContrastiveLoss",
    "GeneralizedLiftedStructureLoss",
    "IntraPairVarianceLoss",
    "LiftedStructureLoss",
    "MultiSimilarityLoss",
    "SiameseLoss",
    "SignalToNoiseRatioContrastiveLoss",
    "TupletMarginLoss",
]


# ---------------------------------------------------------------------------------------------
# Pairs as weight matrices, and the reductions every loss below is made of.


SPARSE_PAIRS = 1 / 8
"""Below this share of the ``(N, M)`` matrix, :meth:`_PairWeights.term_on` gathers the pairs."""


@dataclass
class _PairWeights:
    """Pairs of one kind (positive or negative) as an ``(N, M)`` weight matrix.

    ``weights[i, j]``: how many times the pair (query ``i``, reference ``j``) counts: 0 or 1
    for pairs from labels and for the losses that PML computes on a 0/1 mask, else how many
    times an ``indices_tuple`` lists the pair. ``binary``: every weight is 0 or 1. ``listed``:
    the number of listed pairs.

    Weights are floats in the compute dtype: masking by multiplication is many times faster
    than ``torch.where`` or ``masked_fill`` on the CPU, and every masked value here is finite.
    """

    weights: Tensor
    listed: int
    binary: bool

    def split(self, values: Tensor, reducer: str) -> tuple[Tensor, Tensor | None]:
        """PML's reduction of ``values`` (finite, >= 0) over the listed pairs, as
        ``(total, count)``: the weighted sum and what divides it (None for ``"sum"``).

        ``"mean"``: the listed pairs; ``"avg_non_zero"``: those with a loss above 0.
        """
        weighted = values * self.weights
        total = weighted.sum()
        if reducer == "sum":
            return total, None
        if reducer == "mean":
            count = self.weights.sum()
        elif self.binary:
            count = weighted.detach().count_nonzero()
        else:
            count = (self.weights * values.detach().sign()).sum()
        return total, count

    def reduce(self, values: Tensor, reducer: str) -> Tensor:
        """The reduced value: ``total / max(count, 1)`` of :meth:`split` (0, still connected to
        ``values``, when no pair counts)."""
        total, count = self.split(values, reducer)
        return total if count is None else total / count.clamp(min=1)

    def term(self, values: Tensor, reducer: str) -> SubLoss:
        """:meth:`reduce` as a term that can be split over ranks."""
        return SubLoss.ratio(*self.split(values, reducer))

    def term_on(self, mat: Tensor, loss_of: Callable[[Tensor], Tensor], reducer: str) -> SubLoss:
        """:meth:`term` of ``loss_of(mat)`` for an element-wise ``loss_of``.

        When the pairs are few (under ``SPARSE_PAIRS`` of the matrix, as label-defined
        positives usually are), ``loss_of`` and the reduction run on the pairs' entries alone:
        a handful of ``(P,)`` vectors instead of ``(N, M)`` matrices.
        """
        if self.listed >= SPARSE_PAIRS * self.weights.numel():
            return self.term(loss_of(mat), reducer)
        rows, cols = self.weights.nonzero(as_tuple=True)
        listed = _PairWeights(self.weights[rows, cols], self.listed, self.binary)
        return listed.term(loss_of(mat[rows, cols]), reducer)

    def mean(self, values: Tensor) -> Tensor:
        return self.reduce(values, "mean")

    def logsumexp(self, logits: Tensor) -> Tensor:
        """Per row, ``log(sum_j weights_ij * exp(logits_ij))`` over the row's pairs.

        Rows without pairs give a hugely negative (finite) number, so that adding them to a
        ``logaddexp`` changes nothing and no gradient turns into NaN.
        """
        huge = torch.finfo(logits.dtype).max
        if self.binary:
            log_weights = (self.weights - 1) * huge  # 0 where kept, -huge where masked
        else:
            log_weights = self.weights.log().clamp(min=-huge)
        return _logsumexp_rows(logits + log_weights)

    def row_logsumexp(self, logits: Tensor, add_one: bool = False) -> Tensor:
        """PML's ``logsumexp`` over each row's pairs: 0 for rows without pairs.

        ``add_one`` adds an ``exp(0)`` term: ``log(1 + sum_j exp(logits_ij))``.
        """
        lse = self.logsumexp(logits)
        if add_one:
            return torch.logaddexp(lse, torch.zeros_like(lse))
        return lse * self.rows_with_pairs()

    def rows_with_pairs(self) -> Tensor:
        """``(N,)`` float: 1 for the rows with at least one pair, else 0."""
        return (self.weights.amax(dim=1) > 0).to(self.weights.dtype)


@dataclass
class _Pairs:
    """The positive and the negative pairs a loss uses."""

    pos: _PairWeights
    neg: _PairWeights


def _select_pairs(
    indices_tuple: IndicesTuple | None,
    labels: Tensor | None,
    ref_labels: Tensor | None,
    same_set: bool,
    shape: tuple[int, int],
    like: Tensor,
    counts: bool,
    self_index: Tensor | None = None,
) -> _Pairs:
    """All label-defined pairs, or the pairs of ``indices_tuple`` (triplets become pairs).

    ``counts``: a pair listed twice counts twice (else once). ``self_index``: each query's
    own column in the reference set, not a pair (for label-defined pairs).
    """
    if indices_tuple is None:
        return _label_pairs(labels, ref_labels, same_set, like.dtype, self_index)
    a1, p, a2, n = to_pairs(indices_tuple, labels, ref_labels, same_set)
    if counts:
        pos, neg = _count_matrix(a1, p, shape, like), _count_matrix(a2, n, shape, like)
        binary = not bool(torch.maximum(pos.amax(), neg.amax()) > 1)
    else:
        pos, neg = pair_masks((a1, p, a2, n), shape, like.device)
        if bool((pos & neg).any()):
            raise ValueError("indices_tuple lists a pair both as positive and as negative")
        pos, neg, binary = pos.to(like.dtype), neg.to(like.dtype), True
    return _Pairs(_PairWeights(pos, len(a1), binary), _PairWeights(neg, len(a2), binary))


def _label_pairs(
    labels: Tensor, ref_labels: Tensor, same_set: bool, dtype, self_index: Tensor | None = None
) -> _Pairs:
    """Every pair: positive when the labels match (an item is not its own positive, nor its
    copy at ``self_index`` in the reference set)."""
    same = labels[:, None] == ref_labels[None, :]
    n_same = int(same.count_nonzero())
    n_own = len(labels) if same_set else (0 if self_index is None else len(self_index))
    same = same.to(dtype)
    neg = _PairWeights(1 - same, same.numel() - n_same, binary=True)
    n_pos = n_same - n_own
    if same_set:
        same.fill_diagonal_(0)
    elif self_index is not None:
        same[torch.arange(len(labels), device=same.device), self_index] = 0
    return _Pairs(_PairWeights(same, n_pos, binary=True), neg)


def _count_matrix(rows: Tensor, cols: Tensor, shape: tuple[int, int], like: Tensor) -> Tensor:
    """``(N, M)`` matrix of how many times each ``(row, col)`` pair is listed."""
    counts = torch.zeros(shape, dtype=like.dtype, device=like.device)
    ones = torch.ones(len(rows), dtype=like.dtype, device=like.device)
    return counts.index_put_((rows, cols), ones, accumulate=True)


def _logsumexp_rows(x: Tensor) -> Tensor:
    """``log(sum_j exp(x_ij))`` per row, shifted by the row's maximum for stability."""
    shift = x.detach().amax(dim=1, keepdim=True)
    return (x - shift).exp().sum(dim=1).log() + shift[:, 0]


def _hinge(x: Tensor) -> Tensor:
    """``relu(x)`` for a fresh temporary ``x`` (in place: one ``(N, M)`` buffer fewer)."""
    return F.relu(x, inplace=True)


def _reduced(value: Tensor) -> SubLoss:
    return SubLoss(value, reduced=True)


class _PairLoss(BaseMetricLoss):
    """Builds the pairs and the distance matrix; a subclass writes :meth:`pair_loss`.

    ``counts_duplicates``: whether a pair listed twice in an ``indices_tuple`` counts twice
    (PML's pair-based losses) or once (PML's matrix-based losses).
    """

    counts_duplicates = True
    gather_mode = "local"

    def compute_loss(
        self, embeddings, labels, indices_tuple, ref_emb, ref_labels, same_set,
        local: LocalAnchors | None = None,
    ):
        shape = (len(embeddings), len(ref_emb))
        pairs = _select_pairs(
            indices_tuple, labels, ref_labels, same_set, shape, embeddings,
            self.counts_duplicates, self_index_of(local),
        )
        if local is None and self.too_few_pairs(pairs.pos.listed, pairs.neg.listed):
            return {}
        mat = self.distance(embeddings, None if same_set else ref_emb)
        return self.pair_loss(mat, pairs)

    def too_few_pairs(self, num_positive: int, num_negative: int) -> bool:
        """PML's rule: at most one positive and at most one negative pair means no loss."""
        return num_positive <= 1 and num_negative <= 1

    def pair_loss(self, mat: Tensor, pairs: _Pairs) -> dict[str, SubLoss]:
        """The loss terms from the ``(N, M)`` distance matrix and the pairs."""
        raise NotImplementedError


def _require_distance(loss: BaseMetricLoss, kind: type[BaseDistance]) -> None:
    if not isinstance(loss.distance, kind):
        raise ValueError(
            f"{type(loss).__name__} requires distance to be a {kind.__name__}, got "
            f"{type(loss.distance).__name__}"
        )


# ---------------------------------------------------------------------------------------------
# Contrastive losses.


class ContrastiveLoss(_PairLoss):
    """Pull positive pairs within ``pos_margin``, push negative pairs beyond ``neg_margin``.

    The classic siamese loss (Hadsell, Chopra & LeCun, "Dimensionality Reduction by Learning an
    Invariant Mapping", CVPR 2006). With a distance ``d`` (default: Euclidean on L2-normalised
    embeddings)::

        pos_loss(a, p) = relu(d(a, p) - pos_margin) ** power
        neg_loss(a, n) = relu(neg_margin - d(a, n)) ** power

    With a similarity (``distance="cosine"``) the inequalities flip: positives are pulled above
    ``pos_margin``, negatives pushed below ``neg_margin`` (so use e.g. ``pos_margin=1,
    neg_margin=0``). Margins are in the distance's own units. The positive and negative terms are
    each reduced with the reducer (default ``"avg_non_zero"``: mean over pairs with a non-zero
    loss) and summed.

    Args:
        pos_margin: distance (similarity) above (below) which positive pairs are penalised.
        neg_margin: distance (similarity) below (above) which negative pairs are penalised.
        use_similarity: legacy PML option; ``True`` compares with the dot product of
            L2-normalised embeddings (cosine similarity) instead of the Euclidean distance.
        power: legacy PML option; each pair's loss is raised to this power.
        **kwargs: :class:`~lightning_metric.losses.base.BaseMetricLoss` options (``distance``,
            ``reducer``, ``miner``, ``embedding_regularizer``, ...).

    Inputs: ``embeddings`` ``(B, D)``, ``labels`` ``(B,)``; optional ``indices_tuple``,
    ``ref_emb`` ``(M, D)``, ``ref_labels`` ``(M,)``. Output: a scalar.

    Example::

        >>> loss_fn = ContrastiveLoss(distance="cosine", pos_margin=1, neg_margin=0.5)
        >>> loss = loss_fn(torch.randn(32, 128), torch.arange(8).repeat_interleave(4))
        >>> loss.backward()
    """

    default_reducer = "avg_non_zero"
    local_terms = ("pos_loss", "neg_loss")

    def __init__(
        self,
        pos_margin: float = 0,
        neg_margin: float = 1,
        use_similarity: bool = False,
        power: float = 1,
        **kwargs,
    ):
        if use_similarity:
            if kwargs.get("distance") is not None:
                raise ValueError("pass either use_similarity=True or a distance, not both")
            kwargs["distance"] = "dot"
        super().__init__(**kwargs)
        self.pos_margin = pos_margin
        self.neg_margin = neg_margin
        self.power = power

    def pair_loss(self, mat, pairs):
        return {
            "pos_loss": pairs.pos.term_on(mat, self._positive_loss, self.reducer),
            "neg_loss": pairs.neg.term_on(mat, self._negative_loss, self.reducer),
        }

    def _positive_loss(self, distances: Tensor) -> Tensor:
        return self._powered(_hinge(self.distance.margin(distances, self.pos_margin)))

    def _negative_loss(self, distances: Tensor) -> Tensor:
        return self._powered(_hinge(self.distance.margin(self.neg_margin, distances)))

    def _powered(self, losses: Tensor) -> Tensor:
        return losses if self.power == 1 else losses**self.power


SiameseLoss = ContrastiveLoss
"""Finetuner's name for :class:`ContrastiveLoss`."""


class SignalToNoiseRatioContrastiveLoss(ContrastiveLoss):
    """:class:`ContrastiveLoss` with the signal-to-noise-ratio distance.

    The distance from ``a`` to ``b`` is ``var(a - b) / var(a)``: the noise's variance over the
    signal's (Yuan et al., "Signal-To-Noise Ratio: A Robust Distance Metric for Deep Metric
    Learning", CVPR 2019). Margins are noise-to-signal ratios. The distance must be a
    :class:`~lightning_metric.distances.SNRDistance` (the default).

    Args:
        pos_margin: noise-to-signal ratio above which positive pairs are penalised.
        neg_margin: noise-to-signal ratio below which negative pairs are penalised.
        regularizer_weight: legacy PML option; adds ``regularizer_weight`` times the mean of
            ``|sum_j x_ij|`` (pushing embeddings towards zero mean), i.e. the same as
            ``embedding_regularizer="zero_mean", embedding_reg_weight=regularizer_weight``.
        **kwargs: :class:`ContrastiveLoss` options.

    Example::

        >>> loss_fn = SignalToNoiseRatioContrastiveLoss(neg_margin=1.0)
        >>> loss = loss_fn(torch.randn(32, 128), torch.arange(8).repeat_interleave(4))
        >>> loss.backward()
    """

    def __init__(
        self,
        pos_margin: float = 0,
        neg_margin: float = 1,
        regularizer_weight: float | None = None,
        **kwargs,
    ):
        if regularizer_weight is not None:
            if kwargs.get("embedding_regularizer") is not None:
                raise ValueError("pass either regularizer_weight or embedding_regularizer")
            kwargs["embedding_regularizer"] = "zero_mean"
            kwargs["embedding_reg_weight"] = regularizer_weight
        super().__init__(pos_margin=pos_margin, neg_margin=neg_margin, **kwargs)
        _require_distance(self, SNRDistance)

    def default_distance(self) -> BaseDistance:
        return SNRDistance()


# ---------------------------------------------------------------------------------------------
# Lifted structure losses.


class LiftedStructureLoss(_PairLoss):
    """Each positive pair against every negative pair that touches it, through a soft maximum.

    From Oh Song et al., "Deep Metric Learning via Lifted Structured Feature Embedding"
    (CVPR 2016). For a positive pair ``(a, p)`` with distance ``d_ap``, and ``K`` the negative
    pairs anchored at ``a`` or at ``p``::

        lse(a, p)  = log(sum_{(i, n) in K} exp(neg_margin - d_in))
        loss(a, p) = relu(lse(a, p) + d_ap - pos_margin) ** 2 / 2

    (for a similarity, the signs of ``d`` flip). Reduced over positive pairs with the reducer
    (default ``"mean"``). Default distance: Euclidean on L2-normalised embeddings.

    As in PML, with a reference set the positive ``p`` (a reference index) also selects the
    negative pairs anchored at query row ``p``.

    Args:
        neg_margin: the margin inside ``exp(neg_margin - d)``.
        pos_margin: subtracted from the positive pair's distance.

    Example::

        >>> loss_fn = LiftedStructureLoss(neg_margin=1.0)
        >>> loss = loss_fn(torch.randn(32, 128), torch.arange(8).repeat_interleave(4))
        >>> loss.backward()
    """

    gather_mode = "global"  # a pair's negatives are anchored at two items

    def __init__(self, neg_margin: float = 1, pos_margin: float = 0, **kwargs):
        super().__init__(**kwargs)
        self.neg_margin = neg_margin
        self.pos_margin = pos_margin

    def pair_loss(self, mat, pairs):
        if pairs.pos.listed == 0 or pairs.neg.listed == 0:
            return {}
        row_lse = pairs.neg.logsumexp(self.distance.margin(self.neg_margin, mat))
        # Negatives of pair (a, p): those anchored at a (row a) and those anchored at p (row p).
        neg_lse = _lse_of_anchor_and_positive(row_lse, pairs.neg.rows_with_pairs(), mat.shape[1])
        per_pair = _hinge(neg_lse + self.distance.margin(mat, self.pos_margin)).square() / 2
        return {"loss": _reduced(pairs.pos.reduce(per_pair, self.reducer))}


def _lse_of_anchor_and_positive(row_lse: Tensor, row_has: Tensor, n_ref: int) -> Tensor:
    """``(N, M)``: logsumexp over the union of row ``a``'s and row ``p``'s terms, 0 if none.

    ``row_lse`` ``(N,)``: each row's logsumexp (hugely negative when empty); ``row_has``: 1 where
    the row has any term, else 0. Reference index ``p`` reads query row ``p`` (none when
    ``p >= N``); when ``p == a`` the row counts once.
    """
    n_query = len(row_lse)
    shared = min(n_query, n_ref)
    col_lse = row_lse.new_full((n_ref,), torch.finfo(row_lse.dtype).min)
    col_lse[:shared] = row_lse[:shared]
    col_has = row_has.new_zeros(n_ref)
    col_has[:shared] = row_has[:shared]
    union = torch.logaddexp(row_lse[:, None], col_lse[None, :])
    # On the diagonal (p == a) the row was added to itself: logaddexp(x, x) = x + log 2.
    union = union - math.log(2) * torch.eye(n_query, n_ref, dtype=union.dtype, device=union.device)
    has_any = torch.maximum(row_has[:, None], col_has[None, :])
    return union * has_any


class GeneralizedLiftedStructureLoss(_PairLoss):
    """A soft hardest-positive minus soft hardest-negative loss for each anchor.

    The "generalized lifted structure" loss of Hermans, Beyer & Leibe, "In Defense of the
    Triplet Loss for Person Re-Identification" (2017), page 4. For each anchor ``a``::

        loss(a) = relu(log(sum_p exp(d_ap - pos_margin)) + log(sum_n exp(neg_margin - d_an)))

    (a row without positives or without negatives contributes 0 for that part; for a similarity
    the signs of ``d`` flip). Reduced over all anchors with the reducer (default ``"mean"``).
    Default distance: Euclidean on L2-normalised embeddings.

    Args:
        neg_margin: the margin in ``exp(neg_margin - d_an)``.
        pos_margin: the margin in ``exp(d_ap - pos_margin)``.

    Example::

        >>> loss_fn = GeneralizedLiftedStructureLoss(neg_margin=1.0)
        >>> loss = loss_fn(torch.randn(32, 128), torch.arange(8).repeat_interleave(4))
        >>> loss.backward()
    """

    counts_duplicates = False

    def __init__(self, neg_margin: float = 1, pos_margin: float = 0, **kwargs):
        super().__init__(**kwargs)
        self.neg_margin = neg_margin
        self.pos_margin = pos_margin

    def pair_loss(self, mat, pairs):
        pos_logits = self.distance.margin(mat, self.pos_margin)
        neg_logits = self.distance.margin(self.neg_margin, mat)
        pos_lse = pairs.pos.row_logsumexp(pos_logits)
        neg_lse = pairs.neg.row_logsumexp(neg_logits)
        return {"loss": SubLoss(F.relu(pos_lse + neg_lse))}


# ---------------------------------------------------------------------------------------------
# Similarity-weighted losses.


class MultiSimilarityLoss(_PairLoss):
    """Weights each pair by how hard it is relative to the anchor's other pairs.

    From Wang et al., "Multi-Similarity Loss with General Pair Weighting for Deep Metric
    Learning" (CVPR 2019). With cosine similarities ``s`` (the default distance), for each
    anchor ``a``::

        loss(a) = 1/alpha * log(1 + sum_p exp(-alpha * (s_ap - base)))
                + 1/beta  * log(1 + sum_n exp( beta * (s_an - base)))

    Reduced over all anchors with the reducer (default ``"mean"``).

    Args:
        alpha: the scale of positive pairs.
        beta: the scale of negative pairs.
        base: the similarity both kinds of pairs are compared against.

    Example::

        >>> loss_fn = MultiSimilarityLoss(alpha=2, beta=50, base=0.5)
        >>> loss = loss_fn(torch.randn(32, 128), torch.arange(8).repeat_interleave(4))
        >>> loss.backward()
    """

    counts_duplicates = False

    def __init__(self, alpha: float = 2, beta: float = 50, base: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.alpha = alpha
        self.beta = beta
        self.base = base

    def default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def pair_loss(self, mat, pairs):
        pos_logits = self.alpha * self.distance.margin(mat, self.base)
        neg_logits = self.beta * self.distance.margin(self.base, mat)
        pos_loss = pairs.pos.row_logsumexp(pos_logits, add_one=True) / self.alpha
        neg_loss = pairs.neg.row_logsumexp(neg_logits, add_one=True) / self.beta
        return {"loss": SubLoss(pos_loss + neg_loss)}


class CircleLoss(_PairLoss):
    """Re-weights each similarity by its distance from its optimum, on a circular boundary.

    From Sun et al., "Circle Loss: A Unified Perspective of Pair Similarity Optimization"
    (CVPR 2020). With cosine similarities ``s`` (required), for each anchor ``a``::

        logit_p = -gamma * relu(1 + m - s_ap) * (s_ap - (1 - m))
        logit_n =  gamma * relu(s_an + m) * (s_an - m)
        loss(a) = softplus(logsumexp_p(logit_p) + logsumexp_n(logit_n))

    The ``relu(...)`` weights are constants (no gradient flows through them). Anchors without a
    positive or without a negative give 0. Reduced with the reducer (default
    ``"avg_non_zero"``). The paper suggests ``m=0.25, gamma=256`` for faces, ``m=0.25,
    gamma=128`` for person re-identification, ``m=0.4, gamma=80`` (default) for fine-grained
    image retrieval.

    Args:
        m: the relaxation margin (cosine units).
        gamma: the scale.
        triplets_per_anchor: legacy option listed in old PML docs; the loss always uses all
            pairs, so only ``"all"`` is accepted.

    Example::

        >>> loss_fn = CircleLoss(m=0.25, gamma=256)
        >>> loss = loss_fn(torch.randn(32, 128), torch.arange(8).repeat_interleave(4))
        >>> loss.backward()
    """

    counts_duplicates = False
    default_reducer = "avg_non_zero"

    def __init__(
        self, m: float = 0.4, gamma: float = 80, triplets_per_anchor: str = "all", **kwargs
    ):
        if triplets_per_anchor != "all":
            raise ValueError(
                "CircleLoss uses all pairs: triplets_per_anchor must be 'all', got "
                f"{triplets_per_anchor!r}; pass a miner to select pairs"
            )
        super().__init__(**kwargs)
        _require_distance(self, CosineSimilarity)
        self.m = m
        self.gamma = gamma

    def default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def pair_loss(self, mat, pairs):
        sim = mat.detach()
        pos_logits = -self.gamma * F.relu(1 + self.m - sim) * (mat - (1 - self.m))
        neg_logits = self.gamma * F.relu(sim + self.m) * (mat - self.m)
        pos_lse = pairs.pos.row_logsumexp(pos_logits)
        neg_lse = pairs.neg.row_logsumexp(neg_logits)
        has_both = pairs.pos.rows_with_pairs() * pairs.neg.rows_with_pairs()
        losses = F.softplus(pos_lse + neg_lse) * has_both
        return {"loss": SubLoss(losses)}


# ---------------------------------------------------------------------------------------------
# Tuplet margin and intra-pair variance (used together in the paper).


class TupletMarginLoss(_PairLoss):
    """Each positive pair, made harder by an angular margin, against the anchor's negatives.

    From Yu & Tao, "Deep Metric Learning with Tuplet Margin Loss" (ICCV 2019). With cosine
    similarities ``s`` (required) and ``theta_ap = acos(s_ap)``, for each positive pair::

        loss(a, p) = log(1 + sum_n exp(scale * (s_an - cos(theta_ap - margin))))

    over the negative pairs anchored at ``a``; reduced over positive pairs with the reducer
    (default ``"mean"``). The paper adds :class:`IntraPairVarianceLoss` with weight 0.5.

    Unlike PML, the positive cosine is clipped to ``[-1 + eps, 1 - eps]`` before ``acos``, so
    identical positive embeddings give a finite gradient instead of NaN.

    Args:
        margin: the angular margin, in **degrees** (the paper's 0.1 rad is 5.73 degrees).
        scale: the multiplier inside the exponential (an inverse temperature).

    Example::

        >>> loss_fn = TupletMarginLoss(margin=5.73, scale=64)
        >>> loss = loss_fn(torch.randn(32, 128), torch.arange(8).repeat_interleave(4))
        >>> loss.backward()
    """

    def __init__(self, margin: float = 5.73, scale: float = 64, **kwargs):
        super().__init__(**kwargs)
        _require_distance(self, CosineSimilarity)
        self.margin = margin
        self.scale = scale

    @property
    def margin_radians(self) -> float:
        return math.radians(self.margin)

    def default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def too_few_pairs(self, num_positive: int, num_negative: int) -> bool:
        return min(num_positive, num_negative) == 0 or super().too_few_pairs(
            num_positive, num_negative
        )

    def pair_loss(self, mat, pairs):
        eps = torch.finfo(mat.dtype).eps
        angle = torch.acos(mat.clamp(-1 + eps, 1 - eps))
        pos_with_margin = torch.cos(angle - self.margin_radians)
        neg_lse = pairs.neg.logsumexp(self.scale * mat)
        logits = neg_lse[:, None] - self.scale * pos_with_margin
        per_pair = torch.logaddexp(logits, torch.zeros_like(logits))
        return {"loss": pairs.pos.term(per_pair, self.reducer)}


class IntraPairVarianceLoss(_PairLoss):
    """Penalises positive (and negative) pairs that stray from the batch's average pair.

    From Yu & Tao, "Deep Metric Learning with Tuplet Margin Loss" (ICCV 2019), eq. 15. With
    cosine similarities ``s`` (the default distance) and ``mu_pos`` / ``mu_neg`` the mean
    similarity of all positive / negative pairs::

        pos_loss(a, p) = relu((1 - pos_eps) * mu_pos - s_ap) ** 2
        neg_loss(a, n) = relu(s_an - (1 + neg_eps) * mu_neg) ** 2

    (for a distance the roles of the two forms swap). Each term is reduced with the reducer
    (default ``"mean"``) and the two are summed. Usually added to :class:`TupletMarginLoss`.

    Args:
        pos_eps: the slack on the positive pairs' mean.
        neg_eps: the slack on the negative pairs' mean.

    Example::

        >>> loss_fn = IntraPairVarianceLoss(pos_eps=0.01, neg_eps=0.01)
        >>> loss = loss_fn(torch.randn(32, 128), torch.arange(8).repeat_interleave(4))
        >>> loss.backward()
    """

    gather_mode = "global"  # every pair is compared with the mean of all pairs

    def __init__(self, pos_eps: float = 0.01, neg_eps: float = 0.01, **kwargs):
        super().__init__(**kwargs)
        self.pos_eps = pos_eps
        self.neg_eps = neg_eps

    def default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def pair_loss(self, mat, pairs):
        inverted = self.distance.is_inverted
        terms = {}
        if pairs.pos.listed > 0:
            terms["pos_loss"] = self._term(mat, pairs.pos, self.pos_eps, push_up=inverted)
        if pairs.neg.listed > 0:
            terms["neg_loss"] = self._term(mat, pairs.neg, self.neg_eps, push_up=not inverted)
        return terms

    def _term(self, mat: Tensor, pairs: _PairWeights, eps: float, push_up: bool) -> SubLoss:
        spread = _spread_from_mean(mat, pairs.mean(mat), eps, push_up)
        return _reduced(pairs.reduce(_hinge(spread).square(), self.reducer))


def _spread_from_mean(values: Tensor, mean: Tensor, eps: float, push_up: bool) -> Tensor:
    """How far each value falls short of (``push_up``) or exceeds the slackened mean."""
    if push_up:
        return (1 - eps) * mean - values
    return values - (1 + eps) * mean
