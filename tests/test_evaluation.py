"""Retrieval metrics: hand-computed cases, parity with PML's AccuracyCalculator, bad inputs."""

from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction as Fr

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from sklearn.metrics import adjusted_mutual_info_score

from lightning_metric import evaluation
from lightning_metric.callbacks import RetrievalMetrics
from lightning_metric.evaluation import (
    METRICS,
    R_METRICS,
    RANK_METRICS,
    precision_at_1,
    retrieval_metrics,
)
from lightning_metric.metrics import RetrievalMetric

PML_KEYS = (
    "precision_at_1", "r_precision", "mean_average_precision_at_r", "mean_average_precision",
    "mean_reciprocal_rank", "NMI", "AMI",
)


@pytest.fixture(params=["faiss", "full"])
def ranker(request, monkeypatch):
    """Run a test with both ways of ranking: FAISS top-k selection and the full ranking."""
    if request.param == "full":
        monkeypatch.setattr(evaluation, "_MAX_SELECTED", 0)
    else:
        monkeypatch.setattr(evaluation, "_MAX_SELECTED", 10**9)
    return request.param


def clustered(n=300, dim=16, classes=12, singletons=4, seed=0, spread=0.9):
    """Gaussian clusters with imbalanced class sizes (~1/rank) plus singleton classes."""
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, classes + 1)
    labels = torch.multinomial(weights, n - singletons, replacement=True, generator=g)
    labels = torch.cat([labels, torch.arange(classes, classes + singletons)])
    centres = torch.randn(classes + singletons, dim, generator=g)
    embeddings = centres[labels] + spread * torch.randn(n, dim, generator=g)
    order = torch.randperm(n, generator=g)
    return embeddings[order], labels[order]


def pml(query, query_labels, reference=None, reference_labels=None, k=None):
    calculator = AccuracyCalculator(k=k, device=torch.device("cpu"))
    return calculator.get_accuracy(query, query_labels, reference, reference_labels)


def pml_where_right(query, query_labels, reference=None, reference_labels=None, k=None):
    """PML's values where they are right: PML reads R-precision and MAP@R in its first k
    neighbours only, which is wrong for an int k < R, so for an int k those two come from a
    run with ``k=None``."""
    theirs = pml(query, query_labels, reference, reference_labels, k=k)
    if isinstance(k, int):
        full_depth = pml(query, query_labels, reference, reference_labels, k=None)
        theirs.update({name: full_depth[name] for name in R_METRICS})
    return theirs


def assert_matches_pml(ours, theirs):
    for name in PML_KEYS:
        assert ours[name] == pytest.approx(theirs[name], abs=1e-6), name


# -- hand-computed cases -----------------------------------------------------------------------

