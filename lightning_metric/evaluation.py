"""Retrieval quality of embeddings: precision@1, MAP@R, Recall@K, NMI, ...

The definitions are those of PML's ``AccuracyCalculator`` (same choice of ``k``, same
handling of labels absent from the reference), computed with FAISS nearest neighbours
searched a chunk of queries at a time, so memory stays ``O(chunk_size * depth)`` instead
of PML's ``O(num_queries * k)`` tensors. Two things differ from PML, where its answer depends
on how it searches rather than on the embeddings:

- **What k bounds.** ``k`` bounds only the metrics whose definition has one:
  ``mean_average_precision`` and ``mean_reciprocal_rank`` look at the first ``k``
  neighbours. ``r_precision`` and ``mean_average_precision_at_r`` always read the first R
  (the number of reference items relevant to the query, i.e. sharing its label, itself
  excluded), ``precision_at_1`` the first one and ``recall_at_K`` the first K, whatever
  ``k``; the search goes as deep as the requested metrics need. PML cuts R-precision and
  MAP@R at ``k``, which silently misreports them when ``k`` < R.
- **Ties.** Reference items at the same distance from a query rank against the query:
  among equal distances, the items without the query's label come before the items with
  it. Ties thus never raise a score (an embedding collapsed to a single point scores
  precision@1 = 0), and ties among items of the same relevance change nothing. Every path
  applies this one rule, for both distances: the full ranking, the exact FAISS search
  (which searches deeper until the tie group at the needed depth is complete) and the
  approximate indexes (on the neighbours they return). In self-retrieval the query itself
  is dropped by its index, never by its distance. PML keeps FAISS's arbitrary order, so
  with duplicate embeddings its numbers change with ``k`` and with the storage order.
  A tie is an equality of the float32 distances as each path computes them: identical
  vectors tie in every path, but two different items whose distances differ by a rounding
  error may tie in one path (FAISS's BLAS, the full ranking's matmul) and not in another.

On embeddings without ties and with ``k`` at least R (``None`` or ``"max_bin_count"``),
the numbers are PML's.

Example::

    >>> metrics = retrieval_metrics(embeddings, labels, k="max_bin_count")
    >>> metrics["precision_at_1"], metrics["mean_average_precision_at_r"]
    >>> retrieval_metrics(queries, query_labels, gallery, gallery_labels, distance="euclidean")
"""

from __future__ import annotations

import math
from collections.abc import Collection

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score
from torch import Tensor

RECALL_KS = (1, 2, 4, 8)
R_METRICS = ("r_precision", "mean_average_precision_at_r")  # read the first R neighbours
K_METRICS = ("mean_average_precision", "mean_reciprocal_rank")  # read the first k
RANK_METRICS = (
    "precision_at_1",
    *R_METRICS,
    *K_METRICS,
    *(f"recall_at_{k}" for k in RECALL_KS),
)
CLUSTER_METRICS = ("NMI", "AMI")
METRICS = RANK_METRICS + CLUSTER_METRICS
DISTANCES = ("cosine", "euclidean")
INDEXES = ("exact", "hnsw", "ivf")

# Most (query, neighbour) entries held at once: bounds a chunk's memory to a few hundred MB.
_MAX_CHUNK_ENTRIES = 2**23
# Beyond this many neighbours (tie groups included), an exact search ranks everything instead
# of selecting with FAISS; it is also the most a FAISS GPU index returns.
_MAX_SELECTED = 2048
_KMEANS_ITERATIONS = 20  # as PML's AccuracyCalculator
_gpu_resources = None

ArrayLike = Tensor | np.ndarray


