"""torchmetrics wrappers: retrieval metrics accumulated over an evaluation epoch."""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from .evaluation import retrieval_metrics


class RetrievalMetric(Metric):
    """Precision@1, R-precision, MAP@R, Recall@K, NMI, ... of the embeddings seen in an epoch.

    ``update`` stores each batch's embeddings ``(B, D)`` and labels ``(B,)`` (on DDP they are
    gathered from every process); ``compute`` runs :func:`~lightning_metric.evaluation.
    retrieval_metrics` on all of them and returns ``{name: 0-d tensor}``. By default the
    set retrieves from itself (each item excluded from its own neighbours); batches passed
    with ``reference=True`` form a separate gallery instead, and the others are the queries.
    The keyword arguments are ``retrieval_metrics``'s (``k=None`` ranks the whole set, as
    PML: use ``k="max_bin_count"`` for large sets).

    Example::

        >>> metric = RetrievalMetric(k="max_bin_count")
        >>> for embeddings, labels in batches: metric.update(embeddings, labels)
        >>> metric.compute()["mean_average_precision_at_r"]
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

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
        super().__init__(**kwargs)
        self.options = {
            "distance": distance, "k": k, "index": index, "chunk_size": chunk_size,
            "include": include, "seed": seed,
        }
        for name in ("query_embeddings", "query_labels", "reference_embeddings",
                     "reference_labels"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, embeddings: Tensor, labels: Tensor, reference: bool = False) -> None:
        """Store a batch: ``embeddings`` ``(B, D)``, ``labels`` ``(B,)``; ``reference=True``
        puts it in the gallery rather than among the queries."""
        if embeddings.ndim != 2 or labels.ndim != 1 or len(embeddings) != len(labels):
            raise ValueError(
                f"expected embeddings (B, D) and labels (B,), got {tuple(embeddings.shape)} "
                f"and {tuple(labels.shape)}"
            )
        prefix = "reference" if reference else "query"
        getattr(self, f"{prefix}_embeddings").append(embeddings.detach().float())
        getattr(self, f"{prefix}_labels").append(labels.detach())

    def compute(self) -> dict[str, Tensor]:
        query, query_labels = _gathered(self.query_embeddings), _gathered(self.query_labels)
        if query is None:
            raise ValueError("RetrievalMetric.compute() was called before any query batch")
        reference = _gathered(self.reference_embeddings)
        reference_labels = None if reference is None else _gathered(self.reference_labels)
        results = retrieval_metrics(
            query, query_labels, reference, reference_labels, **self.options
        )
        return {name: torch.tensor(value, device=self.device) for name, value in results.items()}


def _gathered(state: list[Tensor] | Tensor) -> Tensor | None:
    """A ``cat`` state as one tensor (a list before DDP sync, a tensor after); None if empty."""
    if isinstance(state, list):
        return dim_zero_cat(state) if state else None
    return state if state.numel() else None
