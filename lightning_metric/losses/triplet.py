"""Triplet-based losses: an anchor should be closer to its positives than to its negatives.

- :class:`TripletMarginLoss` (alias :data:`TripletLoss`): hinge on
  ``d(a, p) - d(a, n) + margin`` for triplets ``(a, p, n)``.
- :class:`MarginLoss`: positive pairs inside ``beta - margin``, negative pairs
  outside ``beta + margin``, over the pairs of triplets.
- :class:`AngularLoss`: bounds the angle at the negative of each triplet.

By default all triplets of the batch are used; ``indices_tuple`` or a miner
restricts them, and ``triplets_per_anchor=k`` samples ``k`` per anchor.
Values and gradients match pytorch-metric-learning 2.9 configured the same way.

Under DDP (``gather_distributed``, see :class:`~lightning_metric.losses.BaseMetricLoss`)
:class:`TripletMarginLoss` uses each rank's items as anchors against the items of all ranks
(all triplets or a miner's); with ``triplets_per_anchor=k``, and for :class:`MarginLoss`
and :class:`AngularLoss`, every rank computes the whole gathered batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import IndicesTuple
from ..distances import LpDistance
from ..indices import label_masks, to_pairs, to_triplets
from ._all_triplets import closer, triplet_margin_all
from ._reduction import SubLoss
from .base import BaseMetricLoss, LocalAnchors, exclude_self, self_index_of


def _check_triplets_per_anchor(triplets_per_anchor: int | str) -> int | str:
    if triplets_per_anchor == "all":
        return triplets_per_anchor
    if isinstance(triplets_per_anchor, bool) or not isinstance(triplets_per_anchor, int):
        raise ValueError(
            f"triplets_per_anchor must be 'all' or a positive int, got {triplets_per_anchor!r}"
        )
    if triplets_per_anchor < 1:
        raise ValueError(f"triplets_per_anchor must be >= 1, got {triplets_per_anchor}")
    return triplets_per_anchor


class TripletMarginLoss(BaseMetricLoss):
    """Triplet margin loss: push each anchor's negatives ``margin`` farther than its positives.

    For a triplet ``(a, p, n)`` (``p`` shares ``a``'s label, ``n`` does not) the loss is
    ``relu(d(a, p) - d(a, n) + margin)`` for a distance, and
    ``relu(s(a, n) - s(a, p) + margin)`` for a similarity such as cosine. By default every
    triplet of the batch counts and the loss is the mean over the triplets whose loss is
    non-zero (``reducer="avg_non_zero"``); all triplets are reduced from the ``(B, B)``
    distance matrix, in bounded memory, without listing them.

    Paper: Weinberger & Saul, "Distance Metric Learning for Large Margin Nearest Neighbor
    Classification" (2009); Schroff et al., "FaceNet" (2015).

    Args:
        margin: how much closer positives must be than negatives, in the distance's units
            (Euclidean distance of normalised embeddings by default; cosine similarity with
            ``distance="cosine"``).
        swap: use the positive-negative distance instead of the anchor-negative one when it
            is closer (Balntas et al. 2016). With ``ref_emb`` both are reference items (PML
            2.9 reads a row of the query-to-reference matrix there instead).
        smooth_loss: ``softplus`` instead of ``relu`` (the "log-exp" triplet loss).
        triplets_per_anchor: ``"all"``, or a number of random triplets drawn per anchor.
        **kwargs: :class:`~lightning_metric.losses.base.BaseMetricLoss` options (``distance``,
            ``reducer``, ``miner``, the legacy ``distance_norm``, ``power``,
            ``avg_non_zero_only``, ...).

    Inputs: ``embeddings`` ``(B, D)``, ``labels`` ``(B,)``; optionally ``indices_tuple``
    (triplets ``(a, p, n)`` or pairs ``(a1, p, a2, n)``, turned into every triplet sharing an
    anchor) and a reference set ``ref_emb`` ``(M, D)``, ``ref_labels`` ``(M,)``.

    Example::

        >>> loss_fn = TripletMarginLoss(margin=0.2)
        >>> embeddings = torch.randn(32, 128, requires_grad=True)
        >>> loss_fn(embeddings, torch.arange(8).repeat_interleave(4)).backward()
    """

    default_reducer = "avg_non_zero"
    gather_mode = "local"

    def __init__(
        self,
        margin: float = 0.05,
        swap: bool = False,
        smooth_loss: bool = False,
        triplets_per_anchor: int | str = "all",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.margin = margin
        self.swap = swap
        self.smooth_loss = smooth_loss
        self.triplets_per_anchor = _check_triplets_per_anchor(triplets_per_anchor)
        if self.triplets_per_anchor != "all":
            # Random triplets are drawn on the whole gathered batch, on every rank.
            self.gather_mode = "global"

    def compute_loss(
        self,
        embeddings: Tensor,
        labels: Tensor | None,
        indices_tuple: IndicesTuple | None,
        ref_emb: Tensor,
        ref_labels: Tensor | None,
        same_set: bool,
        local: LocalAnchors | None = None,
    ) -> dict[str, SubLoss]:
        mat = self.distance(embeddings, None if same_set else ref_emb)
        # Positive-negative distances are between two reference items. (PML 2.9 indexes the
        # query-by-reference matrix with them, which is wrong when ref_emb is given.)
        swap_mat = None
        if self.swap:
            swap_mat = mat if same_set else self.distance(ref_emb)
        if indices_tuple is None and self.triplets_per_anchor == "all":
            positive, negative = label_masks(labels, ref_labels, same_set)
            exclude_self(positive, negative, self_index_of(local))
            split = triplet_margin_all(
                mat,
                positive,
                negative,
                self.distance,
                self.margin,
                self.smooth_loss,
                self.reducer,
                swap_mat,
            )
            return {} if split is None else {"loss": SubLoss.ratio(*split)}
        anchors, positives, negatives = to_triplets(
            indices_tuple, labels, ref_labels, same_set, self.triplets_per_anchor
        )
        if len(anchors) == 0:
            return {}
        d_ap = mat[anchors, positives]
        d_an = mat[anchors, negatives]
        if swap_mat is not None:
            d_an = closer(self.distance, d_an, swap_mat[positives, negatives])
        violation = self.distance.margin(d_ap, d_an) + self.margin
        losses = F.softplus(violation) if self.smooth_loss else F.relu(violation)
        return {"loss": SubLoss(losses)}

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, swap={self.swap}, smooth_loss={self.smooth_loss}, "
            f"triplets_per_anchor={self.triplets_per_anchor!r}, reducer={self.reducer!r}"
        )


TripletLoss = TripletMarginLoss
"""Finetuner's name: ``TripletLoss(distance="cosine", margin=0.5)``."""


class MarginLoss(BaseMetricLoss):
    """Margin loss: positives within ``beta - margin``, negatives beyond ``beta + margin``.

    Over the triplets ``(a, p, n)`` of the batch, each triplet contributes
    ``relu(d(a, p) - beta + margin) + relu(beta - d(a, n) + margin)`` (the sides swap for a
    similarity). The default reduction divides the sum by the number of non-zero pair terms
    (a pair counts once per triplet it appears in), as PML's ``DivisorReducer`` does. With
    ``learn_beta`` the boundary ``beta`` is learned (one per class with ``num_classes``) and
    ``nu * beta`` is added as a regularizer; pass ``loss.parameters()`` to an optimizer.

    Paper: Wu et al., "Sampling Matters in Deep Embedding Learning" (ICCV 2017).

    Args:
        margin: half-width of the buffer between positive and negative pairs, in the
            distance's units.
        nu: weight of the ``beta`` regularizer (used with ``learn_beta``).
        beta: the centre of the buffer, in the distance's units.
        triplets_per_anchor: ``"all"``, or a number of random triplets drawn per anchor.
        learn_beta: make ``beta`` an ``nn.Parameter``.
        num_classes: one ``beta`` per class (labels must be class indices).
        learnable_param_names: legacy spelling; ``["beta"]`` means ``learn_beta=True``.
        reducer: None or ``"divisor"`` (the default described above), or ``"mean"``,
            ``"avg_non_zero"``, ``"sum"`` over the per-triplet losses.
        **kwargs: other :class:`~lightning_metric.losses.base.BaseMetricLoss` options.

    Example::

        >>> loss_fn = MarginLoss(margin=0.2, beta=1.2, learn_beta=True)
        >>> loss_optimizer = torch.optim.SGD(loss_fn.parameters(), lr=0.01)
        >>> loss_fn(torch.randn(32, 128), torch.arange(8).repeat_interleave(4)).backward()
    """

    def __init__(
        self,
        margin: float = 0.2,
        nu: float = 0,
        beta: float = 1.2,
        triplets_per_anchor: int | str = "all",
        learn_beta: bool = False,
        num_classes: int | None = None,
        learnable_param_names: list[str] | None = None,
        reducer: str | None = None,
        **kwargs,
    ):
        divisor = reducer in (None, "divisor") and kwargs.get("avg_non_zero_only") is None
        super().__init__(reducer=None if reducer == "divisor" else reducer, **kwargs)
        if divisor:
            # Sum divided by the number of non-zero pair terms; computed in compute_loss,
            # whose terms are then all already reduced.
            self.reducer = "divisor"
        if learnable_param_names is not None:
            unknown = set(learnable_param_names) - {"beta"}
            if unknown:
                raise ValueError(f"MarginLoss can only learn 'beta', got {sorted(unknown)}")
            learn_beta = learn_beta or "beta" in learnable_param_names
        self.margin = margin
        self.nu = nu
        self.learn_beta = learn_beta
        self.triplets_per_anchor = _check_triplets_per_anchor(triplets_per_anchor)
        initial = torch.full((num_classes or 1,), float(beta))
        if learn_beta:
            self.beta = nn.Parameter(initial)
        else:
            self.register_buffer("beta", initial, persistent=False)

    def compute_loss(
        self,
        embeddings: Tensor,
        labels: Tensor | None,
        indices_tuple: IndicesTuple | None,
        ref_emb: Tensor,
        ref_labels: Tensor | None,
        same_set: bool,
    ) -> dict[str, SubLoss]:
        if len(self.beta) > 1 and labels is None:
            raise ValueError("MarginLoss with num_classes needs labels to pick each beta")
        mat = self.distance(embeddings, None if same_set else ref_emb)
        if indices_tuple is None and self.triplets_per_anchor == "all":
            return self._all_triplets(mat, labels, ref_labels, same_set)
        anchors, positives, negatives = to_triplets(
            indices_tuple, labels, ref_labels, same_set, self.triplets_per_anchor
        )
        if len(anchors) == 0:
            return {}
        beta = self._beta(None if labels is None else labels[anchors], mat.dtype)
        pos_loss, neg_loss = self._pair_losses(
            mat[anchors, positives], mat[anchors, negatives], beta
        )
        if self.reducer == "divisor":
            ones = torch.ones_like(pos_loss)
            divisor = (pos_loss > 0).sum() + (neg_loss > 0).sum()
            return self._terms(pos_loss.sum() + neg_loss.sum(), divisor, beta, ones)
        terms = {"margin_loss": SubLoss(pos_loss + neg_loss)}
        if self.learn_beta:
            reg = beta * self.nu
            terms["beta_reg_loss"] = (
                SubLoss(reg.sum(), reduced=True) if len(self.beta) == 1 else SubLoss(reg)
            )
        return terms

    def _all_triplets(
        self, mat: Tensor, labels: Tensor, ref_labels: Tensor, same_set: bool
    ) -> dict[str, SubLoss]:
        """Every triplet, from the ``(N, M)`` pair terms, without listing the triplets.

        Pair ``(a, p)`` is in one triplet per negative of ``a``, pair ``(a, n)`` in one per
        positive of ``a``: each pair term is weighted by that count.
        """
        positive, negative = label_masks(labels, ref_labels, same_set)
        n_pos = positive.sum(dim=1, keepdim=True)
        n_neg = negative.sum(dim=1, keepdim=True)
        per_anchor = n_pos * n_neg
        num_triplets = int(per_anchor.sum())
        if num_triplets == 0:
            return {}
        beta = self._beta(labels, mat.dtype).reshape(-1, 1)
        pos_loss, neg_loss = self._pair_losses(mat, mat, beta)
        pos_weight = (positive * n_neg).to(mat.dtype)
        neg_weight = (negative * n_pos).to(mat.dtype)
        total = (pos_loss * pos_weight).sum() + (neg_loss * neg_weight).sum()
        if self.reducer == "divisor":
            divisor = (pos_weight * (pos_loss > 0)).sum() + (neg_weight * (neg_loss > 0)).sum()
        elif self.reducer == "avg_non_zero":
            # A triplet's loss is zero when both its pair terms are.
            zero_pos = (positive & (pos_loss <= 0)).sum(dim=1)
            zero_neg = (negative & (neg_loss <= 0)).sum(dim=1)
            divisor = num_triplets - (zero_pos * zero_neg).sum()
        elif self.reducer == "mean":
            divisor = torch.tensor(num_triplets)
        else:
            divisor = torch.tensor(1)
        return self._terms(total, divisor, beta, per_anchor.to(mat.dtype))

    def _terms(
        self, total: Tensor, divisor: Tensor, beta: Tensor, beta_count: Tensor
    ) -> dict[str, SubLoss]:
        """The reduced margin term ``total / divisor`` (0 if no divisor) and beta regularizer.

        ``beta`` is the per-anchor (or single) beta, ``beta_count`` the number of triplets of
        each anchor: with one beta per class the regularizer is reduced over triplets.
        """
        divisor = divisor.to(total)
        terms = {"margin_loss": SubLoss(_divide_or_zero(total, divisor), reduced=True)}
        if not self.learn_beta:
            return terms
        reg = beta * self.nu
        if len(self.beta) == 1:
            terms["beta_reg_loss"] = SubLoss(reg.sum(), reduced=True)
            return terms
        if self.reducer == "avg_non_zero":
            beta_count = beta_count * (reg > 0)
        if self.reducer in ("mean", "avg_non_zero"):
            divisor = beta_count.sum()
        elif self.reducer == "sum":
            divisor = torch.ones_like(divisor)
        reg_value = _divide_or_zero((reg * beta_count).sum(), divisor)
        terms["beta_reg_loss"] = SubLoss(reg_value, reduced=True)
        return terms

    def _pair_losses(self, d_ap: Tensor, d_an: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
        pos_loss = F.relu(self.distance.margin(d_ap, beta) + self.margin)
        neg_loss = F.relu(self.distance.margin(beta, d_an) + self.margin)
        return pos_loss, neg_loss

    def _beta(self, anchor_labels: Tensor | None, dtype: torch.dtype) -> Tensor:
        """``beta`` for each anchor (per-class), or the single ``beta`` of shape ``(1,)``."""
        beta = self.beta if len(self.beta) == 1 else self.beta[anchor_labels]
        return beta.to(dtype)

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, nu={self.nu}, learn_beta={self.learn_beta}, "
            f"num_beta={len(self.beta)}, triplets_per_anchor={self.triplets_per_anchor!r}, "
            f"reducer={self.reducer!r}"
        )


class AngularLoss(BaseMetricLoss):
    """Angular loss: bound the angle at the negative of each triplet by ``alpha`` degrees.

    For a positive pair ``(a, p)`` with centre ``c = (a + p) / 2`` the loss is
    ``log(1 + sum_n exp(4 tan(alpha)^2 (a + p) . x_n - 2 (1 + tan(alpha)^2) a . p))`` over
    the reference items ``x_n`` with another label than ``a``; the mean over positive pairs is
    returned. ``a`` and ``p`` are L2-normalised; as in PML 2.9, the negatives ``x_n`` enter as
    given, so pass normalised embeddings to follow the paper exactly.

    Paper: Wang et al., "Deep Metric Learning with Angular Loss" (ICCV 2017).

    Args:
        alpha: the angle bound, in **degrees** (the paper's best is 36 to 45).
        **kwargs: :class:`~lightning_metric.losses.base.BaseMetricLoss` options; the distance
            must be the default (normalised Euclidean: ``LpDistance(p=2, power=1)``).

    Inputs: ``embeddings`` ``(B, D)``, ``labels`` ``(B,)`` (required: negatives are every item
    of another label); optionally ``indices_tuple`` (its positive pairs are used) and
    ``ref_emb`` ``(M, D)``, ``ref_labels`` ``(M,)``.

    Example::

        >>> loss_fn = AngularLoss(alpha=40)
        >>> embeddings = torch.nn.functional.normalize(torch.randn(32, 128), dim=1)
        >>> loss = loss_fn(embeddings, torch.arange(8).repeat_interleave(4))
    """

    def __init__(self, alpha: float = 40, **kwargs):
        super().__init__(**kwargs)
        dist = self.distance
        if not (
            isinstance(dist, LpDistance)
            and dist.p == 2
            and dist.power == 1
            and dist.normalize_embeddings
        ):
            raise ValueError(
                "AngularLoss needs the normalised Euclidean distance "
                f"(LpDistance(p=2, power=1, normalize_embeddings=True)), got {dist!r}"
            )
        self.alpha = alpha

    def compute_loss(
        self,
        embeddings: Tensor,
        labels: Tensor | None,
        indices_tuple: IndicesTuple | None,
        ref_emb: Tensor,
        ref_labels: Tensor | None,
        same_set: bool,
    ) -> dict[str, SubLoss]:
        if labels is None:
            raise ValueError("AngularLoss needs labels: its negatives are all other labels")
        a1, p, a2, _ = to_pairs(indices_tuple, labels, ref_labels, same_set)
        if len(a1) == 0 or len(a2) == 0:
            return {}
        query = self.distance.maybe_normalize(embeddings)
        ref_normed = query if same_set else self.distance.maybe_normalize(ref_emb)
        # (a + p) . x_n = a . x_n + p . x_n: two (N, M) products gathered per positive pair,
        # instead of one product per pair. As in PML 2.9, the x_n are not normalised.
        anchor_to_ref = query @ ref_emb.T
        positive_to_ref = anchor_to_ref if same_set else ref_normed @ ref_emb.T
        ap_dot = (query[a1] * ref_normed[p]).sum(dim=1, keepdim=True)
        sq_tan = math.tan(math.radians(self.alpha)) ** 2
        logits = (anchor_to_ref[a1] + positive_to_ref[p]).mul_(4 * sq_tan)
        logits = logits.sub_(2 * (1 + sq_tan) * ap_dot)
        negatives = labels[a1].unsqueeze(1) != ref_labels.unsqueeze(0)
        return {"loss": SubLoss(_log1p_sum_exp(logits, negatives))}

    def extra_repr(self) -> str:
        return f"alpha={self.alpha} (degrees), reducer={self.reducer!r}"


def _divide_or_zero(total: Tensor, divisor: Tensor) -> Tensor:
    """``total / divisor``, or ``0 * total`` (still connected) where ``divisor`` is 0."""
    has_divisor = divisor > 0
    safe = torch.where(has_divisor, divisor, torch.ones_like(divisor))
    return torch.where(has_divisor, total / safe, total * 0)


def _log1p_sum_exp(logits: Tensor, mask: Tensor) -> Tensor:
    """Per row ``log(1 + sum_j exp(logits[i, j]))`` over ``mask[i]``, stably (0 if empty).

    ``softplus(logsumexp(.))``; masked entries take the lowest finite value rather than
    ``-inf``, so that an empty row gives 0 with a zero (not NaN) gradient.
    """
    masked = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    return F.softplus(torch.logsumexp(masked, dim=1))