# Six points on a line; neighbours of each, nearest first (all distances distinct):
#   item 0 (x=0): 1 2 3 4 5     item 2 (x=3): 1 0 3 4 5     item 4 (x=12): 3 5 2 1 0
#   item 1 (x=1): 0 2 3 4 5     item 3 (x=7): 2 4 1 0 5     item 5 (x=20): 4 3 2 1 0
LINE = [0.0, 1.0, 3.0, 7.0, 12.0, 20.0]
LINE_LABELS = [0, 0, 1, 0, 1, 1]  # R = 2 relevant items for every query
# Same-label hits per query:   q0 1 0 1 0 0   q1 1 0 1 0 0   q2 0 0 0 1 1
#                              q3 0 0 1 1 0   q4 0 1 1 0 0   q5 1 0 1 0 0
LINE_EXPECTED = {
    None: {
        "precision_at_1": Fr(3, 6),
        "r_precision": Fr(1, 2) * 4 / 6,
        "mean_average_precision_at_r": (Fr(1, 2) * 3 + Fr(1, 4)) / 6,
        # AP: q0, q1, q5 (1/1 + 2/3)/2; q2 (1/4 + 2/5)/2; q3 (1/3 + 2/4)/2; q4 (1/2 + 2/3)/2
        "mean_average_precision": (Fr(5, 6) * 3 + Fr(13, 40) + Fr(5, 12) + Fr(7, 12)) / 6,
        "mean_reciprocal_rank": (1 + 1 + Fr(1, 4) + Fr(1, 3) + Fr(1, 2) + 1) / 6,
        "recall_at_1": Fr(3, 6),
        "recall_at_2": Fr(4, 6),
        "recall_at_4": Fr(6, 6),
        "recall_at_8": Fr(6, 6),
    },
    1: {  # k = 1 < R = 2: MAP and MRR see the nearest neighbour, R-precision and MAP@R R of them
        "precision_at_1": Fr(3, 6),
        "r_precision": Fr(1, 2) * 4 / 6,
        "mean_average_precision_at_r": (Fr(1, 2) * 3 + Fr(1, 4)) / 6,
        "mean_average_precision": Fr(1, 2) * 3 / 6,
        "mean_reciprocal_rank": Fr(3, 6),
        "recall_at_1": Fr(3, 6),
        "recall_at_2": Fr(4, 6),
        "recall_at_4": Fr(6, 6),
        "recall_at_8": Fr(6, 6),
    },
    2: {
        "precision_at_1": Fr(3, 6),
        "r_precision": Fr(1, 2) * 4 / 6,
        "mean_average_precision_at_r": (Fr(1, 2) * 3 + Fr(1, 4)) / 6,
        "mean_average_precision": (Fr(1, 2) * 3 + Fr(1, 4)) / 6,
        "mean_reciprocal_rank": (1 + 1 + Fr(1, 2) + 1) / Fr(6),
        "recall_at_1": Fr(3, 6),
        "recall_at_2": Fr(4, 6),
        "recall_at_4": Fr(6, 6),
        "recall_at_8": Fr(6, 6),
    },
}
LINE_EXPECTED["max_bin_count"] = LINE_EXPECTED[2]  # the largest class has 3 items, minus self


def line_embeddings(distance):
    x = torch.tensor(LINE)
    if distance == "euclidean":
        return x[:, None]
    # On the unit circle at 3 degrees per unit: cosine neighbours are the line's neighbours.
    angle = torch.deg2rad(3 * x)
    return torch.stack([angle.cos(), angle.sin()], dim=1) * torch.arange(1.0, 7.0)[:, None]


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("k", [None, 1, 2, "max_bin_count"])
def test_six_points_on_a_line(ranker, distance, k):
    ours = retrieval_metrics(
        line_embeddings(distance), torch.tensor(LINE_LABELS), distance=distance, k=k,
        include=RANK_METRICS,
    )
    assert ours == pytest.approx({name: float(v) for name, v in LINE_EXPECTED[k].items()})
    if distance == "euclidean":  # and PML agrees with the hand count where it is right
        theirs = pml_where_right(line_embeddings(distance), torch.tensor(LINE_LABELS), k=k)
        assert {name: ours[name] for name in PML_KEYS[:5]} == pytest.approx(
            {name: theirs[name] for name in PML_KEYS[:5]}, abs=1e-6
        )


def test_separate_gallery_by_hand(ranker):
    # Gallery at 0 (A), 2 (B), 10 (A). Query 1.2 (A): 2 0 10 -> hits 0 1 1, R = 2.
    # Query 9 (B): 10 2 0 -> hits 0 1 0, R = 1. Query 4 has label C, absent: left out.
    gallery, gallery_labels = torch.tensor([[0.0], [2.0], [10.0]]), torch.tensor([0, 1, 0])
    queries, query_labels = torch.tensor([[1.2], [9.0], [4.0]]), torch.tensor([0, 1, 2])
    ours = retrieval_metrics(
        queries, query_labels, gallery, gallery_labels, distance="euclidean",
        include=RANK_METRICS,
    )
    assert ours == pytest.approx({
        "precision_at_1": 0.0,
        "r_precision": (1 / 2 + 0) / 2,
        "mean_average_precision_at_r": (1 / 4 + 0) / 2,
        "mean_average_precision": ((1 / 2 + 2 / 3) / 2 + 1 / 2) / 2,
        "mean_reciprocal_rank": 1 / 2,
        "recall_at_1": 0.0,
        "recall_at_2": 1.0,
        "recall_at_4": 1.0,
        "recall_at_8": 1.0,
    })


def test_duplicates_are_neighbours_after_dropping_self_by_index(ranker):
    # Each item has an exact copy with its label: dropping "the zero distance" instead of the
    # item itself could drop the copy; every metric must be perfect.
    embeddings = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    for distance in ("cosine", "euclidean"):
        ours = retrieval_metrics(embeddings, labels, distance=distance, include=RANK_METRICS)
        assert ours == pytest.approx(dict.fromkeys(RANK_METRICS, 1.0))


