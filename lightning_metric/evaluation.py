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

Queries and gallery may share items (an item both a query and a gallery item): give both
sets' item ids (``query_ids``, ``reference_ids``) and a query never retrieves itself, by id,
while exact duplicates that are other items still count. Search once, read many: the search
fills a :class:`RetrievalResults` (per-query metrics, each query's nearest neighbours) that
the metrics average and that pictures of the worst queries or a re-ranking read again.

Example::

    >>> metrics = retrieval_metrics(embeddings, labels, k="max_bin_count")
    >>> metrics["precision_at_1"], metrics["mean_average_precision_at_r"]
    >>> retrieval_metrics(queries, query_labels, gallery, gallery_labels, distance="euclidean")
    >>> retrieval_metrics(queries, query_labels, gallery, gallery_labels, recall_at_k=[1, 10],
    ...                   query_ids=query_items, reference_ids=gallery_items)
"""


from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score
from torch import Tensor

RECALL_KS = (1, 2, 4, 8)  # the default Ks of Recall@K (``recall_at_k=``)
R_METRICS = ("r_precision", "mean_average_precision_at_r")  # read the first R neighbours
K_METRICS = ("mean_average_precision", "mean_reciprocal_rank")  # read the first k
CLUSTER_METRICS = ("NMI", "AMI")
DISTANCES = ("cosine", "euclidean")
INDEXES = ("exact", "hnsw", "ivf")

# Most (query, neighbour) entries held at once: bounds a chunk's memory to a few hundred MB.
_MAX_CHUNK_ENTRIES = 2**23
# Beyond this many neighbours (tie groups included), an exact search ranks everything instead
# of selecting with FAISS; it is also the most a FAISS GPU index returns.
_MAX_SELECTED = 2048
_KMEANS_ITERATIONS = 20  # as PML's AccuracyCalculator
_RECALL_PREFIX = "recall_at_"
_gpu_resources = None

ArrayLike = Tensor | np.ndarray


def rank_metric_names(recall_at_k: Iterable[int] = RECALL_KS) -> tuple[str, ...]:
    """The rank metrics' names, with one ``recall_at_K`` per K of ``recall_at_k``."""
    return (
        "precision_at_1",
        *R_METRICS,
        *K_METRICS,
        *(f"{_RECALL_PREFIX}{recall_k}" for recall_k in checked_recall_at_k(recall_at_k)),
    )


def metric_names(recall_at_k: Iterable[int] = RECALL_KS) -> tuple[str, ...]:
    """Every metric's name (rank metrics, then NMI and AMI) for the Ks of ``recall_at_k``."""
    return rank_metric_names(recall_at_k) + CLUSTER_METRICS


def checked_recall_at_k(recall_at_k: Iterable[int]) -> tuple[int, ...]:
    """The Ks of Recall@K, sorted and each once.

    Raises:
        ValueError: naming ``recall_at_k`` and its value, unless it is a list (any iterable)
            of positive ints.
    """
    if isinstance(recall_at_k, str | bytes) or not isinstance(recall_at_k, Iterable):
        raise ValueError(f"recall_at_k must be a list of positive ints, got {recall_at_k!r}")
    values = list(recall_at_k)
    bad = [
        value for value in values
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1
    ]
    if bad:
        raise ValueError(f"recall_at_k must be a list of positive ints, got {values!r}")
    return tuple(sorted({int(value) for value in values}))


RANK_METRICS = rank_metric_names()
METRICS = metric_names()


@dataclass(frozen=True, eq=False)
class RetrievalResults:
    """What one nearest-neighbour search found, for every query: read it, don't search again.

    :func:`retrieval_results` fills it; :func:`retrieval_metrics` averages it;
    :class:`~lightning_metric.callbacks.RetrievalMetrics` keeps the last one of each stage
    (``last_results["val"]``) for callbacks that draw the worst queries or re-rank.
    ``Q`` queries, ``M`` reference (gallery) items, ``T`` = ``top_k`` neighbours kept.

    Attributes:
        distance: ``"cosine"`` or ``"euclidean"``.
        relevant: ``(Q,)`` int64 R, the reference items sharing the query's label (the query
            itself excluded); 0 for a "lone" query, left out of every metric.
        per_query: ``{metric name: (Q,) float64}`` each rank metric of each query (the mean
            over the non-lone queries is the metric); NaN for lone queries.
        neighbours: ``(Q, T)`` int64 reference rows of each query's nearest neighbours,
            nearest first, ordered by the tie rule (at equal distance, items without the
            query's label first); -1 past the end of the reference set and for lone queries.
        distances: ``(Q, T)`` float32 their distances (``1 - cosine`` or the euclidean
            distance); NaN where ``neighbours`` is -1.
        is_relevant: ``(Q, T)`` bool whether each neighbour shares the query's label.
        query_labels, reference_labels: ``(Q,)`` and ``(M,)`` labels, as given.
        query_ids, reference_ids: ``(Q,)`` and ``(M,)`` item ids (dataset indices in the
            callback) when given, else None.
    """

    distance: str
    relevant: Tensor
    per_query: dict[str, Tensor]
    neighbours: Tensor
    distances: Tensor
    is_relevant: Tensor
    query_labels: Tensor
    reference_labels: Tensor
    query_ids: Tensor | None = None
    reference_ids: Tensor | None = None

    @property
    def lone(self) -> Tensor:
        """``(Q,)`` bool: queries without any relevant reference item (left out)."""
        return self.relevant == 0

    @property
    def average_precision_at_r(self) -> Tensor:
        """``(Q,)`` float64 each query's average precision at R (NaN for lone queries).

        Raises:
            KeyError: when ``mean_average_precision_at_r`` was not among the metrics computed.
        """
        return self.per_query["mean_average_precision_at_r"]

    def neighbour_ids(self) -> Tensor:
        """``(Q, T)`` the neighbours' ``reference_ids`` (dataset indices in the callback; the
        reference rows when there are no ids), -1 where ``neighbours`` is -1."""
        if self.reference_ids is None:
            return self.neighbours
        ids = self.reference_ids[self.neighbours.clamp(min=0)]
        return torch.where(self.neighbours >= 0, ids, -1)

    def metrics(
        self, names: Collection[str] | None = None, queries: Tensor | None = None
    ) -> dict[str, float]:
        """Mean of each per-query metric over the non-lone queries (NaN when there are none).

        Args:
            names: the metrics to return (default: all in ``per_query``).
            queries: ``(Q,)`` bool, to average over these queries only (one category, say).

        Raises:
            KeyError: for a name that was not computed.
        """
        names = list(self.per_query) if names is None else list(names)
        counted = ~self.lone if queries is None else queries.to(torch.bool) & ~self.lone
        if not counted.any():
            return dict.fromkeys(names, math.nan)
        return {name: float(self.per_query[name][counted].mean()) for name in names}

    def worst_queries(self, n: int, metric: str = "mean_average_precision_at_r") -> Tensor:
        """``(min(n, non-lone),)`` rows of the ``n`` non-lone queries with the lowest
        ``metric``, worst first (equal values: lower row first)."""
        values = self.per_query[metric]
        rows = torch.nonzero(~self.lone).squeeze(1)
        order = torch.sort(values[rows], stable=True).indices
        return rows[order[:n]]


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
    recall_at_k: Iterable[int] = RECALL_KS,
    query_ids: ArrayLike | None = None,
    reference_ids: ArrayLike | None = None,
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
        include: names from ``metric_names(recall_at_k)`` to compute; ``None`` computes all.
        seed: of the k-means behind NMI and AMI (1234 is FAISS's default, which PML uses).
        recall_at_k: the Ks of ``recall_at_K`` (default ``RECALL_KS`` = 1, 2, 4, 8); the
            search goes as deep as the largest K requested.
        query_ids, reference_ids: ``(N,)`` and ``(M,)`` item ids (ints, e.g. dataset
            indices; ``reference_ids`` unique), both or neither, with a separate
            ``reference``: a reference item with the query's id is the query itself and is
            never retrieved for it (query and gallery that share items, an item that is both
            a query and a gallery item). Identity goes by id, never by distance: exact
            duplicates that are different items still count. Without ids, no reference item
            is the query.

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

    Raises:
        ValueError: for an unknown metric, distance or index, a bad ``k``, ``chunk_size`` or
            ``recall_at_k``, shapes that do not match, NaN or inf embeddings, empty sets,
            ids given alone or repeated in ``reference_ids``.
    """
    names = selected_metrics(include, recall_at_k)
    _check_options(distance, k, index, chunk_size)
    query, query_labels, reference, reference_labels, self_rows, ids = _checked_sets(
        query, query_labels, reference, reference_labels, query_ids, reference_ids
    )
    results: dict[str, float] = {}
    rank_names = [name for name in names if name not in CLUSTER_METRICS]
    if rank_names:
        found = _retrieve(
            query, query_labels, reference, reference_labels, self_rows, ids,
            names=rank_names, distance=distance, k=k, index=index, chunk_size=chunk_size,
            top_k=0,
        )
        results.update(found.metrics())
    if any(name in CLUSTER_METRICS for name in names):
        results.update(cluster_metrics(query, query_labels, distance, seed))
    return {name: results[name] for name in names}


@torch.no_grad()
def retrieval_results(
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
    recall_at_k: Iterable[int] = RECALL_KS,
    query_ids: ArrayLike | None = None,
    reference_ids: ArrayLike | None = None,
    top_k: int = 10,
) -> RetrievalResults:
    """The one search behind :func:`retrieval_metrics`, kept: per-query metrics and the
    ``top_k`` nearest neighbours of every query (:class:`RetrievalResults`).

    The arguments are :func:`retrieval_metrics`'s, except that ``include`` names rank
    metrics only (from ``rank_metric_names(recall_at_k)``; ``None``: all of them) and
    ``top_k`` (>= 0) neighbours of each non-lone query are kept, ordered by the tie rule;
    the search goes at least that deep. In self-retrieval ``query_ids`` may name the items
    (recorded in the results; each query is excluded from its own neighbours anyway).
    ``retrieval_results(...).metrics()`` equals ``retrieval_metrics(...)``'s rank metrics.

    Example::

        >>> found = retrieval_results(queries, query_labels, gallery, gallery_labels, top_k=5)
        >>> worst = found.worst_queries(8)           # rows of the 8 lowest AP@R
        >>> found.neighbours[worst], found.is_relevant[worst]

    Raises:
        ValueError: as :func:`retrieval_metrics`; for NMI or AMI in ``include``, or a bad
            ``top_k``.
    """
    known = rank_metric_names(recall_at_k)
    names = list(known if include is None else selected_metrics(include, recall_at_k))
    clustering = [name for name in names if name in CLUSTER_METRICS]
    if clustering:
        raise ValueError(
            f"retrieval_results computes rank metrics only, got {clustering} in include; "
            "NMI and AMI come from retrieval_metrics or cluster_metrics"
        )
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
    _check_options(distance, k, index, chunk_size)
    query, query_labels, reference, reference_labels, self_rows, ids = _checked_sets(
        query, query_labels, reference, reference_labels, query_ids, reference_ids,
        ids_in_self_retrieval=True,
    )
    return _retrieve(
        query, query_labels, reference, reference_labels, self_rows, ids, names=names,
        distance=distance, k=k, index=index, chunk_size=chunk_size, top_k=top_k,
    )


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


def selected_metrics(
    include: Collection[str] | None, recall_at_k: Iterable[int] = RECALL_KS
) -> tuple[str, ...]:
    """The names of ``include`` (None: all) in ``metric_names(recall_at_k)``'s order.

    Raises:
        ValueError: for names not in ``metric_names(recall_at_k)``, naming ``include``, or a
            bad ``recall_at_k``.
    """
    known = metric_names(recall_at_k)
    if include is None:
        return known
    if isinstance(include, str):
        raise ValueError(f"include must be a list of metric names, got {include!r}")
    unknown = sorted(set(include) - set(known))
    if unknown:
        raise ValueError(f"unknown metrics {unknown} in include; choose from {list(known)}")
    return tuple(name for name in known if name in include)


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


def _checked_sets(query, query_labels, reference, reference_labels, query_ids, reference_ids,
                  ids_in_self_retrieval: bool = False):
    """Checked ``(query, query_labels, reference, reference_labels, self_rows, ids)``:
    ``self_rows`` ``(N,)`` the reference row that is each query itself (-1: none), ``ids``
    the ``(query_ids, reference_ids)`` tensors or ``(None, None)``."""
    query, query_labels = _checked_set("query", query, query_labels)
    if reference is None:
        if reference_labels is not None:
            raise ValueError("reference_labels was given without reference: pass both or neither")
        if len(query) < 2:
            raise ValueError("self-retrieval needs at least 2 items, got 1")
        if reference_ids is not None or (query_ids is not None and not ids_in_self_retrieval):
            raise ValueError(
                "query_ids and reference_ids are for a separate reference; in self-retrieval "
                "each query is excluded from its own neighbours already"
            )
        ids = _checked_ids("query_ids", query_ids, len(query))
        return query, query_labels, query, query_labels, torch.arange(len(query)), (ids, ids)
    reference, reference_labels = _checked_set("reference", reference, reference_labels)
    if reference.shape[1] != query.shape[1]:
        raise ValueError(
            f"query has {query.shape[1]} dimensions but reference has {reference.shape[1]}"
        )
    if (query_ids is None) != (reference_ids is None):
        raise ValueError("query_ids and reference_ids go together: pass both or neither")
    query_ids = _checked_ids("query_ids", query_ids, len(query))
    reference_ids = _checked_ids("reference_ids", reference_ids, len(reference))
    self_rows = _self_rows(query_ids, reference_ids, len(query))
    return query, query_labels, reference, reference_labels, self_rows, (query_ids, reference_ids)


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


def _checked_ids(name: str, ids: ArrayLike | None, rows: int) -> Tensor | None:
    """``ids`` as a CPU int64 ``(rows,)`` tensor (None stays None)."""
    if ids is None:
        return None
    ids = torch.as_tensor(ids).detach().cpu()
    if ids.shape != (rows,) or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(
            f"{name} must be ({rows},) integer ids, one per row, got {tuple(ids.shape)} "
            f"{ids.dtype}"
        )
    return ids.long()


def _self_rows(query_ids: Tensor | None, reference_ids: Tensor | None, num_queries: int) -> Tensor:
    """``(N,)`` the reference row whose id is the query's id, -1 where none (or no ids)."""
    if query_ids is None or reference_ids is None:
        return torch.full((num_queries,), -1, dtype=torch.int64)
    sorted_ids, order = torch.sort(reference_ids)
    repeated = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]]
    if len(repeated):
        raise ValueError(
            f"reference_ids must be unique (one id an item), got {int(repeated[0])} repeated"
        )
    position = torch.searchsorted(sorted_ids, query_ids).clamp(max=len(sorted_ids) - 1)
    found = sorted_ids[position] == query_ids
    return torch.where(found, order[position], -1)


