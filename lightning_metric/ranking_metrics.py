"""Information-retrieval metrics of a search, scored by torchmetrics: MRR@K and NDCG@K.

The query-document metrics of sentence-transformers' InformationRetrievalEvaluator and
BEIR, read from the neighbours one :class:`~lightning_metric.evaluation.RetrievalResults`
already holds (no second search). Each query's ranking is handed to torchmetrics as our
search ordered it (equal distances in the documented tie order), with the relevant
items the top ``K`` missed appended below it, so the ideal DCG counts every relevant
item (binary relevance: an item is relevant when it shares the query's label).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.retrieval import (
    retrieval_normalized_dcg,
    retrieval_reciprocal_rank,
)

from .evaluation import RetrievalResults


def ranking_metrics(results: RetrievalResults, k: int = 10) -> dict[str, float]:
    """``{"mrr_at_K", "ndcg_at_K"}``: means over the non-lone queries (NaN when none).

    - ``mrr_at_K``: 1 / rank of the first relevant item within the top ``K``, else 0.
    - ``ndcg_at_K``: DCG of the top ``K`` (gain 1 for a relevant item, discount
      ``1 / log2(rank + 1)``) over the DCG of an ideal ranking of the query's ``R``
      relevant items (Järvelin and Kekäläinen, ACM TOIS 2002).

    Args:
        results: a search that kept at least ``k`` neighbours a query (``top_k >= k``).
        k: the cut-off (default 10).

    Raises:
        ValueError: ``k`` below 1, or more than the neighbours ``results`` kept.
    """
    kept = results.neighbours.shape[1]
    if k < 1 or k > kept:
        raise ValueError(f"ranking metrics at k={k} need 1 <= k <= the {kept} neighbours kept "
                         "a query (RetrievalMetrics' top_k)")
    mrr, ndcg = [], []
    for row in torch.nonzero(~results.lone).squeeze(1).tolist():
        preds, target = _ranking(results.is_relevant[row], results.neighbours[row],
                                 int(results.relevant[row]))
        mrr.append(retrieval_reciprocal_rank(preds, target, top_k=k))
        ndcg.append(retrieval_normalized_dcg(preds, target, top_k=k))
    if not mrr:
        return {f"mrr_at_{k}": float("nan"), f"ndcg_at_{k}": float("nan")}
    return {f"mrr_at_{k}": float(torch.stack(mrr).mean()),
            f"ndcg_at_{k}": float(torch.stack(ndcg).mean())}


def _ranking(is_relevant: Tensor, neighbours: Tensor, relevant: int) -> tuple[Tensor, Tensor]:
    """Scores that keep the search's order, and the binary relevance: the kept neighbours
    (``-1`` padding dropped), then the relevant items not among them, ranked last."""
    hits = is_relevant[neighbours >= 0]
    missed = max(relevant - int(hits.sum()), 0)
    target = torch.cat([hits, torch.ones(missed, dtype=torch.bool)])
    preds = torch.arange(len(target), 0, -1, dtype=torch.float32)
    return preds, target