def test_self_is_dropped_by_index_not_by_position():
    # Row 1: the query (left out) ties at distance 0 with a hit and a miss: it goes last and
    # the miss ranks before the hit. Row 2: the query is absent from its list; all stay.
    distances = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.5, 2.0, 2.0, 3.0]])
    groups = evaluation._tie_groups(distances)
    assert groups.tolist() == [[0, 0, 0, 1], [0, 1, 1, 2]]
    hits = torch.tensor([[True, False, True, True], [True, True, False, False]])
    left_out = torch.tensor([[True, False, False, False], [False, False, False, False]])
    ordered_hits, ordered_groups = evaluation._tie_ordered(groups, hits, left_out)
    assert ordered_hits.tolist() == [[False, True, True, False], [True, False, True, False]]
    assert ordered_groups.tolist() == [[0, 0, 1, 4], [0, 1, 1, 2]]


def test_k_beyond_the_reference_is_the_whole_reference(ranker):
    # PML would read labels at FAISS's -1 padding; we cap k at the reference size.
    embeddings, labels = clustered(n=50, seed=10)
    assert retrieval_metrics(embeddings, labels, k=500, include=RANK_METRICS) == pytest.approx(
        retrieval_metrics(embeddings, labels, k=None, include=RANK_METRICS)
    )


def test_lone_queries_are_left_out_and_all_lone_gives_nan(ranker):
    embeddings, labels = torch.tensor([[0.0], [1.0], [5.0], [9.0]]), torch.tensor([0, 0, 1, 2])
    ours = retrieval_metrics(embeddings, labels, distance="euclidean", include=RANK_METRICS)
    assert ours == pytest.approx(dict.fromkeys(RANK_METRICS, 1.0))  # only items 0 and 1 count
    singletons = retrieval_metrics(embeddings, torch.arange(4), include=RANK_METRICS)
    assert all(math.isnan(value) for value in singletons.values())
    absent = retrieval_metrics(embeddings, labels, embeddings, labels + 10, include=RANK_METRICS)
    assert all(math.isnan(value) for value in absent.values())


def mutual_information_by_hand(labels, clusters):
    """NMI with the arithmetic-mean normalisation (sklearn's default), from the definitions."""
    n = len(labels)
    joint = Counter(zip(labels, clusters, strict=True))
    p_label, p_cluster = Counter(labels), Counter(clusters)
    mi = sum(c / n * math.log(c * n / (p_label[a] * p_cluster[b])) for (a, b), c in joint.items())
    entropy = [-sum(c / n * math.log(c / n) for c in p.values()) for p in (p_label, p_cluster)]
    return mi / (sum(entropy) / 2)


def test_nmi_ami_on_separated_blobs_by_hand():
    # Three tight blobs far apart; labels follow the blobs except two mislabelled points.
    g = torch.Generator().manual_seed(0)
    blob = torch.arange(3).repeat_interleave(8)
    embeddings = torch.tensor([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0]])[blob]
    embeddings = embeddings + 0.1 * torch.randn(24, 2, generator=g)
    labels = blob.clone()
    labels[0], labels[9] = 1, 2
    ours = retrieval_metrics(embeddings, labels, distance="euclidean", include=("NMI", "AMI"))
    assert ours["NMI"] == pytest.approx(mutual_information_by_hand(labels.tolist(), blob.tolist()))
    assert ours["AMI"] == pytest.approx(adjusted_mutual_info_score(labels, blob))
    # A tiny case worked on paper: clusters {0, 1} {2, 3}, labels 0 0 0 1.
    # MI = 1/2 ln(4/3) + 1/4 ln(2/3) + 1/4 ln 2, H(labels) = -(3/4 ln 3/4 + 1/4 ln 1/4), H = ln 2.
    tiny = retrieval_metrics(
        torch.tensor([[0.0], [0.1], [9.0], [9.1]]), torch.tensor([0, 0, 0, 1]),
        distance="euclidean", include=("NMI",),
    )
    mi = math.log(4 / 3) / 2 + math.log(2 / 3) / 4 + math.log(2) / 4
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert tiny["NMI"] == pytest.approx(mi / ((entropy + math.log(2)) / 2))


