"""torchmetrics wrappers: embeddings accumulated over an evaluation epoch, exact under DDP.

Under DDP each process embeds its shard of the evaluation set; a
``DistributedSampler`` pads the shards to equal size by repeating items. Every
item therefore carries its dataset index: after the gather (torchmetrics' ``cat``
states), :func:`in_dataset_order` drops the repeated copies and restores the
dataset order, so the metrics are computed on exactly the items, in exactly the
order, a single process would see (open-metric-learning's accumulator does the same).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable

import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from .data.roles import EvalRoles
from .distributed import is_distributed
from .evaluation import (
    CLUSTER_METRICS,
    RECALL_KS,
    RetrievalResults,
    cluster_metrics,
    retrieval_results,
    selected_metrics,
)


def in_dataset_order(indices: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """The rows of ``tensors`` sorted by their dataset ``indices`` ``(N,)``, each index once.

    Duplicated indices (the copies a ``DistributedSampler`` pads the shards with) keep
    their first row. Returns the tensors in that order (and without the duplicates).
    """
    order = torch.argsort(indices, stable=True)
    ordered = indices[order]
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    keep = order[first]
    return tuple(tensor[keep] for tensor in tensors)


def _gathered(state: list[Tensor] | Tensor) -> Tensor | None:
    """A ``cat`` state as one tensor (a list before DDP sync, a tensor after); None if empty."""
    if isinstance(state, list):
        return dim_zero_cat(state) if state else None
    return state if state.numel() else None


class _IndexedBatches(Metric):
    """``cat`` states for named sets of (embeddings, labels, indices) batches."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, sets: tuple[str, ...], **kwargs) -> None:
        super().__init__(**kwargs)
        self._sets = sets
        self._with_indices: bool | None = None
        for prefix in sets:
            for name in ("embeddings", "labels", "indices"):
                self.add_state(f"{prefix}_{name}", default=[], dist_reduce_fx="cat")

    def _store(self, prefix: str, embeddings: Tensor, labels: Tensor,
               indices: Tensor | None) -> None:
        if embeddings.ndim != 2 or labels.ndim != 1 or len(embeddings) != len(labels):
            raise ValueError(
                f"expected embeddings (B, D) and labels (B,), got {tuple(embeddings.shape)} "
                f"and {tuple(labels.shape)}"
            )
        if indices is not None and (indices.shape != labels.shape or indices.is_floating_point()):
            raise ValueError(
                f"indices must be ({len(labels)},) integer dataset indices, got "
                f"{tuple(indices.shape)} {indices.dtype}"
            )
        if self._with_indices is not None and self._with_indices != (indices is not None):
            raise ValueError("pass indices with every batch of an epoch or with none")
        self._with_indices = indices is not None
        getattr(self, f"{prefix}_embeddings").append(embeddings.detach().float())
        getattr(self, f"{prefix}_labels").append(labels.detach())
        if indices is not None:
            getattr(self, f"{prefix}_indices").append(indices.detach().long())

    def _collected(self, prefix: str) -> tuple[Tensor, Tensor] | None:
        """All ranks' ``(embeddings, labels)`` of a set, in dataset order when indexed."""
        items = self._collected_items(prefix)
        return None if items is None else items[:2]

    def _collected_items(self, prefix: str) -> tuple[Tensor, Tensor, Tensor | None] | None:
        """All ranks' ``(embeddings, labels, dataset indices)`` of a set, in dataset order
        and each item once when indexed (indices None otherwise); None before any batch."""
        embeddings = _gathered(getattr(self, f"{prefix}_embeddings"))
        if embeddings is None:
            return None
        labels = _gathered(getattr(self, f"{prefix}_labels"))
        indices = _gathered(getattr(self, f"{prefix}_indices"))
        if indices is None:
            if is_distributed():
                rank_zero_warn(
                    f"{type(self).__name__} under DDP got no dataset indices: the items a "
                    "DistributedSampler repeats to pad the shards are counted twice. Pass "
                    "indices= (MetricLearningModule does when the batches carry them)."
                )
            return embeddings, labels, None
        return in_dataset_order(indices, embeddings, labels, indices)

    def reset(self) -> None:
        super().reset()
        self._with_indices = None


