"""Ties: one rule in every ranking path, for both distances, whatever k and storage order.

The rule (``lightning_metric.evaluation``'s docstring): among reference items at the same
distance from a query, those without the query's label rank first. Every expected value
below is worked out from that rule, not taken from another path.
"""

from __future__ import annotations

import pytest
import torch

from lightning_metric import evaluation
from lightning_metric.evaluation import RANK_METRICS, retrieval_metrics

K_BOUNDED = ("mean_average_precision", "mean_reciprocal_rank")


@pytest.fixture(params=["faiss", "full", "faiss_then_full"])
def ranker(request, monkeypatch):
    """FAISS selection searched deeper until tie groups are whole, the full ranking, and FAISS
    handing the queries whose tie group outgrows a small ``_MAX_SELECTED`` to the full ranking."""
    max_selected = {"faiss": 10**9, "full": 0, "faiss_then_full": 12}[request.param]
    monkeypatch.setattr(evaluation, "_MAX_SELECTED", max_selected)
    return request.param


def on_a_line(positions, distance):
    """1-D points for euclidean; for cosine, unit vectors 10 degrees apart per unit, so the
    cosine order is the line's order and equal positions are identical rows."""
    x = torch.tensor(positions, dtype=torch.float32)
    if distance == "euclidean":
        return x[:, None]
    angle = torch.deg2rad(10 * x)
    return torch.stack([angle.cos(), angle.sin()], dim=1)


# -- a tie group longer than the first search --------------------------------------------------

# Query at 0 (label 0). Gallery: five items at 1 (labels 0 0 0 0 1, the miss stored last), two
# at 2 (labels 1 0), three at 3 (label 0), five misses at 5..9; R = 8. The rule ranks the
# group at 1 as miss, hit x4, the group at 2 as miss, hit, then hit x3: relevant ranks
# 2 3 4 5 7 8 9 10. The 8th neighbour's group (at 3) runs past a search 9 deep.
TIED_GALLERY = [1.0] * 5 + [2.0] * 2 + [3.0] * 3 + [5.0, 6.0, 7.0, 8.0, 9.0]
TIED_LABELS = [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 1]
TIED_RANKS = [2, 3, 4, 5, 7, 8, 9, 10]


def by_rule(ranks, relevant, k):
    """The rank metrics of one query from its relevant items' ranks (hand formulas)."""
    within_r = [rank for rank in ranks if rank <= relevant]
    within_k = [rank for rank in ranks if rank <= k]
    metrics = {
        "precision_at_1": float(ranks[0] == 1),
        "r_precision": len(within_r) / relevant,
        "mean_average_precision_at_r": sum(
            (i + 1) / rank for i, rank in enumerate(within_r)
        ) / relevant,
        "mean_average_precision": sum((i + 1) / rank for i, rank in enumerate(within_k)) / relevant,
        "mean_reciprocal_rank": 1 / ranks[0] if ranks[0] <= k else 0.0,
    }
    return metrics | {f"recall_at_{K}": float(ranks[0] <= K) for K in (1, 2, 4, 8)}


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("k", [1, 2, None])
def test_tie_group_longer_than_the_first_search(ranker, distance, k):
    ours = retrieval_metrics(
        on_a_line([0.0], distance), torch.tensor([0]),
        on_a_line(TIED_GALLERY, distance), torch.tensor(TIED_LABELS),
        distance=distance, k=k, include=RANK_METRICS,
    )
    assert ours == pytest.approx(by_rule(TIED_RANKS, 8, len(TIED_GALLERY) if k is None else k))


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_first_search_is_deepened_until_the_tie_group_ends(monkeypatch, distance):
    # precision@1 alone needs 1 neighbour: searched 2 deep (one past it), the five items at
    # distance 1 are one open group, so the search goes 4 then 8 deep, where it closes.
    monkeypatch.setattr(evaluation, "_MAX_SELECTED", 10**9)
    widths = []
    search = evaluation._FaissRanker._search

    def recording(self, query, query_codes, ids, width, columns):
        widths.append(width)
        return search(self, query, query_codes, ids, width, columns)

    monkeypatch.setattr(evaluation._FaissRanker, "_search", recording)
    ours = retrieval_metrics(
        on_a_line([0.0], distance), torch.tensor([0]),
        on_a_line(TIED_GALLERY, distance), torch.tensor(TIED_LABELS),
        distance=distance, include=("precision_at_1",),
    )
    assert ours == {"precision_at_1": 0.0}  # the miss stored last still ranks first
    assert widths == [2, 4, 8]


# -- a collapsed embedding ---------------------------------------------------------------------


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("k", [1, "max_bin_count", None])
def test_collapsed_embedding_scores_nothing(ranker, distance, k):
    # 30 copies of one vector, 3 classes of 10: for each query the 29 others tie, so its 20
    # misses rank 1..20 and its 9 hits 21..29. Only MAP and MRR with k >= 21 see a hit.
    embeddings, labels = torch.ones(30, 4), torch.arange(30) % 3
    ours = retrieval_metrics(embeddings, labels, distance=distance, k=k, include=RANK_METRICS)
    k_value = {1: 1, "max_bin_count": 9, None: 29}[k]
    expected = by_rule(list(range(21, 30)), 9, k_value)
    assert ours == pytest.approx(expected)
    assert ours["precision_at_1"] == 0.0