# -- parity with PML ---------------------------------------------------------------------------


@pytest.mark.parametrize("k", [None, "max_bin_count", 3])
def test_self_retrieval_matches_pml_euclidean(ranker, k):
    embeddings, labels = clustered()
    assert_matches_pml(
        retrieval_metrics(embeddings, labels, distance="euclidean", k=k),
        pml_where_right(embeddings, labels, k=k),
    )


@pytest.mark.parametrize("k", [None, "max_bin_count"])
def test_self_retrieval_matches_pml_cosine(ranker, k):
    # PML searches with L2, which ranks L2-normalised embeddings as cosine does.
    embeddings, labels = clustered(seed=1, dim=8)
    assert_matches_pml(
        retrieval_metrics(embeddings, labels, k=k),
        pml(F.normalize(embeddings, dim=1), labels, k=k),
    )


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("k", [None, "max_bin_count", 5])
def test_separate_gallery_matches_pml(ranker, distance, k):
    embeddings, labels = clustered(n=400, seed=2)
    query, query_labels = embeddings[:150], labels[:150].clone()
    query_labels[:6] = torch.tensor([100, 100, 101, 102, 103, 103])  # not in the gallery
    gallery, gallery_labels = embeddings[150:], labels[150:]
    ours = retrieval_metrics(query, query_labels, gallery, gallery_labels, distance=distance, k=k)
    if distance == "cosine":
        query, gallery = F.normalize(query, dim=1), F.normalize(gallery, dim=1)
    assert_matches_pml(ours, pml_where_right(query, query_labels, gallery, gallery_labels, k=k))


def test_nmi_ami_match_pml_on_separated_clusters():
    # The parity tests above run the same seeded FAISS k-means as PML; here, on well separated
    # clusters, the partition (and so NMI = AMI = 1) must not depend on the seed.
    embeddings, labels = clustered(n=200, classes=3, singletons=0, seed=3, spread=0.05)
    theirs = pml(F.normalize(embeddings, dim=1), labels)
    assert theirs["NMI"] == pytest.approx(1.0)
    for seed in (0, 1, 1234):
        ours = retrieval_metrics(embeddings, labels, include=("NMI", "AMI"), seed=seed)
        assert ours == pytest.approx({"NMI": theirs["NMI"], "AMI": theirs["AMI"]}, abs=1e-6)


def test_recall_at_k_by_brute_force(ranker):
    embeddings, labels = clustered(seed=4)
    ours = retrieval_metrics(embeddings, labels, k="max_bin_count", include=RANK_METRICS)
    similarity = F.normalize(embeddings, dim=1) @ F.normalize(embeddings, dim=1).T
    similarity.fill_diagonal_(-math.inf)
    order = similarity.argsort(dim=1, descending=True)
    same = labels[order] == labels[:, None]
    keep = torch.bincount(labels)[labels] > 1  # queries with another item of their class
    for k in (1, 2, 4, 8):
        assert ours[f"recall_at_{k}"] == pytest.approx(float(same[keep, :k].any(1).float().mean()))


# -- R-based metrics read R neighbours whatever k ----------------------------------------------

# One query at 0 (label 0); gallery at 1 2 3 4 with labels 0 1 0 0, so R = 3 and the relevant
# items rank 1, 3, 4: R-precision 2/3 and MAP@R (1/1 + 2/3) / 3 = 5/9 for every k. PML with
# k = 1 reads them in the first neighbour only: 1/1 and (1/1) / 3.
GALLERY = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]])
GALLERY_LABELS = torch.tensor([0, 1, 0, 0])
QUERY, QUERY_LABELS = torch.tensor([[0.0, 0.0]]), torch.tensor([0])
GALLERY_EXPECTED = {
    "precision_at_1": 1, "r_precision": Fr(2, 3), "mean_average_precision_at_r": Fr(5, 9),
    "mean_reciprocal_rank": 1, "recall_at_1": 1, "recall_at_2": 1, "recall_at_4": 1,
    "recall_at_8": 1,
}
GALLERY_MAP = {  # the first k neighbours: ranks 1 (k = 1, 2), 1 and 3 (k = R = 3), all three
    1: Fr(1, 3), 2: Fr(1, 3), "max_bin_count": (1 + Fr(2, 3)) / 3,
    None: (1 + Fr(2, 3) + Fr(3, 4)) / 3,
}


