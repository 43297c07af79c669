"""MRR@K and NDCG@K of a search, scored by torchmetrics from the neighbours it kept."""

import math

import pytest
import torch

from lightning_metric.evaluation import retrieval_results
from lightning_metric.ranking_metrics import ranking_metrics


def test_hand_computed_mrr_and_ndcg_count_the_relevant_items_the_top_k_missed():
    # One query at 0; gallery on a line: labels by distance 1, 0, 1, 1 (query label 1).
    query, query_labels = torch.tensor([[0.0]]), torch.tensor([1])
    gallery = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    gallery_labels = torch.tensor([1, 0, 1, 1])
    results = retrieval_results(query, query_labels, gallery, gallery_labels,
                                distance="euclidean", top_k=2)
    values = ranking_metrics(results, k=2)
    # ranking: relevant, irrelevant | relevant, relevant beyond the cut-off
    assert values["mrr_at_2"] == pytest.approx(1.0)
    ideal = 1 + 1 / math.log2(3)                      # two of the three relevant fit in 2
    assert values["ndcg_at_2"] == pytest.approx(1 / ideal)


def test_a_first_hit_at_rank_three_scores_a_third_and_lone_queries_are_left_out():
    query = torch.tensor([[0.0], [10.0]])
    gallery = torch.tensor([[1.0], [2.0], [3.0]])
    results = retrieval_results(query, torch.tensor([1, 7]), gallery, torch.tensor([0, 0, 1]),
                                distance="euclidean", top_k=3)
    values = ranking_metrics(results, k=3)          # label 7 has no gallery item: lone
    assert values["mrr_at_3"] == pytest.approx(1 / 3)
    assert values["ndcg_at_3"] == pytest.approx(1 / math.log2(4))
    with pytest.raises(ValueError, match="k=4 need 1 <= k <= the 3 neighbours kept"):
        ranking_metrics(results, k=4)


def test_the_callback_refuses_a_cut_off_deeper_than_the_neighbours_it_keeps():
    from lightning_metric.callbacks import RetrievalMetrics

    with pytest.raises(ValueError, match="ranking_at_k=20 must be between 1 and top_k=10"):
        RetrievalMetrics(top_k=10, ranking_at_k=20)
