"""The base class of losses on labelled embeddings.

``loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)``
returns a scalar. The base class validates the inputs, runs the miner, casts
half-precision inputs to float32, adds the embedding regularizer and reduces;
a subclass's :meth:`compute_loss` holds only its formula.

Under ``torch.distributed`` (DDP, torchrun, Lightning's ``ddp`` strategy) an in-batch loss
gathers every rank's batch (``gather_distributed``), so that ``W`` ranks of ``B / W`` items
give the loss value and the encoder gradients of one batch of ``B``: see
:class:`BaseMetricLoss` and :mod:`lightning_metric.distributed`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._checks import IndicesTuple, check_inputs
from ..distances import BaseDistance, LpDistance, get_distance, to_compute_dtype
from ..distributed import all_reduce_sum, gather_no_grad, gather_with_grad, resolve_gather
from ..miners import BaseMiner
from ..regularizers import get_regularizer
from ._reduction import SubLoss, check_reducer, connected_zero, reduce_all

Miner = Callable[..., IndicesTuple]

GATHER_MODES = ("local", "global", None)


@dataclass
class LocalAnchors:
    """Passed to :meth:`BaseMetricLoss.compute_loss` when a loss is split over ranks.

    The queries are this rank's items, the reference set every rank's items (or the
    caller's ``ref_emb``). ``self_index`` ``(B,)``: the column of each query's own copy in
    the reference set (None when the reference set holds none); it is neither a positive
    nor a negative of its query. The loss must not apply its "too few pairs" rule: the
    base class applies :meth:`BaseMetricLoss.too_few_pairs` to the pairs of all ranks.
    """

    self_index: Tensor | None


def self_index_of(local: LocalAnchors | None) -> Tensor | None:
    """The queries' own columns in the reference set, or None (not split, or no copies)."""
    return None if local is None else local.self_index


def exclude_self(positive: Tensor, negative: Tensor | None, self_index: Tensor | None) -> None:
    """Clear, in place, each query's own column ``self_index[i]`` in the ``(N, M)`` masks."""
    if self_index is None:
        return
    rows = torch.arange(len(self_index), device=positive.device)
    positive[rows, self_index] = False
    if negative is not None:
        negative[rows, self_index] = False


def drop_self_pairs(tuples: IndicesTuple, self_index: Tensor) -> IndicesTuple:
    """Drop positives that are the anchor's own copy in the reference set (negatives never
    are: the copy has the anchor's label). For miners that cannot take ``ref_self_index``."""
    anchors, positives = tuples[0], tuples[1]
    keep = positives != self_index[anchors]
    if len(tuples) == 3:
        return tuple(t[keep] for t in tuples)
    return anchors[keep], positives[keep], tuples[2], tuples[3]


def _shift_references(tuples: IndicesTuple, offset: int) -> IndicesTuple:
    """Reference indices of a local ``indices_tuple`` moved to this rank's rows of the gather."""
    if len(tuples) == 3:
        a, p, n = tuples
        return a, p + offset, n + offset
    a1, p, a2, n = tuples
    return a1, p + offset, a2, n + offset


class BaseMetricLoss(nn.Module):
    """Embeddings and labels in, scalar loss out.

    Args:
        distance: a name (``"cosine"``, ``"dot"``, ``"euclidean"``, ``"snr"``) or a
            :class:`~lightning_metric.distances.BaseDistance`; default: the loss's own.
        reducer: ``"mean"``, ``"avg_non_zero"`` or ``"sum"``; default: the loss's own.
        miner: called as ``miner(embeddings, labels, ref_emb, ref_labels)`` when no
            ``indices_tuple`` is passed; its pairs or triplets are the ones used. When
            gathering, this rank's items against every rank's (a
            :class:`~lightning_metric.miners.BaseMiner` also gets ``ref_self_index``).
        embedding_regularizer: ``"lp"``, ``"zero_mean"``, a module mapping ``(N, D)`` to a
            scalar, or None.
        embedding_reg_weight: multiplies the regularizer's value.
        normalize_embeddings: legacy PML option, sets the distance's normalisation.
        distance_norm: legacy PML option, sets ``p`` of an Lp distance.
        power: legacy PML option, raises distances to this power.
        avg_non_zero_only: legacy PML option; ``True`` means ``"avg_non_zero"``,
            ``False`` means ``"mean"``.
        gather_distributed: under ``torch.distributed``, compare this rank's items with every
            rank's batch; ``None`` (default): on when a process group with more than one rank
            is initialised, ``True``: always (``RuntimeError`` without a process group),
            ``False``: never (each rank's batch on its own, as before).

    Distributed training (``gather_distributed``): each rank all-gathers the embeddings
    ``(B_r, D)`` and labels ``(B_r,)`` of every rank (batches may differ in size) with a
    gather that sends gradients back to their owner
    (:func:`~lightning_metric.distributed.gather_with_grad`), so that after DDP averages the
    ranks' gradients the encoder's gradient, and on every rank the returned value, equal
    those of one process on the concatenated batch ``(sum_r B_r, D)`` (exactly, up to
    rounding). How a loss is split is its ``gather_mode``:

    - ``"local"`` (pair, triplet, InfoNCE losses, whose terms belong to one anchor): this
      rank's items are the anchors, every rank's items the candidates (an anchor's own copy
      excluded); a miner mines the same way (``ref_self_index``). Each rank reduces its
      terms with the counts of all ranks (pairs, triplets, non-zero losses), the idea of
      PML's ``DistributedLossWrapper(efficient=True)`` made exact. Memory and compute per
      rank: ``(B_r, sum_r B_r)``.
    - ``"global"`` (losses whose terms mix anchors: lifted structure, FastAP, NCA, ...):
      every rank computes the loss on the whole gathered batch, ``(sum B_r, sum B_r)``.
      Such a loss takes no ``ref_emb`` nor ``indices_tuple`` when gathering (pass it a
      miner): ``gather_distributed=None`` leaves it off for such a call, ``True`` refuses.
    - ``None`` (losses against learned class weights): nothing to gather; DDP already syncs
      their weights. ``gather_distributed=True`` is refused.

    Every rank must call the loss (and backward) the same number of times, as with any DDP
    collective (a rank with more batches than the others waits forever). The loss's own
    parameters, if any, must be averaged over ranks like DDP does (put the loss in the
    DDP-wrapped module, as :class:`~lightning_metric.module.MetricLearningModule` does).
    A ``ref_emb`` given while gathering (e.g. by
    :class:`~lightning_metric.losses.CrossBatchMemory`, which enqueues the gathered batch)
    is used as it is. An ``indices_tuple`` given while gathering indexes this rank's batch
    (its anchors' candidates are then this rank's items only): to mine every rank's items,
    give the loss the miner (``miner=``), which then mines the gathered batch.
    """

    default_reducer = "mean"
    gather_mode: str | None = "global"
    """How the loss is split over ranks when gathering: ``"local"``, ``"global"`` or None."""
    local_terms: tuple[str, ...] = ("loss",)
    """Names of the terms :meth:`compute_loss` may return in ``"local"`` mode."""

    def __init__(
        self,
        distance: str | BaseDistance | None = None,
        reducer: str | None = None,
        miner: Miner | None = None,
        embedding_regularizer: str | nn.Module | None = None,
        embedding_reg_weight: float = 1.0,
        normalize_embeddings: bool | None = None,
        distance_norm: float | None = None,
        power: float | None = None,
        avg_non_zero_only: bool | None = None,
        gather_distributed: bool | None = None,
    ):
        super().__init__()
        if gather_distributed and self.gather_mode is None:
            raise ValueError(
                f"{type(self).__name__} compares embeddings with its learned class weights, not "
                "with other items of the batch: it has nothing to gather "
                "(gather_distributed=True); DDP keeps its weights in sync"
            )
        self.gather_distributed = gather_distributed
        self.distance = self._resolve_distance(distance, normalize_embeddings, distance_norm, power)
        if reducer is None and avg_non_zero_only is not None:
            reducer = "avg_non_zero" if avg_non_zero_only else "mean"
        self.reducer = check_reducer(reducer or self.default_reducer)
        self.miner = miner
        self.embedding_regularizer = get_regularizer(embedding_regularizer)
        self.embedding_reg_weight = embedding_reg_weight

    def default_distance(self) -> BaseDistance:
        return LpDistance()

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        indices_tuple: IndicesTuple | None = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        """Loss of ``embeddings`` ``(B, D)`` with ``labels`` ``(B,)``.

        ``indices_tuple``: pairs ``(a1, p, a2, n)`` or triplets ``(a, p, n)`` to use instead of
        all of them. ``ref_emb`` ``(M, D)`` with ``ref_labels`` ``(M,)``: compare the batch with
        this reference set instead of with itself.
        """
        labels, ref_labels = check_inputs(embeddings, labels, ref_emb, ref_labels, indices_tuple)
        if self._gathers(ref_emb is not None, indices_tuple is not None):
            return self._gathered_forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if indices_tuple is None and self.miner is not None:
            indices_tuple = self.miner(embeddings, labels, ref_emb, ref_labels)
        same_set = ref_emb is None
        # Margins, scales and exponentials amplify half-precision rounding: compute in float32
        # (or float64) whatever autocast would choose.
        with torch.autocast(embeddings.device.type, enabled=False):
            emb = to_compute_dtype(embeddings)
            ref = emb if same_set else to_compute_dtype(ref_emb)
            ref_labels = labels if same_set else ref_labels
            terms = self.compute_loss(emb, labels, indices_tuple, ref, ref_labels, same_set)
            if self.embedding_regularizer is not None:
                reg = self.embedding_regularizer(emb) * self.embedding_reg_weight
                terms["embedding_reg_loss"] = SubLoss(reg, reduced=True)
            return reduce_all(terms, self.reducer, lambda: connected_zero(emb, *self.parameters()))

    def compute_loss(
        self,
        embeddings: Tensor,
        labels: Tensor | None,
        indices_tuple: IndicesTuple | None,
        ref_emb: Tensor,
        ref_labels: Tensor | None,
        same_set: bool,
    ) -> dict[str, SubLoss]:
        """The loss's terms, before reduction; embeddings are already in the compute dtype.

        A ``"local"`` loss also takes ``local`` (a :class:`LocalAnchors`, None when not split
        over ranks) and, given one, returns only per-element terms or :meth:`SubLoss.ratio`
        terms named in :attr:`local_terms`.
        """
        raise NotImplementedError

    def too_few_pairs(self, num_positive: int, num_negative: int) -> bool:
        """Whether the batch's listed pairs are too few for any loss (then it is 0).

        Applied to the pairs of all ranks by a ``"local"`` loss split over ranks.
        """
        return False

    # -- distributed ----------------------------------------------------------------------

    def _gathers(self, has_ref: bool, has_tuple: bool = False) -> bool:
        """Whether this call gathers across ranks (see ``gather_distributed``)."""
        name = type(self).__name__
        local = self.gather_mode == "local"
        if self.gather_distributed is None:
            if self.gather_mode is None or (not local and (has_ref or has_tuple)):
                return False
            return resolve_gather(None, name)
        if not resolve_gather(self.gather_distributed, name):
            return False
        if not local and (has_ref or has_tuple):
            raise ValueError(
                f"{name} computes the whole gathered batch on every rank when gathering "
                "(gather_mode 'global'): it cannot take ref_emb nor an indices_tuple of one "
                "rank's batch (pass it a miner instead), or pass gather_distributed=False"
            )
        return True

    def _gathered_forward(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        if labels is None:
            raise ValueError(f"{type(self).__name__} needs labels when gathering across ranks")
        with torch.autocast(embeddings.device.type, enabled=False):
            emb = to_compute_dtype(embeddings)
            gathered = gather_with_grad(emb)
            everyone = gathered.tensor
            everyone_labels = gather_no_grad(labels, gathered.sizes).tensor
            zero = connected_zero(emb, everyone, *self.parameters())
            reg = None
            if self.embedding_regularizer is not None:
                reg = self.embedding_regularizer(everyone) * self.embedding_reg_weight
            if self.gather_mode == "global":
                tuples = None if self.miner is None else self.miner(everyone, everyone_labels)
                terms = self.compute_loss(
                    everyone, everyone_labels, tuples, everyone, everyone_labels, True
                )
                if reg is not None:
                    terms["embedding_reg_loss"] = SubLoss(reg, reduced=True)
                # Every rank computes the whole loss; the gather's backward sums the ranks'
                # identical gradients (W times) and DDP's mean divides by W.
                return reduce_all(terms, self.reducer, zero) + zero
            return self._local_forward(
                emb, labels, indices_tuple, ref_emb, ref_labels, gathered, everyone_labels,
                reg, zero,
            )

    def _local_forward(
        self, emb, labels, indices_tuple, ref_emb, ref_labels, gathered, everyone_labels, reg,
        zero,
    ):
        """This rank's anchors against the reference set, reduced with every rank's counts.

        With ``L = sum_r T_r / C`` the single-process loss (``T_r`` this rank's terms summed,
        ``C`` the count of all ranks), rank ``r`` backpropagates ``W * T_r / C``: the gather
        sums the ranks' gradients into each owner and DDP's mean divides by ``W``.
        """
        self_index = None
        if ref_emb is None:
            ref, ref_labels = gathered.tensor, everyone_labels
            self_index = gathered.own_rows()
            if indices_tuple is not None:
                indices_tuple = _shift_references(indices_tuple, gathered.offset)
        else:
            ref = to_compute_dtype(ref_emb)
        if indices_tuple is None and self.miner is not None:
            if isinstance(self.miner, BaseMiner):
                indices_tuple = self.miner(emb, labels, ref, ref_labels, ref_self_index=self_index)
            else:
                indices_tuple = self.miner(emb, labels, ref, ref_labels)
                if self_index is not None:
                    indices_tuple = drop_self_pairs(indices_tuple, self_index)
        terms = self.compute_loss(
            emb, labels, indices_tuple, ref, ref_labels, False, local=LocalAnchors(self_index)
        )
        unknown = set(terms) - set(self.local_terms)
        if unknown:
            raise RuntimeError(f"{type(self).__name__} returned unexpected terms {unknown}")
        # One all-reduce: the listed pairs, then each term's total and count.
        parts = [*_listed_pairs(labels, ref_labels, indices_tuple, self_index)]
        splits = {}
        for name in self.local_terms:
            if name in terms:
                total, count = terms[name].total_and_count(self.reducer)
                if (count is None) != (self.reducer == "sum"):
                    raise RuntimeError(f"{type(self).__name__}'s term {name} has the wrong count")
            else:
                total, count = zero, None
            splits[name] = total
            parts += [total.detach(), count if count is not None else total.new_zeros(())]
        sums = all_reduce_sum(torch.stack(
            [torch.as_tensor(p, dtype=torch.float64, device=emb.device) for p in parts]
        ))
        if self.too_few_pairs(int(sums[0]), int(sums[1])):
            return zero
        world = gathered.world_size
        objective, value = zero, zero.detach()
        for i, name in enumerate(self.local_terms):
            total_all, count_all = sums[2 + 2 * i], sums[3 + 2 * i]
            divisor = 1.0 if self.reducer == "sum" else float(count_all.clamp(min=1))
            objective = objective + splits[name] * (world / divisor)
            value = value + (total_all / divisor).to(value.dtype)
        if reg is not None:
            objective, value = objective + reg, value + reg.detach()
        return objective - objective.detach() + value

    def _resolve_distance(self, distance, normalize_embeddings, distance_norm, power):
        legacy = {
            key: value
            for key, value in (
                ("normalize_embeddings", normalize_embeddings),
                ("p", distance_norm),
                ("power", power),
            )
            if value is not None
        }
        if distance is None:
            resolved = self.default_distance()
            for key, value in legacy.items():
                setattr(resolved, key, value)
            return resolved
        if isinstance(distance, BaseDistance):
            if legacy:
                raise ValueError(
                    f"pass {sorted(legacy)} to the distance object, not to the loss, when "
                    "distance is an object"
                )
            return distance
        return get_distance(distance, **legacy)


def _listed_pairs(
    labels: Tensor, ref_labels: Tensor, indices_tuple: IndicesTuple | None,
    self_index: Tensor | None,
) -> tuple[int, int]:
    """This rank's listed positive and negative pairs (PML's count, for its too-few rule)."""
    if indices_tuple is not None:
        anchors = (indices_tuple[0], indices_tuple[0]) if len(indices_tuple) == 3 else (
            indices_tuple[0], indices_tuple[2])
        return len(anchors[0]), len(anchors[1])
    same = int((labels.unsqueeze(1) == ref_labels.unsqueeze(0)).sum())
    own = 0 if self_index is None else len(self_index)
    return same - own, len(labels) * len(ref_labels) - same