class EmbeddingCollector(_IndexedBatches):
    """The embeddings ``(N, D)`` and labels ``(N,)`` of an epoch, from every process.

    ``update(embeddings, labels, indices=None)`` stores a batch; ``compute()`` (a
    collective call under DDP: every rank must make it) returns ``(embeddings,
    labels)`` of all ranks, in dataset order with padded duplicates dropped when
    ``indices`` were given.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(("items",), **kwargs)

    def update(self, embeddings: Tensor, labels: Tensor, indices: Tensor | None = None) -> None:
        self._store("items", embeddings, labels, indices)

    def compute(self) -> tuple[Tensor, Tensor]:
        collected = self._collected("items")
        if collected is None:
            raise ValueError("EmbeddingCollector.compute() was called before any batch")
        return collected


class RetrievalMetric(_IndexedBatches):
    """Precision@1, R-precision, MAP@R, Recall@K, NMI, ... of the embeddings seen in an epoch.

    ``update`` stores each batch's embeddings ``(B, D)``, labels ``(B,)`` and, optionally,
    the items' dataset indices ``(B,)``; ``compute`` gathers them from every process
    (under DDP), drops the copies of items that padding repeated and restores the
    dataset order (when indices were given), then runs one search
    (:func:`~lightning_metric.evaluation.retrieval_results`) and returns ``{name: 0-d
    tensor}``, the same on every rank and equal to a single process's. Without indices
    under DDP a warning says the padded items count twice. By default the set retrieves
    from itself (each item excluded from its own neighbours); batches passed with
    ``reference=True`` form a separate gallery instead, and the others are the queries;
    or :meth:`evaluate` splits the set into queries and gallery by its
    :class:`~lightning_metric.data.roles.EvalRoles` and also returns the search's
    :class:`~lightning_metric.evaluation.RetrievalResults`.
    The keyword arguments are ``retrieval_metrics``'s (``k=None`` ranks the whole set, as
    PML: use ``k="max_bin_count"`` for large sets); ``top_k`` neighbours of each query are
    kept in the results of :meth:`evaluate` (0: none).

    Raises:
        ValueError: at construction, for unknown metrics in ``include`` or a bad
            ``recall_at_k``; at ``update``, for shapes that do not match or indices given
            with some batches and not others; at ``compute``, before any query batch, and
            the errors of ``retrieval_metrics``.

    Example::

        >>> metric = RetrievalMetric(k="max_bin_count", recall_at_k=[1, 5, 10])
        >>> for embeddings, labels, indices in batches: metric.update(embeddings, labels, indices)
        >>> metric.compute()["mean_average_precision_at_r"]
    """

    higher_is_better = True

    def __init__(
        self,
        distance: str = "cosine",
        k: int | str | None = None,
        index: str = "exact",
        chunk_size: int = 4096,
        include: Collection[str] | None = None,
        seed: int = 1234,
        recall_at_k: Iterable[int] = RECALL_KS,
        top_k: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(("query", "reference"), **kwargs)
        self.names = selected_metrics(include, recall_at_k)
        self.options = {
            "distance": distance, "k": k, "index": index, "chunk_size": chunk_size,
            "recall_at_k": tuple(recall_at_k), "top_k": top_k,
        }
        self.seed = seed

    def update(self, embeddings: Tensor, labels: Tensor, indices: Tensor | None = None,
               reference: bool = False) -> None:
        """Store a batch: ``embeddings`` ``(B, D)``, ``labels`` ``(B,)``, optional dataset
        ``indices`` ``(B,)``; ``reference=True`` puts it in the gallery, not the queries."""
        self._store("reference" if reference else "query", embeddings, labels, indices)

    def compute(self) -> dict[str, Tensor]:
        _, values = self._evaluate(None, per_category=False)
        return {name: torch.tensor(value, device=self.device) for name, value in values.items()}

    def evaluate(
        self, roles: EvalRoles | None = None, per_category: bool = False
    ) -> tuple[RetrievalResults | None, dict[str, float]]:
        """The search's results and the metrics, gathered from every process like ``compute``
        (a collective call under DDP: every rank must make it; all get the same answer).

        Args:
            roles: which items of the evaluation set (in dataset order: ``roles`` index the
                items by their dataset index) are queries and gallery items, and their
                categories; None: self-retrieval (or the ``reference=True`` batches).
            per_category: also ``"<category name>/<metric>"`` for each category of the
                queries (needs ``roles.categories``): the metrics over that category's
                queries, each retrieving from the whole gallery. ``k="max_bin_count"`` is
                resolved once, over all the queries.

        Returns:
            ``(results, {name: value})``; ``results`` is None when no rank metric is asked.
            Its ``query_ids`` / ``reference_ids`` are the items' dataset indices (their
            positions in dataset order when the batches carried no indices).

        Raises:
            ValueError: before any query batch; with ``roles`` and ``reference=True``
                batches both; items beyond the roles, or no indices and another count of
                items than the roles describe.
        """
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync,
            should_unsync=self._should_unsync,
        ):
            return self._evaluate(roles, per_category)

    def _evaluate(
        self, roles: EvalRoles | None, per_category: bool
    ) -> tuple[RetrievalResults | None, dict[str, float]]:
        items = self._collected_items("query")
        if items is None:
            raise ValueError("RetrievalMetric.compute() was called before any query batch")
        reference = self._collected_items("reference")
        if roles is not None and reference is not None:
            raise ValueError(
                "RetrievalMetric got eval roles and reference=True batches: the roles already "
                "say which items are the gallery, pass one or the other"
            )
        sets = _split(items, roles) if roles is not None else _sets(items, reference)
        if sets.empty:  # a partial set (sanity check, limited batches) without queries or gallery
            return None, dict.fromkeys(self.names, math.nan)
        results = self._search(sets)
        categories = _query_categories(sets, roles) if per_category else {}
        values = {}
        for prefix, queries in {"": None, **categories}.items():
            values.update({prefix + name: value
                           for name, value in self._averaged(results, sets, queries).items()})
        return results, values

    def _search(self, sets: _Sets) -> RetrievalResults | None:
        """The one search of the rank metrics (with AP@R when neighbours are kept)."""
        searched = [name for name in self.names if name not in CLUSTER_METRICS]
        if not searched:
            return None
        if self.options["top_k"] and "mean_average_precision_at_r" not in searched:
            searched.append("mean_average_precision_at_r")  # what pictures of the worst read
        return retrieval_results(*sets.arguments, **sets.ids, include=searched, **self.options)

    def _averaged(self, results: RetrievalResults | None, sets: _Sets,
                  queries: Tensor | None) -> dict[str, float]:
        """The metrics ``self.names`` over the ``queries`` ``(Q,)`` bool (None: all)."""
        values = {}
        if results is not None:
            ranked = [name for name in self.names if name not in CLUSTER_METRICS]
            values.update(results.metrics(ranked, queries))
        if any(name in CLUSTER_METRICS for name in self.names):
            values.update(self._clusters(sets, queries))
        return {name: values[name] for name in self.names}

    def _clusters(self, sets: _Sets, queries: Tensor | None) -> dict[str, float]:
        """NMI and AMI of the ``queries`` (None: all; NaN when there are none)."""
        embeddings, labels = sets.query, sets.query_labels
        if queries is not None:
            embeddings, labels = embeddings[queries], labels[queries]
        if len(embeddings) == 0:
            return dict.fromkeys(CLUSTER_METRICS, math.nan)
        return cluster_metrics(embeddings, labels, self.options["distance"], self.seed)


class _Sets:
    """Queries and gallery of an evaluation (gallery None: self-retrieval), with ids."""

    def __init__(self, query, query_labels, query_ids, reference=None, reference_labels=None,
                 reference_ids=None, query_categories=None):
        self.query, self.query_labels, self.query_ids = query, query_labels, query_ids
        self.reference, self.reference_labels = reference, reference_labels
        self.reference_ids = reference_ids
        self.query_categories = query_categories

    @property
    def arguments(self) -> tuple:
        """``retrieval_results``'s positional arguments."""
        return (self.query, self.query_labels, self.reference, self.reference_labels)

    @property
    def ids(self) -> dict[str, Tensor | None]:
        """``retrieval_results``'s ``query_ids`` and ``reference_ids``."""
        return {"query_ids": self.query_ids, "reference_ids": self.reference_ids}

    @property
    def empty(self) -> bool:
        """No query, or a separate gallery without any item."""
        return len(self.query) == 0 or (self.reference is not None and len(self.reference) == 0)


