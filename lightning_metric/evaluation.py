"""Retrieval quality of embeddings: precision@1, MAP@R, Recall@K, NMI, ...

The numbers are those of PML's ``AccuracyCalculator`` (same definitions, same
choice of ``k``, same handling of labels absent from the reference), computed
with FAISS nearest neighbours searched a chunk of queries at a time, so memory
stays ``O(chunk_size * k)`` instead of PML's ``O(num_queries * k)`` tensors.

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
RANK_METRICS = (
    "precision_at_1",
    "r_precision",
    "mean_average_precision_at_r",
    "mean_average_precision",
    "mean_reciprocal_rank",
    *(f"recall_at_{k}" for k in RECALL_KS),
)
CLUSTER_METRICS = ("NMI", "AMI")
METRICS = RANK_METRICS + CLUSTER_METRICS
DISTANCES = ("cosine", "euclidean")
INDEXES = ("exact", "hnsw", "ivf")

# Most (query, neighbour) entries held at once: bounds a chunk's memory to a few hundred MB.
_MAX_CHUNK_ENTRIES = 2**23
# Beyond this many neighbours, an exact search ranks everything instead of selecting with
# FAISS; it is also the most a FAISS GPU index returns.
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
        k: neighbours retrieved per query, as PML: ``None`` = the whole reference set (MAP
            over the full ranking; every query is scored against every reference item, so
            it is for sets up to ~20k), ``"max_bin_count"`` = the size of the largest class
            in the reference (minus the query itself), enough for R-precision and MAP@R and
            the choice for large sets, or an int (capped at the reference size).
            ``mean_average_precision`` and ``mean_reciprocal_rank`` look at the first ``k``.
        index: ``"exact"`` (brute force), or approximate for galleries of millions:
            ``"hnsw"`` (graph) or ``"ivf"`` (inverted lists over k-means cells).
        chunk_size: queries searched at a time (fewer when ``k`` is large).
        include: names from ``METRICS`` to compute; ``None`` computes all.
        seed: of the k-means behind NMI and AMI (1234 is FAISS's default, which PML uses).

    Returns:
        ``{name: value}``. Rank metrics average over the queries whose label has at least one
        other item in the reference ("lone" queries are left out, as PML does); NaN when
        there is no such query. Recall@K is the deep metric learning papers' one: 1 for a
        query if any of its first K neighbours shares its label. NMI and AMI compare the
        labels with a k-means partition of the query embeddings into as many clusters as
        there are labels.
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
                distance=distance, k=k, index=index, chunk_size=chunk_size,
            )
        )
    if any(name in CLUSTER_METRICS for name in names):
        results.update(_cluster_metrics(query, query_labels, distance, seed))
    return {name: results[name] for name in names}


@torch.no_grad()
def precision_at_1(embeddings: Tensor, labels: Tensor, chunk_size: int = 4096) -> float:
    """Share of items whose nearest other item (cosine) has the same label.

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
    distance: str,
    k: int | str | None,
    index: str,
    chunk_size: int,
) -> dict[str, float]:
    query_codes, reference_codes = _label_codes(query_labels, reference_labels)
    # R: how many reference items are relevant to each query (its own label, itself excluded).
    class_sizes = torch.bincount(reference_codes, minlength=int(query_codes.max()) + 1)
    relevant = class_sizes[query_codes] - int(same_set)
    rows = torch.nonzero(relevant > 0).squeeze(1)
    if len(rows) == 0:
        return dict.fromkeys(RANK_METRICS, math.nan)
    available = len(reference) - int(same_set)
    if k is None:
        k = available
    elif k == "max_bin_count":
        k = int(relevant.max())
    k = min(k, available)
    depth = min(max(k, max(RECALL_KS)), available)

    query, reference = _search_space(query, distance), _search_space(reference, distance)
    if index == "exact" and depth > _MAX_SELECTED:
        ranker = _FullRanker(reference, reference_codes, distance, same_set)
        row_entries = len(reference)
    else:
        ranker = _FaissRanker(reference, reference_codes, distance, index, depth, same_set)
        row_entries = depth + 1
    step = max(1, min(chunk_size, _MAX_CHUNK_ENTRIES // row_entries))
    totals = dict.fromkeys(RANK_METRICS, 0.0)
    for start in range(0, len(rows), step):
        ids = rows[start : start + step]
        ranks = ranker(query[ids], query_codes[ids], ids, relevant[ids])
        for name, value in _summed_metrics(ranks, relevant[ids], k).items():
            totals[name] += value
    return {name: total / len(rows) for name, total in totals.items()}


def _label_codes(query_labels: Tensor, reference_labels: Tensor) -> tuple[Tensor, Tensor]:
    """Both label sets as indices into their sorted union of distinct labels."""
    _, codes = torch.unique(torch.cat([query_labels, reference_labels]), return_inverse=True)
    return codes[: len(query_labels)], codes[len(query_labels) :]


def _summed_metrics(ranks: Tensor, relevant: Tensor, k: int) -> dict[str, float]:
    """Per-query metrics summed over a chunk of queries.

    ``ranks`` ``(Q, C)``: ascending positions (1 = nearest) of each query's relevant items in
    its neighbour list, ``inf`` past those found; ``relevant`` ``(Q,)``: their number R.
    Only the first ``k`` neighbours count, except for Recall@K.
    """
    relevant = relevant.to(torch.float64)
    ranks = ranks.to(torch.float64)
    nth = torch.arange(1, ranks.shape[1] + 1, dtype=torch.float64)
    first = ranks[:, 0]
    in_top_k = ranks <= k
    precision_at_hits = torch.where(in_top_k, nth / ranks, 0.0)
    r_limit = relevant.clamp(max=k)
    in_top_r = ranks <= r_limit[:, None]
    sums = {
        "precision_at_1": first == 1,
        "r_precision": in_top_r.sum(dim=1) / r_limit,
        "mean_average_precision_at_r": (precision_at_hits * in_top_r).sum(dim=1) / relevant,
        "mean_average_precision": precision_at_hits.sum(dim=1) / relevant,
        "mean_reciprocal_rank": torch.where(first <= k, 1.0 / first, 0.0),
    }
    for recall_k in RECALL_KS:
        sums[f"recall_at_{recall_k}"] = first <= recall_k
    return {name: float(values.sum()) for name, values in sums.items()}


class _FaissRanker:
    """Ranks of the relevant items among a query's ``depth`` nearest neighbours from FAISS."""

    def __init__(self, reference, reference_codes, distance, index, depth, same_set):
        self.index = _build_index(reference.numpy(), distance, index, depth + int(same_set))
        self.reference_codes = reference_codes
        self.depth = depth
        self.same_set = same_set

    def __call__(self, query: Tensor, query_codes: Tensor, ids: Tensor, relevant: Tensor):
        _, neighbours = self.index.search(query.numpy(), self.depth + int(self.same_set))
        neighbours = torch.from_numpy(neighbours)
        if self.same_set:
            neighbours = _drop_self(neighbours, ids)
        hits = self.reference_codes[neighbours.clamp(min=0)] == query_codes[:, None]
        hits &= neighbours >= 0  # approximate indexes pad with -1
        position = torch.arange(1, self.depth + 1, dtype=torch.float32)
        ranks = torch.where(hits, position, math.inf)
        columns = min(int(relevant.max()), self.depth)
        return torch.topk(ranks, columns, dim=1, largest=False).values


def _drop_self(neighbours: Tensor, ids: Tensor) -> Tensor:
    """Remove each query from its own neighbour list (the last neighbour if it is absent)."""
    is_self = neighbours == ids[:, None]
    is_self[~is_self.any(dim=1), -1] = True
    return neighbours[~is_self].view(len(ids), -1)


class _FullRanker:
    """Exact ranks of the relevant items in the full ranking of the reference set.

    Instead of sorting each row of scores (``M log M``), sorts only the R relevant scores
    and counts, for each of them, the other items scoring higher (``M log R``). Ties
    between a relevant and an irrelevant item rank the relevant one first.
    """

    def __init__(self, reference, reference_codes, distance, same_set):
        self.reference = reference
        self.reference_codes = reference_codes
        # 2 q.r - |r|^2 ranks like -|q - r|^2 for each query q.
        self.offset = reference.square().sum(dim=1) if distance == "euclidean" else None
        self.same_set = same_set

    def __call__(self, query: Tensor, query_codes: Tensor, ids: Tensor, relevant: Tensor):
        scores = query @ self.reference.T
        if self.offset is not None:
            scores = 2 * scores - self.offset
        is_relevant = query_codes[:, None] == self.reference_codes
        if self.same_set:
            rows = torch.arange(len(ids))
            is_relevant[rows, ids] = False
            scores[rows, ids] = -math.inf
        num_relevant = int(relevant.max())
        # Relevant scores, highest first; rows with fewer than num_relevant end with -inf.
        relevant_scores = torch.where(is_relevant, scores, -math.inf)
        relevant_scores = torch.topk(relevant_scores, num_relevant, dim=1).values
        irrelevant_scores = scores.masked_fill_(is_relevant, -math.inf)
        # bucket = how many relevant scores lie below each irrelevant one (-inf: none above).
        ascending = relevant_scores.flip(1).contiguous()
        bucket = torch.searchsorted(ascending, irrelevant_scores)
        counts = torch.zeros(len(ids), num_relevant + 1, dtype=torch.int64)
        counts.scatter_add_(1, bucket, torch.ones(1, dtype=torch.int64).expand_as(bucket))
        # Irrelevant items above the i-th highest relevant one: those in buckets past it.
        above = counts.flip(1).cumsum(dim=1)[:, :num_relevant]
        ranks = torch.arange(1, num_relevant + 1) + above
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
