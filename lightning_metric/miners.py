"""Miners: which pairs or triplets of a batch a loss should look at.

Most pairs and triplets of a trained-for-a-while batch are already easy and
teach the model nothing. A miner looks at the distances of a batch and returns
the informative ones as an indices tuple: pairs ``(a1, p, a2, n)`` (positive
pairs ``(a1[i], p[i])``, negative pairs ``(a2[j], n[j])``) or triplets
``(a, p, n)``, long tensors on the embeddings' device. Pass a miner to a loss
(``miner=``) or call it yourself and hand its output to the loss::

    >>> miner = BatchHardMiner()
    >>> a, p, n = miner(embeddings, labels)              # (B, D), (B,)
    >>> loss = TripletMarginLoss(miner=miner)(embeddings, labels)

Anchors index the batch; positives and negatives index the reference set,
which is the batch itself unless ``ref_emb`` ``(M, D)`` and ``ref_labels``
``(M,)`` are given. Within the batch an item is never its own positive; when the
reference set holds a copy of the batch (a memory of past batches), pass
``ref_self_index`` ``(B,)``, each anchor's row in ``ref_emb``, and the copy is
excluded the same way before mining.
Mining runs under ``torch.no_grad``; half-precision embeddings are compared in
float32 (the distances do this).

The PyTorch Metric Learning (PML 2.9) miners here take the same parameters
and return the same pairs or triplets as PML. The Finetuner miners
(:class:`TripletEasyHardMiner`, :class:`SiameseEasyHardMiner`) pick one
positive and one negative per anchor with a named strategy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ._checks import IndicesTuple, check_inputs
from .distances import BaseDistance, CosineSimilarity, LpDistance, get_distance
from .indices import label_masks

Triplets = tuple[Tensor, Tensor, Tensor]
Pairs = tuple[Tensor, Tensor, Tensor, Tensor]

STRATEGIES = ("easy", "semihard", "hard", "all")
"""Per-anchor strategies of the easy/hard miners."""

TRIPLET_TYPES = ("all", "hard", "semihard", "easy")
"""``type_of_triplets`` of :class:`TripletMarginMiner`."""

_CHUNK_ELEMENTS = 1 << 22
"""Entries of the (positive pairs, references) block built at once when enumerating triplets."""


class BaseMiner(nn.Module):
    """Validates the inputs, computes the distance matrix and the label masks, then mines.

    A subclass implements :meth:`mine` on the ``(N, M)`` distance matrix and the boolean
    ``(N, M)`` positive / negative masks (an item is neither its own positive nor its own
    negative when there is no reference set).

    Args:
        distance: a name (``"cosine"``, ``"dot"``, ``"euclidean"``, ``"snr"``) or a
            :class:`~lightning_metric.distances.BaseDistance`; default: the miner's own.
    """

    def __init__(self, distance: str | BaseDistance | None = None):
        super().__init__()
        self.distance = self.default_distance() if distance is None else get_distance(distance)

    def default_distance(self) -> BaseDistance:
        return LpDistance()

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        *,
        ref_self_index: Tensor | None = None,
    ) -> IndicesTuple:
        """Indices of the mined pairs or triplets of ``embeddings`` ``(B, D)``, ``labels`` ``(B,)``.

        With ``ref_emb`` ``(M, D)`` and ``ref_labels`` ``(M,)``, positives and negatives are
        taken from the reference set instead of the batch.

        ``ref_self_index`` ``(B,)``: the column of each anchor's own copy in ``ref_emb`` (as
        :class:`~lightning_metric.losses.CrossBatchMemory` holds the batch in its memory).
        Row ``i`` then has neither a positive nor a negative at ``ref_self_index[i]``, before
        any mining: a copy at distance 0 is never chosen, nor shapes the other choices. For
        the batch as its own reference set this is the diagonal, already excluded.
        """
        if labels is None:
            raise ValueError(f"{type(self).__name__} needs labels")
        labels, ref_labels = check_inputs(embeddings, labels, ref_emb, ref_labels, None)
        same_set = ref_emb is None
        n_ref = len(embeddings) if same_set else len(ref_emb)
        if ref_self_index is not None:
            ref_self_index = _check_self_index(ref_self_index, len(embeddings), n_ref)
            ref_self_index = ref_self_index.to(embeddings.device)
        with torch.no_grad():
            mat = self.distance(embeddings) if same_set else self.distance(embeddings, ref_emb)
            ref_labels = labels if same_set else ref_labels
            positive, negative = label_masks(labels, ref_labels, same_set)
            if ref_self_index is not None:
                rows = torch.arange(len(embeddings), device=embeddings.device)
                positive[rows, ref_self_index] = False
                negative[rows, ref_self_index] = False
            ref = embeddings if same_set else ref_emb
            return self.mine_embeddings(embeddings, ref, mat, positive, negative)

    def mine(self, mat: Tensor, positive: Tensor, negative: Tensor) -> IndicesTuple:
        """The indices tuple from the ``(N, M)`` matrix and the positive / negative masks."""
        raise NotImplementedError

    def mine_embeddings(
        self, embeddings: Tensor, ref_emb: Tensor, mat: Tensor, positive: Tensor, negative: Tensor
    ) -> IndicesTuple:
        """:meth:`mine`, for a miner that also needs the embeddings ``(N, D)`` and the
        reference set ``(M, D)`` (the batch itself when none was given), as given."""
        return self.mine(mat, positive, negative)


# --------------------------------------------------------------------------- PML miners


class BatchEasyHardMiner(BaseMiner):
    """One positive and one negative per anchor, each picked by a strategy (PML's miner).

    From "Improved Embeddings with Easy Positive Triplet Mining" (Xuan et al., WACV 2020).
    For an anchor ``a`` with positives ``P(a)`` and negatives ``N(a)`` and distance ``d``
    (for a similarity "closer" means larger):

    * positive ``"hard"``: the farthest positive; ``"easy"``: the closest positive;
      ``"semihard"``: the farthest positive still strictly closer than the chosen negative.
    * negative ``"hard"``: the closest negative; ``"easy"``: the farthest negative;
      ``"semihard"``: the closest negative strictly farther than the chosen positive.
    * ``"all"``: every positive (or negative) pair, unfiltered.

    Ties go to the lowest index. ``allowed_pos_range`` / ``allowed_neg_range`` ``(low, high)``
    restrict the candidates of a non-``"all"`` strategy to raw matrix values in
    ``[low, high]`` (similarities for a similarity). Unless one side is ``"all"``, an anchor
    is kept only when both its positive and its negative exist; the sides are independent
    otherwise. ``"semihard"`` cannot be used on both sides, nor with ``"all"``.

    Returns pairs ``(a1, p, a2, n)``.

    Example::

        >>> miner = BatchEasyHardMiner(pos_strategy="easy", neg_strategy="semihard")
        >>> a1, p, a2, n = miner(embeddings, labels)
        >>> loss = ContrastiveLoss()(embeddings, labels, (a1, p, a2, n))
    """

    def __init__(
        self,
        pos_strategy: str = "easy",
        neg_strategy: str = "semihard",
        allowed_pos_range: tuple[float, float] | None = None,
        allowed_neg_range: tuple[float, float] | None = None,
        distance: str | BaseDistance | None = None,
    ):
        super().__init__(distance)
        _check_strategies(pos_strategy, neg_strategy)
        self.pos_strategy = pos_strategy
        self.neg_strategy = neg_strategy
        self.allowed_pos_range = allowed_pos_range
        self.allowed_neg_range = allowed_neg_range

    def mine(self, mat: Tensor, positive: Tensor, negative: Tensor) -> Pairs:
        pos_chosen, neg_chosen = _easy_hard_choice(
            mat,
            positive,
            negative,
            self.distance,
            self.pos_strategy,
            self.neg_strategy,
            self.allowed_pos_range,
            self.allowed_neg_range,
        )
        if "all" not in (self.pos_strategy, self.neg_strategy):
            both = pos_chosen.any(dim=1, keepdim=True) & neg_chosen.any(dim=1, keepdim=True)
            pos_chosen &= both
            neg_chosen &= both
        a1, p = torch.where(pos_chosen)
        a2, n = torch.where(neg_chosen)
        return a1, p, a2, n


class BatchHardMiner(BatchEasyHardMiner):
    """The hardest triplet of every anchor: farthest positive, closest negative (PML's miner).

    "In Defense of the Triplet Loss for Person Re-Identification" (Hermans et al., 2017).
    :class:`BatchEasyHardMiner` with both strategies ``"hard"``; anchors without a positive
    or a negative are dropped. Returns triplets ``(a, p, n)``, at most one per anchor.

    Example::

        >>> miner = BatchHardMiner()
        >>> a, p, n = miner(embeddings, labels)
        >>> loss = TripletMarginLoss(margin=0.1, miner=miner)(embeddings, labels)
    """

    def __init__(
        self,
        allowed_pos_range: tuple[float, float] | None = None,
        allowed_neg_range: tuple[float, float] | None = None,
        distance: str | BaseDistance | None = None,
    ):
        super().__init__("hard", "hard", allowed_pos_range, allowed_neg_range, distance)

    def mine(self, mat: Tensor, positive: Tensor, negative: Tensor) -> Triplets:
        a, p, _, n = super().mine(mat, positive, negative)
        return a, p, n


class MultiSimilarityMiner(BaseMiner):
    """Pairs harder than the easiest pair of the other kind, up to ``epsilon`` (PML's miner).

    The mining step of "Multi-Similarity Loss with General Pair Weighting" (Wang et al.,
    CVPR 2019). Per anchor, with the default cosine similarity ``s``:

    * a positive pair is kept when ``s(a, p) - epsilon < max_n s(a, n)``;
    * a negative pair is kept when ``s(a, n) + epsilon > min_p s(a, p)``.

    For a distance the inequalities flip (``d(a, p) + epsilon > min_n d(a, n)``, ...). An
    anchor without negatives keeps no positive pair, and vice versa. ``epsilon`` is in the
    distance's units. Returns pairs ``(a1, p, a2, n)``.

    Example::

        >>> miner = MultiSimilarityMiner(epsilon=0.1)
        >>> loss = MultiSimilarityLoss(miner=miner)(embeddings, labels)
    """

    def __init__(self, epsilon: float = 0.1, distance: str | BaseDistance | None = None):
        super().__init__(distance)
        self.epsilon = epsilon

    def default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def mine(self, mat: Tensor, positive: Tensor, negative: Tensor) -> Pairs:
        dist = self.distance
        closest_neg = _extreme(mat, negative, dist, farthest=False).unsqueeze(1)
        farthest_pos = _extreme(mat, positive, dist, farthest=True).unsqueeze(1)
        hard_pos = positive & (dist.margin(mat, closest_neg) > -self.epsilon)
        hard_neg = negative & (dist.margin(farthest_pos, mat) > -self.epsilon)
        a1, p = torch.where(hard_pos)
        a2, n = torch.where(hard_neg)
        return a1, p, a2, n


class TripletMarginMiner(BaseMiner):
    """Triplets by how far the negative is beyond the positive (PML's miner).

    For a triplet the margin is ``m(a, p, n) = d(a, n) - d(a, p)`` (``s(a, p) - s(a, n)``
    for a similarity): how much farther the negative is than the positive, in the distance's
    units. ``type_of_triplets`` selects:

    * ``"all"``: ``m <= margin`` (the triplets a triplet loss with this margin learns from);
    * ``"hard"``: ``m <= margin`` and ``m <= 0`` (the negative is not farther than the positive);
    * ``"semihard"``: ``0 < m <= margin``;
    * ``"easy"``: ``m > margin``.

    Returns triplets ``(a, p, n)``. Triplets are enumerated per positive pair in chunks:
    no ``(B, B, B)`` tensor is built (PML builds one).

    Example::

        >>> miner = TripletMarginMiner(margin=0.2, type_of_triplets="semihard")
        >>> loss = TripletMarginLoss(margin=0.2, miner=miner)(embeddings, labels)
    """

    def __init__(
        self,
        margin: float = 0.2,
        type_of_triplets: str = "all",
        distance: str | BaseDistance | None = None,
    ):
        super().__init__(distance)
        if type_of_triplets not in TRIPLET_TYPES:
            raise ValueError(
                f"unknown type_of_triplets {type_of_triplets!r}: expected one of "
                f"{list(TRIPLET_TYPES)}"
            )
        self.margin = margin
        self.type_of_triplets = type_of_triplets

    def mine(self, mat: Tensor, positive: Tensor, negative: Tensor) -> Triplets:
        def keep(anchors: Tensor, positives: Tensor) -> Tensor:
            ap = mat[anchors, positives].unsqueeze(1)
            return self._keep(self.distance.margin(mat[anchors], ap))

        return _enumerate_triplets(positive, negative, keep)

    def _keep(self, triplet_margin: Tensor) -> Tensor:
        if self.type_of_triplets == "easy":
            return triplet_margin > self.margin
        keep = triplet_margin <= self.margin
        if self.type_of_triplets == "hard":
            keep &= triplet_margin <= 0
        elif self.type_of_triplets == "semihard":
            keep &= triplet_margin > 0
        return keep


class PairMarginMiner(BaseMiner):
    """Positive pairs farther than ``pos_margin``, negative pairs closer than ``neg_margin``.

    PML's miner: with a distance, keeps ``d(a, p) > pos_margin`` and ``d(a, n) < neg_margin``;
    with a similarity, ``s(a, p) < pos_margin`` and ``s(a, n) > neg_margin``. Margins are in
    the distance's units. Returns pairs ``(a1, p, a2, n)``.

    Example::

        >>> miner = PairMarginMiner(pos_margin=0.2, neg_margin=0.8)
        >>> loss = ContrastiveLoss(miner=miner)(embeddings, labels)
    """

    def __init__(
        self,
        pos_margin: float = 0.2,
        neg_margin: float = 0.8,
        distance: str | BaseDistance | None = None,
    ):
        super().__init__(distance)
        self.pos_margin = pos_margin
        self.neg_margin = neg_margin

    def mine(self, mat: Tensor, positive: Tensor, negative: Tensor) -> Pairs:
        far_pos = positive & (self.distance.margin(mat, self.pos_margin) > 0)
        close_neg = negative & (self.distance.margin(self.neg_margin, mat) > 0)
        a1, p = torch.where(far_pos)
        a2, n = torch.where(close_neg)
        return a1, p, a2, n


# --------------------------------------------------------------------------- Finetuner miners


class _FinetunerEasyHardMiner(BaseMiner):
    """Shared parameters of Finetuner's easy/hard miners."""

    def __init__(
        self,
        pos_strategy: str = "hard",
        neg_strategy: str = "hard",
        distance: str | BaseDistance = "cosine",
    ):
        super().__init__(_finetuner_distance(distance))
        _check_strategies(pos_strategy, neg_strategy)
        self.pos_strategy = pos_strategy
        self.neg_strategy = neg_strategy

    def _choose(self, mat: Tensor, positive: Tensor, negative: Tensor) -> tuple[Tensor, Tensor]:
        return _easy_hard_choice(
            mat, positive, negative, self.distance, self.pos_strategy, self.neg_strategy
        )


class TripletEasyHardMiner(_FinetunerEasyHardMiner):
    """Triplets from a positive and a negative strategy per anchor (Finetuner's miner).

    For every anchor ``a`` (each item of the batch), with positives ``P(a)`` (same label,
    not ``a`` itself) and negatives ``N(a)`` (other labels), and ``d`` the distance:

    * ``pos_strategy``: ``"hard"`` the farthest positive, ``"easy"`` the closest positive,
      ``"semihard"`` the farthest positive with ``d(a, p) < d(a, n*)`` where ``n*`` is the
      negative this anchor chose, ``"all"`` every positive.
    * ``neg_strategy``: ``"hard"`` the closest negative, ``"easy"`` the farthest negative,
      ``"semihard"`` the closest negative with ``d(a, n) > d(a, p*)`` where ``p*`` is the
      positive this anchor chose, ``"all"`` every negative.

    The triplets are every ``(a, p, n)`` with ``p`` and ``n`` chosen by ``a``; an anchor
    missing either side gives none. ``("all", "all")`` is every triplet of the batch.

    Details: inequalities are strict; the miner has no margin (``"semihard"`` takes the
    closest negative beyond the positive, FaceNet's "hardest semi-hard", which is within a
    loss's margin whenever any negative is). Ties go to the lowest index. Items at distance
    0 (duplicate embeddings) are candidates like any other. ``"semihard"`` cannot be used on
    both sides, nor together with ``"all"`` (``ValueError``, as in Finetuner).

    Finetuner's own code marks "not a candidate" with a distance of 0, so it never picks an
    item at distance exactly 0 with a non-``"all"`` strategy (a duplicate of another class,
    the hardest negative there is, is skipped); this miner picks it.

    Args:
        pos_strategy: ``"easy"``, ``"semihard"``, ``"hard"`` or ``"all"``.
        neg_strategy: ``"easy"``, ``"semihard"``, ``"hard"`` or ``"all"``.
        distance: Finetuner's ``"cosine"`` (``1 - cos``; ranks like cosine similarity),
            ``"euclidean"`` or ``"sqeuclidean"`` (both on unnormalised embeddings), or a
            :class:`~lightning_metric.distances.BaseDistance`.

    Returns triplets ``(a, p, n)``.

    Example::

        >>> miner = TripletEasyHardMiner(pos_strategy="easy", neg_strategy="hard")
        >>> a, p, n = miner(embeddings, labels)
        >>> loss = TripletMarginLoss(miner=miner)(embeddings, labels)
    """

    def mine(self, mat: Tensor, positive: Tensor, negative: Tensor) -> Triplets:
        pos_chosen, neg_chosen = self._choose(mat, positive, negative)
        return _enumerate_triplets(pos_chosen, neg_chosen)


class SiameseEasyHardMiner(_FinetunerEasyHardMiner):
    """Positive and negative pairs from a strategy per anchor (Finetuner's miner).

    Each anchor ``a`` chooses its positives and negatives exactly as in
    :class:`TripletEasyHardMiner` (hard positive = farthest, hard negative = closest, easy =
    the opposite, semihard = relative to the other side's choice, all = every one). The
    positive pairs ``(a, p)`` and negative pairs ``(a, n)`` are returned independently: an
    anchor with positives but no negative still gives its positive pair, except that a
    ``"semihard"`` side needs the other side's choice and is empty without it.

    Finetuner's code only pairs item ``i`` with later items ``j > i`` (each unordered pair
    once), so its choice depends on the batch order and the last item is never an anchor;
    here every item is an anchor over all other items, and ``("all", "all")`` returns every
    ordered pair ``(i, j)`` and ``(j, i)`` like PML's pair convention (the mean of a
    symmetric pair loss is unchanged). Items at distance 0 are candidates (see
    :class:`TripletEasyHardMiner`).

    Args:
        pos_strategy: ``"easy"``, ``"semihard"``, ``"hard"`` or ``"all"``.
        neg_strategy: ``"easy"``, ``"semihard"``, ``"hard"`` or ``"all"``.
        distance: ``"cosine"``, ``"euclidean"``, ``"sqeuclidean"`` or a ``BaseDistance``.

    Returns pairs ``(a1, p, a2, n)``.

    Example::

        >>> miner = SiameseEasyHardMiner(pos_strategy="hard", neg_strategy="hard")
        >>> a1, p, a2, n = miner(embeddings, labels)
        >>> loss = ContrastiveLoss(miner=miner)(embeddings, labels)
    """

    def mine(self, mat: Tensor, positive: Tensor, negative: Tensor) -> Pairs:
        pos_chosen, neg_chosen = self._choose(mat, positive, negative)
        a1, p = torch.where(pos_chosen)
        a2, n = torch.where(neg_chosen)
        return a1, p, a2, n


_FINETUNER_DISTANCES: dict[str, Callable[[], BaseDistance]] = {
    "cosine": CosineSimilarity,
    "euclidean": lambda: LpDistance(normalize_embeddings=False),
    "sqeuclidean": lambda: LpDistance(normalize_embeddings=False, power=2),
}


def _finetuner_distance(distance: str | BaseDistance) -> BaseDistance:
    if isinstance(distance, BaseDistance):
        return distance
    if distance not in _FINETUNER_DISTANCES:
        raise ValueError(
            f"unknown distance {distance!r}: expected one of {list(_FINETUNER_DISTANCES)} "
            "or a lightning_metric.distances.BaseDistance"
        )
    return _FINETUNER_DISTANCES[distance]()


# --------------------------------------------------------------------------- shared helpers


def _check_self_index(ref_self_index: Tensor, n_query: int, n_ref: int) -> Tensor:
    if (
        not isinstance(ref_self_index, Tensor)
        or ref_self_index.is_floating_point()
        or ref_self_index.dtype == torch.bool
        or ref_self_index.shape != (n_query,)
    ):
        got = (
            f"shape {tuple(ref_self_index.shape)}, dtype {ref_self_index.dtype}"
            if isinstance(ref_self_index, Tensor)
            else type(ref_self_index).__name__
        )
        raise ValueError(
            f"ref_self_index must be a ({n_query},) integer tensor, one reference column per "
            f"embedding; got {got}"
        )
    if n_query and (ref_self_index.min() < 0 or ref_self_index.max() >= n_ref):
        raise ValueError(
            f"ref_self_index must lie in [0, {n_ref}) (the reference set's rows); got values "
            f"from {int(ref_self_index.min())} to {int(ref_self_index.max())}"
        )
    return ref_self_index.long()


def _check_strategies(pos_strategy: str, neg_strategy: str) -> None:
    for name, value in (("pos_strategy", pos_strategy), ("neg_strategy", neg_strategy)):
        if value not in STRATEGIES:
            raise ValueError(f"unknown {name} {value!r}: expected one of {list(STRATEGIES)}")
    if pos_strategy == neg_strategy == "semihard":
        raise ValueError(
            "pos_strategy and neg_strategy cannot both be 'semihard': each is defined by the "
            "other side's choice"
        )
    if "semihard" in (pos_strategy, neg_strategy) and "all" in (pos_strategy, neg_strategy):
        raise ValueError("'semihard' cannot be combined with 'all': it needs a single partner")


def _easy_hard_choice(
    mat: Tensor,
    positive: Tensor,
    negative: Tensor,
    dist: BaseDistance,
    pos_strategy: str,
    neg_strategy: str,
    pos_range: tuple[float, float] | None = None,
    neg_range: tuple[float, float] | None = None,
) -> tuple[Tensor, Tensor]:
    """Boolean ``(N, M)`` masks of each anchor's chosen positives and negatives.

    A non-``"all"`` strategy chooses at most one per row; ``"all"`` keeps the whole mask.
    """
    pos_candidates = positive & _in_range(mat, pos_range)
    neg_candidates = negative & _in_range(mat, neg_range)
    pos_farthest = pos_strategy != "easy"
    neg_farthest = neg_strategy == "easy"
    if pos_strategy == "semihard":
        neg_chosen, neg_values = _choose_one(mat, neg_candidates, dist, neg_farthest)
        closer_than_neg = dist.margin(neg_values.unsqueeze(1), mat) > 0
        has_neg = neg_chosen.any(dim=1, keepdim=True)
        pos_chosen, _ = _choose_one(mat, pos_candidates & closer_than_neg & has_neg, dist, True)
    elif neg_strategy == "semihard":
        pos_chosen, pos_values = _choose_one(mat, pos_candidates, dist, pos_farthest)
        farther_than_pos = dist.margin(mat, pos_values.unsqueeze(1)) > 0
        has_pos = pos_chosen.any(dim=1, keepdim=True)
        neg_chosen, _ = _choose_one(mat, neg_candidates & farther_than_pos & has_pos, dist, False)
    else:
        pos_chosen = (
            positive
            if pos_strategy == "all"
            else _choose_one(mat, pos_candidates, dist, pos_farthest)[0]
        )
        neg_chosen = (
            negative
            if neg_strategy == "all"
            else _choose_one(mat, neg_candidates, dist, neg_farthest)[0]
        )
    return pos_chosen, neg_chosen


def _choose_one(
    mat: Tensor, candidates: Tensor, dist: BaseDistance, farthest: bool
) -> tuple[Tensor, Tensor]:
    """One-hot ``(N, M)`` mask of each row's closest (or farthest) candidate, and its value.

    Rows without a candidate choose nothing; their value is meaningless. Ties go to the
    lowest index.
    """
    if mat.shape[1] == 0:
        return candidates.clone(), mat.new_zeros(mat.shape[0])
    if farthest:
        masked = mat.masked_fill(~candidates, dist.closest_value(mat.dtype))
        values, index = dist.farthest(masked, 1)
    else:
        masked = mat.masked_fill(~candidates, dist.farthest_value(mat.dtype))
        values, index = dist.closest(masked, 1)
    chosen = torch.zeros_like(candidates)
    chosen.scatter_(1, index.unsqueeze(1), candidates.any(dim=1, keepdim=True))
    return chosen, values


def _extreme(mat: Tensor, candidates: Tensor, dist: BaseDistance, farthest: bool) -> Tensor:
    """Per row, the value of the farthest (or closest) candidate; rows without one get a
    value that no real one passes (closer than any for ``farthest``, farther otherwise)."""
    if mat.shape[1] == 0:
        fill = dist.closest_value(mat.dtype) if farthest else dist.farthest_value(mat.dtype)
        return mat.new_full((mat.shape[0],), fill)
    return _choose_one(mat, candidates, dist, farthest)[1]


def _in_range(mat: Tensor, value_range: tuple[float, float] | None) -> Tensor | bool:
    if value_range is None:
        return True
    low, high = value_range
    return (mat >= low) & (mat <= high)


def _enumerate_triplets(
    positive: Tensor,
    negative: Tensor,
    keep: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Triplets:
    """Every ``(a, p, n)`` with ``positive[a, p]`` and ``negative[a, n]``, in lexicographic order.

    ``keep(anchors, positives)`` returns a boolean ``(len(anchors), M)`` filter over the
    negatives of those positive pairs. The positive pairs are processed in chunks, so the
    largest block built has about ``_CHUNK_ELEMENTS`` entries, never ``N * M * M``.
    """
    anchors, positives = torch.where(positive & negative.any(dim=1, keepdim=True))
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, negative.shape[1]))
    parts = []
    for start in range(0, len(anchors), rows_per_chunk):
        a = anchors[start : start + rows_per_chunk]
        p = positives[start : start + rows_per_chunk]
        valid = negative[a]
        if keep is not None:
            valid &= keep(a, p)
        pair, n = torch.where(valid)
        parts.append((a[pair], p[pair], n))
    if not parts:
        empty = anchors.new_empty(0)
        return empty, empty.clone(), empty.clone()
    if len(parts) == 1:
        return parts[0]
    a, p, n = (torch.cat(column) for column in zip(*parts, strict=True))
    return a, p, n


# PML's angle, hardness-rank and sampling miners live in their own file; exported from here.
from .sampling_miners import (  # noqa: E402
    AngularMiner,
    DistanceWeightedMiner,
    HDCMiner,
    UniformHistogramMiner,
)

__all__ = [
    "AngularMiner",
    "BaseMiner",
    "BatchEasyHardMiner",
    "BatchHardMiner",
    "DistanceWeightedMiner",
    "HDCMiner",
    "MultiSimilarityMiner",
    "PairMarginMiner",
    "STRATEGIES",
    "SiameseEasyHardMiner",
    "TRIPLET_TYPES",
    "TripletEasyHardMiner",
    "TripletMarginMiner",
    "UniformHistogramMiner",
]