# -- the search --------------------------------------------------------------------------------


def _retrieve(
    query: Tensor,
    query_labels: Tensor,
    reference: Tensor,
    reference_labels: Tensor,
    self_rows: Tensor,
    ids: tuple[Tensor | None, Tensor | None],
    *,
    names: list[str],
    distance: str,
    k: int | str | None,
    index: str,
    chunk_size: int,
    top_k: int,
) -> RetrievalResults:
    """One search of the non-lone queries, as deep as ``names`` and ``top_k`` need
    (``_search_depth``), into a :class:`RetrievalResults`."""
    query_codes, reference_codes = _label_codes(query_labels, reference_labels)
    # R: how many reference items are relevant to each query (its own label, itself excluded).
    class_sizes = torch.bincount(reference_codes, minlength=int(query_codes.max()) + 1)
    has_self = self_rows >= 0
    self_relevant = has_self & (reference_codes[self_rows.clamp(min=0)] == query_codes)
    relevant = class_sizes[query_codes] - self_relevant.long()
    found = _Found(len(query), names, top_k)
    rows = torch.nonzero(relevant > 0).squeeze(1)
    available = len(reference) - int(bool(has_self.all()))
    k = _resolved_k(k, relevant, available)
    depth = _search_depth(names, k, int(relevant.max()), available, top_k)
    if len(rows) and depth:
        query, reference = _search_space(query, distance), _search_space(reference, distance)
        full_ranker = _FullRanker(reference, reference_codes, distance, top_k)
        width = depth + 1 + int(bool(has_self.any()))  # the depth, the query, one past it
        if index == "exact" and width > _MAX_SELECTED:
            ranker, row_entries = full_ranker, len(reference)
        else:
            ranker = _FaissRanker(
                reference, reference_codes, distance, index, depth, width, full_ranker, top_k
            )
            row_entries = width
        step = max(1, min(chunk_size, _MAX_CHUNK_ENTRIES // row_entries))
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            columns = max(1, min(int(relevant[chunk].max()), depth))
            ranks, top = ranker(query[chunk], query_codes[chunk], self_rows[chunk], columns)
            found.put(chunk, _per_query_metrics(ranks, relevant[chunk], k, names), top)
    return RetrievalResults(
        distance=distance, relevant=relevant, per_query=found.per_query,
        neighbours=found.neighbours, distances=found.distances, is_relevant=found.is_relevant,
        query_labels=query_labels, reference_labels=reference_labels,
        query_ids=ids[0], reference_ids=ids[1],
    )


class _Found:
    """The per-query tensors of a :class:`RetrievalResults`, filled a chunk at a time."""

    def __init__(self, num_queries: int, names: list[str], top_k: int):
        self.per_query = {
            name: torch.full((num_queries,), math.nan, dtype=torch.float64) for name in names
        }
        self.neighbours = torch.full((num_queries, top_k), -1, dtype=torch.int64)
        self.distances = torch.full((num_queries, top_k), math.nan, dtype=torch.float32)
        self.is_relevant = torch.zeros(num_queries, top_k, dtype=torch.bool)

    def put(self, rows: Tensor, values: dict[str, Tensor], top: _Top | None) -> None:
        for name, value in values.items():
            self.per_query[name][rows] = value
        if top is not None:
            self.neighbours[rows], self.distances[rows], self.is_relevant[rows] = top


def _resolved_k(k: int | str | None, relevant: Tensor, available: int) -> int:
    """``k`` as a number of neighbours: the whole reference for None, the largest R for
    ``"max_bin_count"``, at most the ``available`` reference items."""
    if k is None:
        k = available
    elif k == "max_bin_count":
        k = int(relevant.max())
    return max(1, min(k, available))


def _search_depth(
    names: list[str], k: int, max_relevant: int, available: int, top_k: int = 0
) -> int:
    """Neighbours per query that the metrics ``names`` read: 1 for precision@1, K for
    ``recall_at_K``, R (the largest is ``max_relevant``) for R-precision and MAP@R, ``k``
    for MAP and MRR; at least ``top_k``; at most the ``available`` reference items."""
    reads = {
        "precision_at_1": 1,
        **dict.fromkeys(R_METRICS, max_relevant),
        **dict.fromkeys(K_METRICS, k),
    }
    depths = [
        int(name.removeprefix(_RECALL_PREFIX)) if name.startswith(_RECALL_PREFIX) else reads[name]
        for name in names
    ]
    return min(max([*depths, top_k]), available)


def _label_codes(query_labels: Tensor, reference_labels: Tensor) -> tuple[Tensor, Tensor]:
    """Both label sets as indices into their sorted union of distinct labels."""
    _, codes = torch.unique(torch.cat([query_labels, reference_labels]), return_inverse=True)
    return codes[: len(query_labels)], codes[len(query_labels) :]


def _per_query_metrics(
    ranks: Tensor, relevant: Tensor, k: int, names: list[str]
) -> dict[str, Tensor]:
    """The metrics ``names`` of each query of a chunk, ``{name: (Q,) float64}``.

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
    formulas = {
        "precision_at_1": lambda: first == 1,
        "r_precision": lambda: in_top_r.sum(dim=1) / relevant,
        "mean_average_precision_at_r": lambda: (precision_at_hits * in_top_r).sum(1) / relevant,
        "mean_average_precision": lambda: (precision_at_hits * (ranks <= k)).sum(1) / relevant,
        "mean_reciprocal_rank": lambda: torch.where(first <= k, 1.0 / first, 0.0),
    }
    values = {}
    for name in names:
        if name.startswith(_RECALL_PREFIX):
            values[name] = first <= int(name.removeprefix(_RECALL_PREFIX))
        else:
            values[name] = formulas[name]()
    return {name: value.to(torch.float64) for name, value in values.items()}


# (Q, T) neighbours (reference rows, -1 past the end), distances (NaN there) and relevance.
_Top = tuple[Tensor, Tensor, Tensor]


def _padded_top(neighbours: Tensor, distances: Tensor, hits: Tensor, top_k: int) -> _Top:
    """The first ``top_k`` columns, padded with (-1, NaN, False) to ``top_k``; entries whose
    neighbour is -1 get NaN and False."""
    neighbours, distances, hits = neighbours[:, :top_k], distances[:, :top_k], hits[:, :top_k]
    missing = top_k - neighbours.shape[1]
    if missing > 0:
        pad_neighbours, pad_distances, pad_hits = _no_neighbours(len(neighbours), missing)
        neighbours = torch.cat([neighbours, pad_neighbours], dim=1)
        distances = torch.cat([distances.float(), pad_distances], dim=1)
        hits = torch.cat([hits, pad_hits], dim=1)
    outside = neighbours < 0
    return neighbours, distances.float().masked_fill(outside, math.nan), hits & ~outside


def _distances_from_faiss(values: Tensor, distance: str) -> Tensor:
    """FAISS's inner products (cosine) or squared L2 distances as distances."""
    if distance == "cosine":
        return 1.0 - values
    return values.clamp(min=0).sqrt()


class _FaissRanker:
    """Ranks of the relevant items among each query's ``depth`` nearest neighbours, from FAISS.

    Ties follow the module's rule, which needs each query's tie group at ``depth`` whole. An
    exact search ``width`` deep has it when the ``depth``-th neighbour (the query itself left
    out) is strictly nearer than the last one returned: every item as near as the
    ``depth``-th is then in the list. Queries without it are searched again twice as deep,
    and ranked in full (``fallback``) once that would pass ``_MAX_SELECTED``. Approximate
    indexes are searched once and the rule is applied to the neighbours they return. The
    first ``top_k`` neighbours (``top_k`` <= ``depth``) come from the same search.
    """

    def __init__(self, reference, reference_codes, distance, index, depth, width, fallback,
                 top_k=0):
        self.width = width
        self.index = _build_index(reference.numpy(), distance, index, self.width)
        self.exact = index == "exact"
        self.size = len(reference)
        self.distance = distance
        # FAISS returns inner products largest first; negated, they order as distances do.
        self.sign = -1.0 if distance == "cosine" else 1.0
        self.reference_codes = reference_codes
        self.depth = depth
        self.fallback = fallback
        self.top_k = top_k

    def __call__(self, query: Tensor, query_codes: Tensor, self_rows: Tensor,
                 columns: int) -> tuple[Tensor, _Top | None]:
        """``(Q, columns)`` ranks of the relevant items of the queries, ascending, ``inf``
        past those found, and their top ``top_k`` neighbours (None when ``top_k`` is 0);
        ``self_rows`` ``(Q,)``: each query's own reference row (-1: none)."""
        ranks = torch.full((len(query), columns), math.inf)
        top = _padded_top(*_no_neighbours(len(query), self.top_k), self.top_k)
        pending = torch.arange(len(query))
        width = min(self.width, self.size)
        while len(pending):
            if self.exact and width > _MAX_SELECTED:
                for part in _parts(pending, self.size):
                    part_ranks, part_top = self.fallback(
                        query[part], query_codes[part], self_rows[part], columns
                    )
                    _store(ranks, top, part, part_ranks, part_top)
                break
            unfinished = []
            for part in _parts(pending, width):
                part_ranks, complete, part_top = self._search(
                    query[part], query_codes[part], self_rows[part], width, columns
                )
                _store(ranks, top, part[complete], part_ranks[complete],
                       None if part_top is None else tuple(t[complete] for t in part_top))
                unfinished.append(part[~complete])
            pending = torch.cat(unfinished)
            width = min(2 * width, self.size)
        return ranks, (top if self.top_k else None)

    def _search(self, query, query_codes, self_rows, width, columns):
        """Ranks ``(Q, columns)`` from a search ``width`` deep, ``(Q,)`` whether they are
        final (the tie group at ``depth`` is whole, or the index is approximate), and the
        top ``top_k`` neighbours (None when ``top_k`` is 0)."""
        raw, neighbours = self.index.search(query.numpy(), width)
        raw, neighbours = torch.from_numpy(raw), torch.from_numpy(neighbours)
        distances = self.sign * raw
        hits = self.reference_codes[neighbours.clamp(min=0)] == query_codes[:, None]
        left_out = neighbours < 0  # approximate indexes pad with -1
        left_out |= neighbours == self_rows[:, None]
        groups = _tie_groups(distances)
        ordered_hits, ordered_groups, order = _tie_sort(groups, hits, left_out)
        # Every item nearer than the last one returned is in the list.
        complete = ordered_groups[:, self.depth - 1] < groups[:, -1]
        if not self.exact or width >= self.size:
            complete[:] = True
        position = torch.arange(1, self.depth + 1, dtype=torch.float32)
        ranks = torch.where(ordered_hits[:, : self.depth], position, math.inf)
        ranks = torch.topk(ranks, columns, dim=1, largest=False).values
        top = None
        if self.top_k:
            order = order[:, : self.top_k]
            top_neighbours = torch.where(left_out.gather(1, order), -1, neighbours.gather(1, order))
            top = _padded_top(
                top_neighbours, _distances_from_faiss(raw.gather(1, order), self.distance),
                ordered_hits[:, : self.top_k], self.top_k,
            )
        return ranks, complete, top


def _no_neighbours(rows: int, top_k: int) -> _Top:
    return (
        torch.full((rows, top_k), -1, dtype=torch.int64),
        torch.full((rows, top_k), math.nan),
        torch.zeros(rows, top_k, dtype=torch.bool),
    )


def _store(ranks: Tensor, top: _Top, rows: Tensor, part_ranks: Tensor,
           part_top: _Top | None) -> None:
    ranks[rows] = part_ranks
    if part_top is not None:
        for whole, part in zip(top, part_top, strict=True):
            whole[rows] = part


def _tie_groups(distances: Tensor) -> Tensor:
    """``(Q, L)`` tie group of each neighbour: 0 for a row's nearest distance, one more at
    each larger distance; ``distances`` ``(Q, L)`` nearest first, as FAISS returns them."""
    steps = distances[:, 1:] != distances[:, :-1]
    return F.pad(steps.cumsum(dim=1), (1, 0))


def _tie_sort(groups: Tensor, hits: Tensor, left_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each row's neighbours in rank order under the tie rule: by tie group, and within a
    group the misses (items without the query's label) before the hits.

    ``groups`` (from ``_tie_groups``), ``hits``, ``left_out``: ``(Q, L)`` of each neighbour,
    ``left_out`` marking entries that are not neighbours (the query itself, padding); those
    go last, as misses in a group past all others. Returns the ``(Q, L)`` hits and groups
    in rank order, and ``(Q, L)`` the column of each ranked entry in the input (stable).
    """
    past_all = 2 * groups.shape[1]
    keys = torch.where(left_out, past_all, 2 * groups + hits.long())
    keys, order = keys.sort(dim=1, stable=True)
    return keys % 2 == 1, keys // 2, order


def _tie_ordered(groups: Tensor, hits: Tensor, left_out: Tensor) -> tuple[Tensor, Tensor]:
    """``_tie_sort``'s ordered hits and groups, without the order."""
    ordered_hits, ordered_groups, _ = _tie_sort(groups, hits, left_out)
    return ordered_hits, ordered_groups


def _parts(rows: Tensor, row_entries: int) -> tuple[Tensor, ...]:
    """``rows`` split so that a part holds at most ``_MAX_CHUNK_ENTRIES`` entries."""
    return torch.split(rows, max(1, _MAX_CHUNK_ENTRIES // row_entries))


def _monotone_ints(scores: Tensor) -> Tensor:
    """``scores`` float32 as int64 in the same order (equal floats, equal ints)."""
    bits = (scores + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 turns -0.0 into 0.0
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


class _FullRanker:
    """Exact ranks of the relevant items in the full ranking of the reference set.

    Instead of sorting each row of scores (``M log M``), sorts only the R relevant scores
    and counts, for each of them, the other items scoring at least as high (``M log R``):
    an irrelevant item tied with a relevant one ranks first (the module's tie rule). The
    first ``top_k`` neighbours are selected on (score, miss) keys, the same rule.
    """

    def __init__(self, reference, reference_codes, distance, top_k=0):
        self.reference = reference
        self.reference_codes = reference_codes
        # 2 q.r - |r|^2 ranks like -|q - r|^2 for each query q.
        self.offset = reference.square().sum(dim=1) if distance == "euclidean" else None
        self.top_k = top_k

    def __call__(self, query: Tensor, query_codes: Tensor, self_rows: Tensor,
                 columns: int) -> tuple[Tensor, _Top | None]:
        """``(Q, columns)`` ranks of the first ``columns`` relevant items of the queries,
        ascending, ``inf`` for queries with fewer, and their top ``top_k`` neighbours (None
        when ``top_k`` is 0); ``self_rows`` ``(Q,)`` each query's own row (-1: none)."""
        scores = query @ self.reference.T
        if self.offset is not None:
            scores = 2 * scores - self.offset
        is_relevant = query_codes[:, None] == self.reference_codes
        own = self_rows >= 0
        rows, own_rows = torch.nonzero(own).squeeze(1), self_rows[own]
        is_relevant[rows, own_rows] = False
        scores[rows, own_rows] = -math.inf
        top = self._top(query, scores, is_relevant) if self.top_k else None
        # Relevant scores, highest first; rows with fewer than `columns` end with -inf.
        relevant_scores = torch.where(is_relevant, scores, -math.inf)
        relevant_scores = torch.topk(relevant_scores, columns, dim=1).values
        irrelevant_scores = scores.masked_fill_(is_relevant, -math.inf)
        # bucket = how many relevant scores lie at or below each irrelevant one (right=True:
        # a tie counts the irrelevant item above); the -inf ones only pass the -inf padding.
        ascending = relevant_scores.flip(1).contiguous()
        bucket = torch.searchsorted(ascending, irrelevant_scores, right=True)
        counts = torch.zeros(len(query), columns + 1, dtype=torch.int64)
        counts.scatter_add_(1, bucket, torch.ones(1, dtype=torch.int64).expand_as(bucket))
        # Irrelevant items ranked before the i-th highest relevant one: those in buckets past it.
        above = counts.flip(1).cumsum(dim=1)[:, :columns]
        ranks = torch.arange(1, columns + 1) + above
        return torch.where(relevant_scores > -math.inf, ranks.to(torch.float32), math.inf), top

    def _top(self, query: Tensor, scores: Tensor, is_relevant: Tensor) -> _Top:
        """The ``top_k`` highest scores of each row, misses before hits at equal scores."""
        keys = 2 * _monotone_ints(scores) + (~is_relevant).long()
        selected = torch.topk(keys, min(self.top_k, scores.shape[1]), dim=1).indices
        top_scores = scores.gather(1, selected)
        if self.offset is None:
            distances = 1.0 - top_scores
        else:  # |q - r|^2 = |q|^2 - (2 q.r - |r|^2)
            distances = (query.square().sum(dim=1, keepdim=True) - top_scores).clamp(min=0).sqrt()
        neighbours = torch.where(top_scores > -math.inf, selected, -1)
        return _padded_top(neighbours, distances, is_relevant.gather(1, selected), self.top_k)


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


def cluster_metrics(
    query: ArrayLike, labels: ArrayLike, distance: str = "cosine", seed: int = 1234
) -> dict[str, float]:
    """``{"NMI", "AMI"}`` of the ``(N,)`` labels against a k-means partition of the ``(N, D)``
    ``query`` embeddings (searched as ``distance`` ranks) into one cluster per label.

    Raises:
        ValueError: for an unknown distance, shapes that do not match, NaN or inf rows.
    """
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; choose from {list(DISTANCES)}")
    query, labels = _checked_set("query", query, labels)
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