@pytest.mark.parametrize("k", [1, 2, "max_bin_count", None])
def test_r_metrics_read_r_neighbours_whatever_k(ranker, k):
    ours = retrieval_metrics(
        QUERY, QUERY_LABELS, GALLERY, GALLERY_LABELS, distance="euclidean", k=k,
        include=RANK_METRICS,
    )
    expected = {**GALLERY_EXPECTED, "mean_average_precision": GALLERY_MAP[k]}
    assert ours == pytest.approx({name: float(value) for name, value in expected.items()})
    truncated = pml(QUERY, QUERY_LABELS, GALLERY, GALLERY_LABELS, k=1)  # why PML is no oracle
    assert (truncated["r_precision"], truncated["mean_average_precision_at_r"]) == (
        pytest.approx(1.0), pytest.approx(1 / 3)
    )


# Self-retrieval of 0 1 2 3 4 (labels 0 0 1 0 0; item 2 is lone, so left out), R = 3. Lists,
# with the tie rule (at equal distance the other label first): q0: 1+ 2- 3+ 4+;
# q1: 2- 0+ 3+ 4+ (0 and 2 tie at 1); q3: 2- 4+ 1+ 0+; q4: 3+ 2- 1+ 0+.
SELF_POINTS = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]])
SELF_LABELS = torch.tensor([0, 0, 1, 0, 0])
SELF_EXPECTED = {
    "precision_at_1": Fr(1, 2),
    "r_precision": Fr(2, 3),
    "mean_average_precision_at_r": (2 * (1 + Fr(2, 3)) / 3 + 2 * (Fr(1, 2) + Fr(2, 3)) / 3) / 4,
    "recall_at_1": Fr(1, 2), "recall_at_2": 1, "recall_at_4": 1, "recall_at_8": 1,
}
SELF_BY_K = {
    1: {"mean_average_precision": (2 * Fr(1, 3)) / 4, "mean_reciprocal_rank": Fr(1, 2)},
    None: {
        "mean_average_precision": (
            2 * (1 + Fr(2, 3) + Fr(3, 4)) / 3 + 2 * (Fr(1, 2) + Fr(2, 3) + Fr(3, 4)) / 3
        ) / 4,
        "mean_reciprocal_rank": Fr(3, 4),
    },
}


@pytest.mark.parametrize("k", [1, None])
def test_r_metrics_in_self_retrieval_with_ties_by_hand(ranker, k):
    ours = retrieval_metrics(
        SELF_POINTS, SELF_LABELS, distance="euclidean", k=k, include=RANK_METRICS
    )
    expected = {**SELF_EXPECTED, **SELF_BY_K[k]}
    assert ours == pytest.approx({name: float(value) for name, value in expected.items()})


def test_search_goes_r_deep_only_when_an_r_metric_is_requested(monkeypatch):
    assert evaluation._search_depth(["precision_at_1"], 1, 50, 99) == 1
    assert evaluation._search_depth(["precision_at_1", "recall_at_8"], 1, 50, 99) == 8
    assert evaluation._search_depth(["mean_reciprocal_rank"], 3, 50, 99) == 3
    assert evaluation._search_depth(["precision_at_1", "r_precision"], 1, 50, 99) == 50
    assert evaluation._search_depth(["mean_average_precision_at_r"], 1, 500, 99) == 99
    widths = []
    build_index = evaluation._build_index

    def recording(reference, distance, index, depth):
        widths.append(depth)
        return build_index(reference, distance, index, depth)

    monkeypatch.setattr(evaluation, "_build_index", recording)
    embeddings, labels = clustered(n=200, singletons=0, seed=11)
    precision_at_1(embeddings, labels)
    retrieval_metrics(embeddings, labels, k=1, include=("precision_at_1", "r_precision"))
    # depth 1 (plus the query itself and one past it), then the largest R (plus the same two)
    assert widths == [3, int(torch.bincount(labels).max()) - 1 + 2]


# -- options -----------------------------------------------------------------------------------