@torch.no_grad()
def retrieval_metrics(
    query: ArrayLike,
    query_labels: ArrayLike,
    reference: ArrayLike | None = None,
    reference_labels: ArrayLike | None = None,
    *,
    distance: str = "cosine",
    k: int | str | None = None,
    index: str = "exact",
    chunk_size: int = 4096,
    include: Collection[str] | None = None,
    seed: int = 1234,
) -> dict[str, float]:
    """Retrieval and clustering metrics of ``query`` embeddings against a ``reference`` set.

    Args:
        query: ``(N, D)`` embeddings (tensor or array, any float dtype; searched in float32).
        query_labels: ``(N,)`` class labels.
        reference, reference_labels: ``(M, D)`` gallery and its ``(M,)`` labels. ``None``
            (the default) retrieves the query set from itself, each item excluded from its
            own neighbours (by index, so exact duplicates still count as neighbours).
        distance: ``"cosine"`` (inner product of L2-normalised vectors) or ``"euclidean"``.
        k: how many neighbours ``mean_average_precision`` and ``mean_reciprocal_rank`` look
            at, and only those two, chosen as in PML: ``None`` = the whole reference set (MAP
            over the full ranking; every query is scored against every reference item, so
            it is for sets up to ~20k), ``"max_bin_count"`` = the size of the largest class
            in the reference (minus the query itself), the choice for large sets, or an int
            (capped at the reference size). Whatever ``k``, ``precision_at_1`` reads the
            first neighbour, ``recall_at_K`` the first K, and ``r_precision`` and
            ``mean_average_precision_at_r`` the first R (the query's number of relevant
            items); the search goes as deep as the metrics in ``include`` need, so R-deep
            only when one of the last two is requested.
        index: ``"exact"`` (brute force), or approximate for galleries of millions:
            ``"hnsw"`` (graph) or ``"ivf"`` (inverted lists over k-means cells).
        chunk_size: queries searched at a time (fewer when the search is deep).
        include: names from ``METRICS`` to compute; ``None`` computes all.
        seed: of the k-means behind NMI and AMI (1234 is FAISS's default, which PML uses).

    Returns:
        ``{name: value}``. Rank metrics average over the queries whose label has at least one
        other item in the reference ("lone" queries are left out, as PML does); NaN when
        there is no such query. Recall@K is the deep metric learning papers' one: 1 for a
        query if any of its first K neighbours shares its label. NMI and AMI compare the
        labels with a k-means partition of the query embeddings into as many clusters as
        there are labels.

        Ties: among reference items at the same distance from a query, those without the
        query's label rank first (ties never raise a score; ties among items of the same
        relevance change nothing). One rule for both distances and every path (full
        ranking, exact FAISS with whole tie groups, approximate indexes on what they
        return), so duplicated embeddings give the same metrics whatever ``k`` (for the
        metrics it does not bound), path and storage order (up to float32 rounding of
        distinct distances, see the module docstring).
    """
    names = _checked_names(include)
    _check_options(distance, k, index, chunk_size)
    query, query_labels = _checked_set("query", query, query_labels)
    same_set = reference is None
    if same_set:
        if reference_labels is not None:
            raise ValueError("reference_labels was given without reference: pass both or neither")
        if len(query) < 2:
            raise ValueError("self-retrieval needs at least 2 items, got 1")
        reference, reference_labels = query, query_labels
    else:
        reference, reference_labels = _checked_set("reference", reference, reference_labels)
        if reference.shape[1] != query.shape[1]:
            raise ValueError(
                f"query has {query.shape[1]} dimensions but reference has {reference.shape[1]}"
            )
    results: dict[str, float] = {}
    if any(name in RANK_METRICS for name in names):
        results.update(
            _rank_metrics(
                query, query_labels, reference, reference_labels, same_set,
                names=[name for name in names if name in RANK_METRICS],
                distance=distance, k=k, index=index, chunk_size=chunk_size,
            )
        )
    if any(name in CLUSTER_METRICS for name in names):
        results.update(_cluster_metrics(query, query_labels, distance, seed))
    return {name: results[name] for name in names}


@torch.no_grad()
def precision_at_1(embeddings: Tensor, labels: Tensor, chunk_size: int = 4096) -> float:
    """Share of items whose nearest other item (cosine) has the same label.

    Among items at the same distance, those with another label come first (the tie rule of
    :func:`retrieval_metrics`): a nearest tie that holds another label is a miss.

    ``embeddings`` ``(N, D)``, ``labels`` ``(N,)``; the item itself is excluded, and so are
    items whose label no other item has (as PML does; NaN if every label is a singleton).
    """
    metrics = retrieval_metrics(
        embeddings, labels, k=1, chunk_size=chunk_size, include=("precision_at_1",)
    )
    return metrics["precision_at_1"]


