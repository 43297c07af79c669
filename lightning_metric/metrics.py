"""torchmetrics wrappers: embeddings accumulated over an evaluation epoch, exact under DDP.

Under DDP each process embeds its shard of the evaluation set; a
``DistributedSampler`` pads the shards to equal size by repeating items. Every
item therefore carries its dataset index: after the gather (torchmetrics' ``cat``
states), :func:`in_dataset_order` drops the repeated copies and restores the
dataset order, so the metrics are computed on exactly the items, in exactly the
order, a single process would see (open-metric-learning's accumulator does the same).
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from .distributed import is_distributed
from .evaluation import retrieval_metrics


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
            return embeddings, labels
        return in_dataset_order(indices, embeddings, labels)

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
    dataset order (when indices were given), then runs
    :func:`~lightning_metric.evaluation.retrieval_metrics` and returns ``{name: 0-d
    tensor}``, the same on every rank and equal to a single process's. Without indices
    under DDP a warning says the padded items count twice. By default the set retrieves
    from itself (each item excluded from its own neighbours); batches passed with
    ``reference=True`` form a separate gallery instead, and the others are the queries.
    The keyword arguments are ``retrieval_metrics``'s (``k=None`` ranks the whole set, as
    PML: use ``k="max_bin_count"`` for large sets).

    Raises:
        ValueError: at ``update``, for shapes that do not match or indices given with some
            batches and not others; at ``compute``, before any query batch.

    Example::

        >>> metric = RetrievalMetric(k="max_bin_count")
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
        **kwargs,
    ) -> None:
        super().__init__(("query", "reference"), **kwargs)
        self.options = {
            "distance": distance, "k": k, "index": index, "chunk_size": chunk_size,
            "include": include, "seed": seed,
        }

    def update(self, embeddings: Tensor, labels: Tensor, indices: Tensor | None = None,
               reference: bool = False) -> None:
        """Store a batch: ``embeddings`` ``(B, D)``, ``labels`` ``(B,)``, optional dataset
        ``indices`` ``(B,)``; ``reference=True`` puts it in the gallery, not the queries."""
        self._store("reference" if reference else "query", embeddings, labels, indices)

    def compute(self) -> dict[str, Tensor]:
        queries = self._collected("query")
        if queries is None:
            raise ValueError("RetrievalMetric.compute() was called before any query batch")
        reference = self._collected("reference")
        references = (None, None) if reference is None else reference
        results = retrieval_metrics(*queries, *references, **self.options)
        return {name: torch.tensor(value, device=self.device) for name, value in results.items()}