def test_chunks_dtypes_and_arrays_do_not_change_the_values(ranker):
    embeddings, labels = clustered(seed=5)
    reference = retrieval_metrics(embeddings, labels, include=RANK_METRICS)
    assert retrieval_metrics(
        embeddings, labels, chunk_size=7, include=RANK_METRICS
    ) == pytest.approx(reference)
    assert retrieval_metrics(
        embeddings.numpy(), labels.numpy(), include=RANK_METRICS
    ) == pytest.approx(reference)
    assert retrieval_metrics(
        embeddings.double(), labels, include=RANK_METRICS
    ) == pytest.approx(reference)
    for dtype in (torch.float16, torch.bfloat16):
        low = retrieval_metrics(embeddings.to(dtype), labels, include=RANK_METRICS)
        assert low["precision_at_1"] == pytest.approx(reference["precision_at_1"], abs=0.02)


def test_include_selects_metrics():
    embeddings, labels = clustered(n=60)
    assert list(retrieval_metrics(embeddings, labels)) == list(METRICS)
    assert list(retrieval_metrics(embeddings, labels, include=("AMI", "r_precision"))) == [
        "r_precision", "AMI",
    ]


@pytest.mark.parametrize("index", ["hnsw", "ivf"])
@pytest.mark.parametrize("separate", [False, True])
def test_approximate_indexes_are_close_to_exact(index, separate):
    embeddings, labels = clustered(n=4000, dim=32, classes=40, singletons=0, seed=6, spread=1.2)
    sets = (embeddings[:1000], labels[:1000], embeddings[1000:], labels[1000:]) if separate else (
        embeddings, labels
    )
    exact = retrieval_metrics(*sets, k="max_bin_count", include=RANK_METRICS)
    approximate = retrieval_metrics(*sets, k="max_bin_count", index=index, include=RANK_METRICS)
    assert 0.5 < exact["precision_at_1"] < 0.99  # a case where mistakes are possible
    assert approximate["precision_at_1"] == pytest.approx(exact["precision_at_1"], abs=0.01)
    assert approximate["mean_average_precision_at_r"] == pytest.approx(
        exact["mean_average_precision_at_r"], abs=0.05
    )


def test_precision_at_1_wrapper_matches_brute_force():
    embeddings, labels = clustered(n=200, singletons=0, seed=7)
    similarity = F.normalize(embeddings, dim=1) @ F.normalize(embeddings, dim=1).T
    similarity.fill_diagonal_(-math.inf)
    expected = float((labels[similarity.argmax(dim=1)] == labels).float().mean())
    assert precision_at_1(embeddings, labels) == pytest.approx(expected)
    assert precision_at_1(embeddings, labels, chunk_size=16) == pytest.approx(expected)