# -- input checks ------------------------------------------------------------------------------


def _checked_names(include: Collection[str] | None) -> tuple[str, ...]:
    if include is None:
        return METRICS
    unknown = sorted(set(include) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {list(METRICS)}")
    return tuple(name for name in METRICS if name in include)


def _check_options(distance: str, k: int | str | None, index: str, chunk_size: int) -> None:
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; choose from {list(DISTANCES)}")
    if index not in INDEXES:
        raise ValueError(f"unknown index {index!r}; choose from {list(INDEXES)}")
    valid_int = isinstance(k, int) and not isinstance(k, bool) and k > 0
    if not (valid_int or k is None or k == "max_bin_count"):
        raise ValueError(f"k must be None, 'max_bin_count' or a positive int, got {k!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _checked_set(name: str, embeddings: ArrayLike, labels: ArrayLike | None):
    """``(float32 CPU embeddings, CPU labels)`` after checking shapes and finiteness."""
    if labels is None:
        raise ValueError(f"{name} was given without labels")
    embeddings = torch.as_tensor(embeddings).detach()
    labels = torch.as_tensor(labels).detach().cpu()
    if embeddings.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (num_items, dim), got shape {tuple(embeddings.shape)}"
        )
    if len(embeddings) == 0:
        raise ValueError(f"the {name} set is empty")
    if labels.ndim != 1 or len(labels) != len(embeddings):
        raise ValueError(
            f"{name} labels must be 1-D with one label per row: got shape {tuple(labels.shape)} "
            f"for {len(embeddings)} rows"
        )
    embeddings = embeddings.to("cpu", torch.float32)
    bad_rows = int((~torch.isfinite(embeddings).all(dim=1)).sum())
    if bad_rows:
        raise ValueError(f"{name} has {bad_rows} rows with NaN or inf values")
    return embeddings, labels


# -- rank metrics ------------------------------------------------------------------------------


def _rank_metrics(
    query: Tensor,
    query_labels: Tensor,
    reference: Tensor,
    reference_labels: Tensor,
    same_set: bool,
    *,
    names: list[str],
    distance: str,
    k: int | str | None,
    index: str,
    chunk_size: int,
) -> dict[str, float]:
    """The rank metrics ``names``, averaged over the queries with a relevant reference item;
    the search is as deep as ``names`` need (``_search_depth``)."""
    query_codes, reference_codes = _label_codes(query_labels, reference_labels)
    # R: how many reference items are relevant to each query (its own label, itself excluded).
    class_sizes = torch.bincount(reference_codes, minlength=int(query_codes.max()) + 1)
    relevant = class_sizes[query_codes] - int(same_set)
    rows = torch.nonzero(relevant > 0).squeeze(1)
    if len(rows) == 0:
        return dict.fromkeys(names, math.nan)
    available = len(reference) - int(same_set)
    if k is None:
        k = available
    elif k == "max_bin_count":
        k = int(relevant.max())
    k = min(k, available)
    depth = _search_depth(names, k, int(relevant.max()), available)

    query, reference = _search_space(query, distance), _search_space(reference, distance)
    full_ranker = _FullRanker(reference, reference_codes, distance, same_set)
    width = depth + 1 + int(same_set)  # the depth, the query itself, one to see past the depth
    if index == "exact" and width > _MAX_SELECTED:
        ranker, row_entries = full_ranker, len(reference)
    else:
        ranker = _FaissRanker(
            reference, reference_codes, distance, index, depth, same_set, full_ranker
        )
        row_entries = width
    step = max(1, min(chunk_size, _MAX_CHUNK_ENTRIES // row_entries))
    totals = dict.fromkeys(names, 0.0)
    for start in range(0, len(rows), step):
        ids = rows[start : start + step]
        columns = min(int(relevant[ids].max()), depth)
        ranks = ranker(query[ids], query_codes[ids], ids, columns)
        for name, value in _summed_metrics(ranks, relevant[ids], k, names).items():
            totals[name] += value
    return {name: total / len(rows) for name, total in totals.items()}


def _search_depth(names: list[str], k: int, max_relevant: int, available: int) -> int:
    """Neighbours per query that the metrics ``names`` read: 1 for precision@1, K for
    Recall@K, R (the largest is ``max_relevant``) for R-precision and MAP@R, ``k`` for MAP
    and MRR; at most the ``available`` reference items."""
    reads = {
        "precision_at_1": 1,
        **dict.fromkeys(R_METRICS, max_relevant),
        **dict.fromkeys(K_METRICS, k),
        **{f"recall_at_{recall_k}": recall_k for recall_k in RECALL_KS},
    }
    return min(max(reads[name] for name in names), available)


def _label_codes(query_labels: Tensor, reference_labels: Tensor) -> tuple[Tensor, Tensor]:
    """Both label sets as indices into their sorted union of distinct labels."""
    _, codes = torch.unique(torch.cat([query_labels, reference_labels]), return_inverse=True)
    return codes[: len(query_labels)], codes[len(query_labels) :]


def _summed_metrics(
    ranks: Tensor, relevant: Tensor, k: int, names: list[str]
) -> dict[str, float]:
    """The metrics ``names`` per query, summed over a chunk of queries.

    ``ranks`` ``(Q, C)``: ascending positions (1 = nearest, ties ordered by the tie rule) of
    each query's relevant items in its ranking, ``inf`` past those found, as deep as
    ``names`` need; ``relevant`` ``(Q,)``: their number R. With ``n_i`` the i-th rank:
    precision@1 is ``n_1 == 1``; R-precision the share of the R within the first R; MAP@R
    ``sum(i / n_i for n_i <= R) / R``; MAP ``sum(i / n_i for n_i <= k) / R``; MRR ``1 / n_1``
    if ``n_1 <= k``; Recall@K ``n_1 <= K``.
    """
    relevant = relevant.to(torch.float64)
    ranks = ranks.to(torch.float64)
    nth = torch.arange(1, ranks.shape[1] + 1, dtype=torch.float64)
    first = ranks[:, 0]
    precision_at_hits = nth / ranks  # 0 past the relevant items found
    in_top_r = ranks <= relevant[:, None]
    sums = {
        "precision_at_1": first == 1,
        "r_precision": in_top_r.sum(dim=1) / relevant,
        "mean_average_precision_at_r": (precision_at_hits * in_top_r).sum(dim=1) / relevant,
        "mean_average_precision": (precision_at_hits * (ranks <= k)).sum(dim=1) / relevant,
        "mean_reciprocal_rank": torch.where(first <= k, 1.0 / first, 0.0),
    }
    for recall_k in RECALL_KS:
        sums[f"recall_at_{recall_k}"] = first <= recall_k
    return {name: float(sums[name].sum()) for name in names}


class _FaissRanker:
    """Ranks of the relevant items among each query's ``depth`` nearest neighbours, from FAISS.

    Ties follow the module's rule, which needs each query's tie group at ``depth`` whole. An
    exact search ``width`` deep has it when the ``depth``-th neighbour (the query itself left
    out) is strictly nearer than the last one returned: every item as near as the
    ``depth``-th is then in the list. Queries without it are searched again twice as deep,
    and ranked in full (``fallback``) once that would pass ``_MAX_SELECTED``. Approximate
    indexes are searched once and the rule is applied to the neighbours they return.
    """

    def __init__(self, reference, reference_codes, distance, index, depth, same_set, fallback):
        self.width = depth + 1 + int(same_set)
        self.index = _build_index(reference.numpy(), distance, index, self.width)
        self.exact = index == "exact"
        self.size = len(reference)
        # FAISS returns inner products largest first; negated, they order as distances do.
        self.sign = -1.0 if distance == "cosine" else 1.0
        self.reference_codes = reference_codes
        self.depth = depth
        self.same_set = same_set
        self.fallback = fallback

    def __call__(self, query: Tensor, query_codes: Tensor, ids: Tensor, columns: int) -> Tensor:
        """``(Q, columns)`` ranks of the relevant items of queries ``ids`` (indices in the
        reference set when it is the query set), ascending, ``inf`` past those found."""
        ranks = torch.full((len(ids), columns), math.inf)
        pending = torch.arange(len(ids))
        width = min(self.width, self.size)
        while len(pending):
            if self.exact and width > _MAX_SELECTED:
                for part in _parts(pending, self.size):
                    ranks[part] = self.fallback(query[part], query_codes[part], ids[part], columns)
                break
            unfinished = []
            for part in _parts(pending, width):
                part_ranks, complete = self._search(
                    query[part], query_codes[part], ids[part], width, columns
                )
                ranks[part[complete]] = part_ranks[complete]
                unfinished.append(part[~complete])
            pending = torch.cat(unfinished)
            width = min(2 * width, self.size)
        return ranks

    def _search(self, query, query_codes, ids, width, columns) -> tuple[Tensor, Tensor]:
        """Ranks ``(Q, columns)`` from a search ``width`` deep, and ``(Q,)`` whether they are
        final (the tie group at ``depth`` is whole, or the index is approximate)."""
        distances, neighbours = self.index.search(query.numpy(), width)
        distances = self.sign * torch.from_numpy(distances)
        neighbours = torch.from_numpy(neighbours)
        hits = self.reference_codes[neighbours.clamp(min=0)] == query_codes[:, None]
        left_out = neighbours < 0  # approximate indexes pad with -1
        if self.same_set:
            left_out |= neighbours == ids[:, None]
        groups = _tie_groups(distances)
        ordered_hits, ordered_groups = _tie_ordered(groups, hits, left_out)
        # Every item nearer than the last one returned is in the list.
        complete = ordered_groups[:, self.depth - 1] < groups[:, -1]
        if not self.exact or width >= self.size:
            complete[:] = True
        position = torch.arange(1, self.depth + 1, dtype=torch.float32)
        ranks = torch.where(ordered_hits[:, : self.depth], position, math.inf)
        return torch.topk(ranks, columns, dim=1, largest=False).values, complete


def _tie_groups(distances: Tensor) -> Tensor:
    """``(Q, L)`` tie group of each neighbour: 0 for a row's nearest distance, one more at
    each larger distance; ``distances`` ``(Q, L)`` nearest first, as FAISS returns them."""
    steps = distances[:, 1:] != distances[:, :-1]
    return F.pad(steps.cumsum(dim=1), (1, 0))


def _tie_ordered(groups: Tensor, hits: Tensor, left_out: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's neighbours in rank order under the tie rule: by tie group, and within a
    group the misses (items without the query's label) before the hits.

    ``groups`` (from ``_tie_groups``), ``hits``, ``left_out``: ``(Q, L)`` of each neighbour,
    ``left_out`` marking entries that are not neighbours (the query itself, padding); those
    go last, as misses in a group past all others. Returns the ``(Q, L)`` hits and groups
    in rank order.
    """
    past_all = 2 * groups.shape[1]
    keys = torch.where(left_out, past_all, 2 * groups + hits.long())
    keys = keys.sort(dim=1).values
    return keys % 2 == 1, keys // 2


def _parts(rows: Tensor, row_entries: int) -> tuple[Tensor, ...]:
    """``rows`` split so that a part holds at most ``_MAX_CHUNK_ENTRIES`` entries."""
    return torch.split(rows, max(1, _MAX_CHUNK_ENTRIES // row_entries))


class _FullRanker:
    """Exact ranks of the relevant items in the full ranking of the reference set.

    Instead of sorting each row of scores (``M log M``), sorts only the R relevant scores
    and counts, for each of them, the other items scoring at least as high (``M log R``):
    an irrelevant item tied with a relevant one ranks first (the module's tie rule).
    """

    def __init__(self, reference, reference_codes, distance, same_set):
        self.reference = reference
        self.reference_codes = reference_codes
        # 2 q.r - |r|^2 ranks like -|q - r|^2 for each query q.
        self.offset = reference.square().sum(dim=1) if distance == "euclidean" else None
        self.same_set = same_set

    def __call__(self, query: Tensor, query_codes: Tensor, ids: Tensor, columns: int) -> Tensor:
        """``(Q, columns)`` ranks of the first ``columns`` relevant items of queries ``ids``,
        ascending, ``inf`` for queries with fewer."""
        scores = query @ self.reference.T
        if self.offset is not None:
            scores = 2 * scores - self.offset
        is_relevant = query_codes[:, None] == self.reference_codes
        if self.same_set:
            rows = torch.arange(len(ids))
            is_relevant[rows, ids] = False
            scores[rows, ids] = -math.inf
        # Relevant scores, highest first; rows with fewer than `columns` end with -inf.
        relevant_scores = torch.where(is_relevant, scores, -math.inf)
        relevant_scores = torch.topk(relevant_scores, columns, dim=1).values
        irrelevant_scores = scores.masked_fill_(is_relevant, -math.inf)
        # bucket = how many relevant scores lie at or below each irrelevant one (right=True:
        # a tie counts the irrelevant item above); the -inf ones only pass the -inf padding.
        ascending = relevant_scores.flip(1).contiguous()
        bucket = torch.searchsorted(ascending, irrelevant_scores, right=True)
        counts = torch.zeros(len(ids), columns + 1, dtype=torch.int64)
        counts.scatter_add_(1, bucket, torch.ones(1, dtype=torch.int64).expand_as(bucket))
        # Irrelevant items ranked before the i-th highest relevant one: those in buckets past it.
        above = counts.flip(1).cumsum(dim=1)[:, :columns]
        ranks = torch.arange(1, columns + 1) + above
        return torch.where(relevant_scores > -math.inf, ranks.to(torch.float32), math.inf)


# -- FAISS -------------------------------------------------------------------------------------


def _search_space(embeddings: Tensor, distance: str) -> Tensor:
    """Contiguous float32 embeddings in which FAISS's metric ranks as ``distance`` does."""
    if distance == "cosine":
        return F.normalize(embeddings, dim=1)
    return embeddings.contiguous()


def _build_index(reference: np.ndarray, distance: str, index: str, depth: int):
    """A FAISS index holding ``reference``, ready to return ``depth`` neighbours per query."""
    dim = reference.shape[1]
    metric = faiss.METRIC_INNER_PRODUCT if distance == "cosine" else faiss.METRIC_L2
    if index == "exact":
        searcher = faiss.IndexFlat(dim, metric)
    elif index == "hnsw":
        searcher = faiss.IndexHNSWFlat(dim, 32, metric)
        searcher.hnsw.efConstruction = 80
        searcher.hnsw.efSearch = max(128, depth)
    else:
        cells = max(1, min(int(4 * math.sqrt(len(reference))), len(reference) // 39))
        searcher = faiss.index_factory(dim, f"IVF{cells},Flat", metric)
        searcher.train(reference)
        faiss.extract_index_ivf(searcher).nprobe = min(cells, 32)
    searcher.add(reference)
    if index != "hnsw" and depth <= _MAX_SELECTED and _faiss_gpu_available():
        searcher = faiss.index_cpu_to_gpu(_gpu(), torch.cuda.current_device(), searcher)
    return searcher


def _faiss_gpu_available() -> bool:
    return torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources")


def _gpu():
    global _gpu_resources
    if _gpu_resources is None:
        _gpu_resources = faiss.StandardGpuResources()
    return _gpu_resources


# -- clustering metrics ------------------------------------------------------------------------


def _cluster_metrics(query: Tensor, labels: Tensor, distance: str, seed: int) -> dict[str, float]:
    """NMI and AMI of the labels against a k-means partition with one cluster per label."""
    points = _search_space(query, distance).numpy()
    _, codes = torch.unique(labels, return_inverse=True)
    num_clusters = int(codes.max()) + 1
    # min_points_per_centroid=1 only silences FAISS's "too few points" warning.
    kmeans = faiss.Kmeans(
        points.shape[1], num_clusters, niter=_KMEANS_ITERATIONS, seed=seed,
        min_points_per_centroid=1,
    )
    kmeans.train(points)
    _, clusters = kmeans.index.search(points, 1)
    truth, clusters = codes.numpy(), clusters[:, 0]
    return {
        "NMI": float(normalized_mutual_info_score(truth, clusters)),
        "AMI": float(adjusted_mutual_info_score(truth, clusters)),
    }