def _positions(items: tuple[Tensor, Tensor, Tensor | None]) -> Tensor:
    """The items' dataset indices, or their positions when the batches carried none."""
    embeddings, _, indices = items
    return torch.arange(len(embeddings)) if indices is None else indices.cpu()


def _sets(items, reference) -> _Sets:
    """Self-retrieval of ``items``, or ``items`` against the ``reference=True`` batches."""
    if reference is None:
        return _Sets(items[0].cpu(), items[1].cpu(), _positions(items))
    return _Sets(items[0].cpu(), items[1].cpu(), None, reference[0].cpu(), reference[1].cpu())


def _split(items, roles: EvalRoles) -> _Sets:
    """Queries and gallery of ``items`` by their ``roles`` (indexed by dataset index)."""
    embeddings, labels, ids = items[0].cpu(), items[1].cpu(), _positions(items)
    if items[2] is None and len(ids) != len(roles.is_query):
        raise ValueError(
            f"the eval roles describe {len(roles.is_query)} items but the evaluation gave "
            f"{len(ids)} without dataset indices: return 'indices' from the evaluation step"
        )
    if len(ids) and int(ids.max()) >= len(roles.is_query):
        raise ValueError(
            f"dataset index {int(ids.max())} is beyond the eval roles' {len(roles.is_query)} items"
        )
    is_query = roles.is_query.cpu().to(torch.bool)[ids]
    is_gallery = roles.is_gallery.cpu().to(torch.bool)[ids]
    categories = None if roles.categories is None else roles.categories.cpu()[ids][is_query]
    return _Sets(
        embeddings[is_query], labels[is_query], ids[is_query],
        embeddings[is_gallery], labels[is_gallery], ids[is_gallery], categories,
    )


def _query_categories(sets: _Sets, roles: EvalRoles | None) -> dict[str, Tensor]:
    """``{"<category name>/": (Q,) bool}`` the queries of each category (none without)."""
    if roles is None or sets.query_categories is None:
        return {}
    names = roles.category_names
    return {
        f"{names[code] if 0 <= code < len(names) else code}/": sets.query_categories == code
        for code in torch.unique(sets.query_categories).tolist()
    }