# -- bad inputs --------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    x, y = torch.randn(10, 4), torch.arange(10) % 3
    bad = x.clone()
    bad[2, 1], bad[5, 0], bad[5, 3] = math.nan, math.inf, math.nan
    cases = [
        (lambda: retrieval_metrics(bad, y), "query has 2 rows with NaN or inf"),
        (lambda: retrieval_metrics(x, y, bad, y), "reference has 2 rows with NaN or inf"),
        (lambda: retrieval_metrics(x, y, x[:0], y[:0]), "reference set is empty"),
        (lambda: retrieval_metrics(x[:0], y[:0], x, y), "query set is empty"),
        (lambda: retrieval_metrics(x[:1], y[:1]), "at least 2 items"),
        (lambda: retrieval_metrics(x, y[:9]), "one label per row"),
        (lambda: retrieval_metrics(x, y, x, y[:9]), "reference labels must be 1-D"),
        (lambda: retrieval_metrics(x, y[:, None]), "one label per row"),
        (lambda: retrieval_metrics(x, y, torch.randn(10, 5), y), "4 dimensions"),
        (lambda: retrieval_metrics(x[0], y), "2-D"),
        (lambda: retrieval_metrics(x[None], y), "2-D"),
        (lambda: retrieval_metrics(x, y, x), "reference was given without labels"),
        (lambda: retrieval_metrics(x, y, None, y), "reference_labels was given without"),
        (lambda: retrieval_metrics(x, y, distance="manhattan"), "unknown distance"),
        (lambda: retrieval_metrics(x, y, index="lsh"), "unknown index"),
        (lambda: retrieval_metrics(x, y, k=0), "k must be"),
        (lambda: retrieval_metrics(x, y, k="max"), "k must be"),
        (lambda: retrieval_metrics(x, y, k=True), "k must be"),
        (lambda: retrieval_metrics(x, y, chunk_size=0), "chunk_size"),
        (lambda: retrieval_metrics(x, y, include=("precision_at_5",)), "unknown metrics"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


# -- torchmetrics ------------------------------------------------------------------------------


def test_retrieval_metric_accumulates_batches():
    embeddings, labels = clustered(n=240, seed=8)
    metric = RetrievalMetric(k="max_bin_count")
    for chunk in range(3):
        rows = slice(80 * chunk, 80 * (chunk + 1))
        metric.update(embeddings[rows], labels[rows])
    result = metric.compute()
    expected = retrieval_metrics(embeddings, labels, k="max_bin_count")
    assert set(result) == set(METRICS)
    assert all(isinstance(value, torch.Tensor) for value in result.values())
    assert {name: float(value) for name, value in result.items()} == pytest.approx(expected)

    metric.reset()
    metric.update(embeddings[:100], labels[:100])
    metric.update(embeddings[100:150], labels[100:150], reference=True)
    metric.update(embeddings[150:], labels[150:], reference=True)
    separate = retrieval_metrics(
        embeddings[:100], labels[:100], embeddings[100:], labels[100:], k="max_bin_count"
    )
    assert {name: float(v) for name, v in metric.compute().items()} == pytest.approx(separate)


def test_retrieval_metric_errors():
    metric = RetrievalMetric()
    with pytest.raises(ValueError, match="before any query batch"):
        metric.compute()
    with pytest.raises(ValueError, match="expected embeddings"):
        metric.update(torch.randn(4, 3), torch.arange(5))


class _Validated(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(16, 8)
        self.retrieval = RetrievalMetric(k="max_bin_count", include=("precision_at_1", "NMI"))

    def validation_step(self, batch, batch_idx):
        inputs, labels = batch
        self.retrieval.update(self.encoder(inputs), labels)

    def on_validation_epoch_end(self):
        self.log_dict({f"val/{k}": v for k, v in self.retrieval.compute().items()})
        self.retrieval.reset()


def test_retrieval_metric_in_a_lightning_module():
    embeddings, labels = clustered(n=96, singletons=0, seed=9)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(embeddings, labels), batch_size=32
    )
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False,
    )
    logged = trainer.validate(_Validated(), loader, verbose=False)[0]
    assert set(logged) == {"val/precision_at_1", "val/NMI"}
    assert 0.0 <= logged["val/precision_at_1"] <= 1.0


def test_retrieval_metric_with_an_int_k_reads_r_neighbours():
    metric = RetrievalMetric(distance="euclidean", k=1, include=R_METRICS)
    metric.update(QUERY, QUERY_LABELS)
    metric.update(GALLERY, GALLERY_LABELS, reference=True)
    result = {name: float(value) for name, value in metric.compute().items()}
    assert result == pytest.approx({"r_precision": 2 / 3, "mean_average_precision_at_r": 5 / 9})


class _Embedded(pl.LightningModule):
    """Validation steps that return their inputs as embeddings, for the callback."""

    def validation_step(self, batch, batch_idx):
        inputs, labels = batch
        return {"embeddings": inputs, "labels": labels}


def test_retrieval_metrics_callback_with_an_int_k_reads_r_neighbours():
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(SELF_POINTS, SELF_LABELS), batch_size=2
    )
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[RetrievalMetrics(distance="euclidean", k=1, include=RANK_METRICS)],
    )
    logged = trainer.validate(_Embedded(), loader, verbose=False)[0]
    expected = {**SELF_EXPECTED, **SELF_BY_K[1]}
    assert logged == pytest.approx({f"val/{name}": float(v) for name, v in expected.items()})


def test_numpy_labels_can_be_any_hashable_integers():
    embeddings = np.array([[0.0], [1.0], [5.0], [6.0]], dtype=np.float32)
    labels = np.array([-7, -7, 10**12, 10**12])
    result = retrieval_metrics(embeddings, labels, distance="euclidean", include=RANK_METRICS)
    assert result == pytest.approx(dict.fromkeys(RANK_METRICS, 1.0))