@pytest.mark.parametrize("index", ["hnsw", "ivf"])
def test_approximate_indexes_apply_the_rule_to_what_they_return(index):
    # At least 10 of the 29 others come back (depth 9, the largest R), so at least one miss:
    # ranked first by the rule, whatever order the index returned them in.
    embeddings, labels = torch.ones(30, 4), torch.arange(30) % 3
    ours = retrieval_metrics(embeddings, labels, k="max_bin_count", index=index)
    assert ours["precision_at_1"] == 0.0


# -- duplicated embeddings ---------------------------------------------------------------------

# 700 random vectors, each stored 3 times: twice with its own label (a class of 2) and once
# with a label shared by all the third copies (a class of 700). Self-retrieval:
# - an "own" query (1400 of them, R = 1): at distance 0 its own twin (hit) ties with the
#   shared copy (miss), so the hit ranks 2;
# - a "shared" query (700, R = 699): at distance 0 come its two own copies (misses), then each
#   other vector is a tie group of own, own (misses) and shared (hit): the n-th hit ranks 3n + 2.
ITEMS = 700
SHARED_R = ITEMS - 1


def duplicated(order):
    g = torch.Generator().manual_seed(0)
    vectors = torch.randn(ITEMS, 32, generator=g)
    own, shared = torch.arange(ITEMS), torch.full((ITEMS,), ITEMS)
    copies = [own, own, shared] if order == "own, own, shared" else [shared, own, own]
    return vectors.repeat_interleave(3, dim=0), torch.stack(copies, dim=1).reshape(-1)


def duplicated_expected(k):
    """The metrics by the rule (see above), averaged over 1400 own and 700 shared queries."""
    k = 3 * ITEMS - 1 if k is None else SHARED_R if k == "max_bin_count" else k
    own = by_rule([2], 1, k)
    shared = by_rule([3 * n + 2 for n in range(1, SHARED_R + 1)], SHARED_R, k)
    return {name: (2 * own[name] + shared[name]) / 3 for name in RANK_METRICS}


def test_duplicated_expected_values_by_hand():
    # The formulas of duplicated_expected, written out: the own queries score 0 except
    # Recall@2+ and, with k >= 2, MAP = MRR = 1/2; a shared query has (699 - 2) // 3 = 232
    # hits within its first 699 and its first hit at 5.
    expected = duplicated_expected("max_bin_count")
    first_r = sum(n / (3 * n + 2) for n in range(1, 233)) / SHARED_R
    assert expected == pytest.approx({
        "precision_at_1": 0.0,
        "r_precision": 232 / SHARED_R / 3,
        "mean_average_precision_at_r": first_r / 3,
        "mean_average_precision": (2 * 0.5 + first_r) / 3,
        "mean_reciprocal_rank": (2 * 0.5 + 0.2) / 3,
        "recall_at_1": 0.0,
        "recall_at_2": 2 / 3,
        "recall_at_4": 2 / 3,
        "recall_at_8": 1.0,
    })
    assert duplicated_expected(1)["mean_average_precision"] == 0.0
    assert duplicated_expected(None)["mean_average_precision"] == pytest.approx(
        (2 * 0.5 + sum(n / (3 * n + 2) for n in range(1, 700)) / SHARED_R) / 3
    )


@pytest.mark.parametrize("order", ["own, own, shared", "shared, own, own"])
@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_duplicated_embeddings_give_the_same_metrics_whatever_k(order, distance):
    # k = None ranks everything in full (2099 > _MAX_SELECTED); k = 1 and "max_bin_count" need
    # 699 neighbours (the largest R) from FAISS, whose tie groups straddle the first search.
    # Equal up to float32 rounding: a few pairs of different vectors have distances that
    # round to the same float32 in one path and not in the other (MAP@R moves by ~1e-9).
    embeddings, labels = duplicated(order)
    results = {
        k: retrieval_metrics(embeddings, labels, distance=distance, k=k, include=RANK_METRICS)
        for k in (1, "max_bin_count", None)
    }
    for k, ours in results.items():
        assert ours == pytest.approx(duplicated_expected(k), rel=1e-6, abs=1e-9), k
        unbounded = {name: value for name, value in ours.items() if name not in K_BOUNDED}
        assert unbounded == pytest.approx(
            {name: value for name, value in results[None].items() if name not in K_BOUNDED},
            rel=1e-6, abs=1e-9,
        )


@pytest.mark.parametrize("max_selected", [0, 1000, 10**9])
@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_duplicated_embeddings_in_every_path(monkeypatch, max_selected, distance):
    # Full ranking (0), FAISS handing the unfinished tie groups to the full ranking (1000:
    # 701 deep first, 1402 would pass it), FAISS only (deepened up to the whole set).
    monkeypatch.setattr(evaluation, "_MAX_SELECTED", max_selected)
    embeddings, labels = duplicated("shared, own, own")
    ours = retrieval_metrics(
        embeddings, labels, distance=distance, k="max_bin_count", include=RANK_METRICS,
        chunk_size=500,
    )
    assert ours == pytest.approx(duplicated_expected("max_bin_count"))
