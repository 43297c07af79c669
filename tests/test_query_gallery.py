"""Query/gallery evaluation, Recall@K at any K, metrics per category, and the one search's results.

Expected values come from hand counts on tiny sets and from brute force (float64 distances,
a full sort) on random ones; the callback is checked through a real ``pl.Trainer.validate``
with a DataModule whose ``eval_roles`` says which items are queries and gallery items.
"""

from __future__ import annotations

import math
from fractions import Fraction as Fr

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_metric import evaluation
from lightning_metric.callbacks import RetrievalMetrics
from lightning_metric.data.roles import EvalRoles
from lightning_metric.evaluation import (
    RANK_METRICS,
    RetrievalResults,
    metric_names,
    retrieval_metrics,
    retrieval_results,
)
from lightning_metric.metrics import RetrievalMetric


@pytest.fixture(params=["faiss", "full"])
def ranker(request, monkeypatch):
    """Both ways of ranking: FAISS top-k selection and the full ranking."""
    monkeypatch.setattr(evaluation, "_MAX_SELECTED", 0 if request.param == "full" else 10**9)
    return request.param


def on_a_line(positions, distance):
    """1-D points for euclidean; for cosine, unit vectors 10 degrees apart per unit (the
    cosine order is the line's order, equal positions are identical rows)."""
    x = torch.tensor(positions, dtype=torch.float32)
    if distance == "euclidean":
        return x[:, None]
    angle = torch.deg2rad(10 * x)
    return torch.stack([angle.cos(), angle.sin()], dim=1)


def clustered(n=120, dim=8, classes=6, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    centres = torch.randn(classes, dim, generator=g)
    return centres[labels] + spread * torch.randn(n, dim, generator=g), labels


# -- the evaluation set of the hand-made cases ---------------------------------------------------

# Seven items in dataset order: position on a line, label, roles. Items 0 and 1 are exact
# duplicates (different items); item 5 is a query only, items 1 and 4 gallery only; item 6 is
# the only C, so as a query it has no gallery item of its label but itself: lone.
POSITIONS = [0.0, 0.0, 1.0, 2.0, 5.0, 3.0, 10.0]
LABELS = [0, 0, 1, 0, 1, 1, 2]  # A A B A B B C
IS_QUERY = [True, False, True, True, False, True, True]
IS_GALLERY = [True, True, True, True, True, False, True]
# Gallery: i0 (0, A) i1 (0, A) i2 (1, B) i3 (2, A) i4 (5, B) i6 (10, C). Each query's list,
# itself left out (+ hit, - miss; ties: misses first):
#   q0 (0, A), R = 2: i1+ (0) i2- (1) i3+ (2) i4- i6-   -> hits at 1, 3
#   q2 (1, B), R = 1: i0- i1- i3- (all at 1) i4+ (4)     -> hit at 4
#   q3 (2, A), R = 2: i2- (1) i0+ i1+ (2) i4- (3) i6-    -> hits at 2, 3
#   q5 (3, B), R = 2: i3- (1) i2+ i4+ (2) i0- i1- i6-    -> hits at 2, 3
#   q6 (10, C): lone (its only C is itself)
HAND_PER_QUERY = {  # q0, q2, q3, q5, q6
    "precision_at_1": [1, 0, 0, 0, None],
    "r_precision": [Fr(1, 2), 0, Fr(1, 2), Fr(1, 2), None],
    "mean_average_precision_at_r": [Fr(1, 2), 0, Fr(1, 4), Fr(1, 4), None],
    "recall_at_1": [1, 0, 0, 0, None],
    "recall_at_2": [1, 0, 1, 1, None],
    "recall_at_4": [1, 1, 1, 1, None],
}
HAND = {
    "precision_at_1": Fr(1, 4),
    "r_precision": Fr(3, 8),
    "mean_average_precision_at_r": Fr(1, 4),
    "recall_at_1": Fr(1, 4),
    "recall_at_2": Fr(3, 4),
    "recall_at_4": Fr(1),
}


def hand_sets(distance):
    x, y = on_a_line(POSITIONS, distance), torch.tensor(LABELS)
    q, g = torch.tensor(IS_QUERY), torch.tensor(IS_GALLERY)
    ids = torch.arange(len(POSITIONS))
    return x[q], y[q], x[g], y[g], ids[q], ids[g]


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_overlapping_query_and_gallery_by_hand(ranker, distance):
    query, query_labels, gallery, gallery_labels, query_ids, gallery_ids = hand_sets(distance)
    ours = retrieval_metrics(
        query, query_labels, gallery, gallery_labels, query_ids=query_ids,
        reference_ids=gallery_ids, distance=distance, recall_at_k=[1, 2, 4],
        include=list(HAND),
    )
    assert ours == pytest.approx({name: float(value) for name, value in HAND.items()})


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_per_query_results_by_hand(ranker, distance):
    query, query_labels, gallery, gallery_labels, query_ids, gallery_ids = hand_sets(distance)
    found = retrieval_results(
        query, query_labels, gallery, gallery_labels, query_ids=query_ids,
        reference_ids=gallery_ids, distance=distance, recall_at_k=[1, 2, 4], top_k=4,
    )
    for name, expected in HAND_PER_QUERY.items():
        values = found.per_query[name].tolist()
        assert math.isnan(values[-1]), name
        assert values[:-1] == pytest.approx([float(v) for v in expected[:-1]]), name
    assert found.relevant.tolist() == [2, 1, 2, 2, 0]
    assert found.lone.tolist() == [False, False, False, False, True]
    # Gallery rows 0..5 are items 0 1 2 3 4 6. q0: i1 i2 i3; q3: i2, then the tie i0 i1.
    assert gallery_ids[found.neighbours[0]].tolist() == [1, 2, 3, 4]
    assert found.is_relevant[0].tolist() == [True, False, True, False]
    assert set(gallery_ids[found.neighbours[1, :3]].tolist()) == {0, 1, 3}  # tied misses
    assert gallery_ids[found.neighbours[1, 3]] == 4 and found.is_relevant[1].tolist() == [
        False, False, False, True]
    assert set(gallery_ids[found.neighbours[2, 1:3]].tolist()) == {0, 1}
    assert found.neighbours[4].tolist() == [-1] * 4  # lone queries are not searched
    gaps = torch.tensor([0.0, 1.0, 2.0, 5.0])
    expected = gaps if distance == "euclidean" else 1 - torch.deg2rad(10 * gaps).cos()
    assert found.distances[0].tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert found.worst_queries(2).tolist() == [1, 2]  # AP@R 0, then the first of the 1/4s


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_kept_neighbours_follow_the_tie_rule(ranker, distance):
    # Query at 0 (label 0); gallery at 1 (label 0), 1 (label 1), 2 (label 0): the miss tied
    # with the hit comes first, whatever the storage order.
    found = retrieval_results(
        on_a_line([0.0], distance), torch.tensor([0]), on_a_line([1.0, 1.0, 2.0], distance),
        torch.tensor([0, 1, 0]), distance=distance, top_k=4,
    )
    assert found.neighbours.tolist() == [[1, 0, 2, -1]]
    assert found.is_relevant.tolist() == [[False, True, True, False]]
    assert found.per_query["precision_at_1"].tolist() == [0.0]


def test_exact_duplicates_of_other_items_are_not_dropped_with_the_query():
    # Three copies of one vector: items 0 and 1 are queries and gallery items, item 2 gallery
    # only, all label 0, plus a far miss. Each query finds the two other copies (R = 2).
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0, 0, 1])
    for distance in ("cosine", "euclidean"):
        ours = retrieval_metrics(
            x[:2], y[:2], x, y, query_ids=[0, 1], reference_ids=[0, 1, 2, 3],
            distance=distance, include=RANK_METRICS,
        )
        assert ours == pytest.approx(dict.fromkeys(RANK_METRICS, 1.0))


def test_every_item_both_query_and_gallery_is_self_retrieval(ranker):
    x, y = clustered(seed=1)
    ids = torch.arange(len(x))
    assert retrieval_metrics(
        x, y, x, y, query_ids=ids, reference_ids=ids, k="max_bin_count"
    ) == pytest.approx(retrieval_metrics(x, y, k="max_bin_count"))
    # ... and disjoint ids are a plain separate gallery (each item finds its own copy)
    plain = retrieval_metrics(x, y, x, y, k="max_bin_count", include=RANK_METRICS)
    assert plain == pytest.approx(retrieval_metrics(
        x, y, x, y, query_ids=ids, reference_ids=ids + len(x), k="max_bin_count",
        include=RANK_METRICS,
    ))
    assert plain["precision_at_1"] == 1.0


# -- through a Trainer ---------------------------------------------------------------------------


class _Items(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i], i


class _RolesData(pl.LightningDataModule):
    """A validation set of given embeddings whose ``eval_roles`` are given (or absent)."""

    def __init__(self, x, y, roles, batch_size=7):
        super().__init__()
        self.x, self.y, self.roles, self.batch_size = x, y, roles, batch_size

    def val_dataloader(self):
        return DataLoader(_Items(self.x, self.y), batch_size=self.batch_size)

    def eval_roles(self, stage):
        assert stage == "val"
        return self.roles


class _Identity(pl.LightningModule):
    """Validation steps that return their inputs as embeddings, with the dataset indices."""

    def validation_step(self, batch, batch_idx):
        x, y, indices = batch
        return {"embeddings": x, "labels": y, "indices": indices}


def validate(data, **options):
    callback = RetrievalMetrics(**options)
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, callbacks=[callback],
    )
    logged = trainer.validate(_Identity(), datamodule=data, verbose=False)[0]
    return logged, callback


def hand_roles():
    return EvalRoles(torch.tensor(IS_QUERY), torch.tensor(IS_GALLERY))


def test_callback_overlap_by_hand_and_lone_warning():
    data = _RolesData(on_a_line(POSITIONS, "euclidean"), torch.tensor(LABELS), hand_roles(), 3)
    with pytest.warns(UserWarning, match="1 of 5 val queries have no gallery item"):
        logged, callback = validate(
            data, distance="euclidean", recall_at_k=[1, 2, 4], include=list(HAND), top_k=2
        )
    assert logged == pytest.approx({f"val/{name}": float(v) for name, v in HAND.items()})
    found = callback.last_results["val"]
    assert isinstance(found, RetrievalResults)
    assert found.query_ids.tolist() == [0, 2, 3, 5, 6]
    assert found.reference_ids.tolist() == [0, 1, 2, 3, 4, 6]
    assert found.reference_ids[found.neighbours[0]].tolist() == [1, 2]
    assert found.neighbour_ids()[[0, 4]].tolist() == [[1, 2], [-1, -1]]  # q6 is lone
    assert found.average_precision_at_r[:4].tolist() == pytest.approx([0.5, 0.0, 0.25, 0.25])


def test_callback_with_disjoint_roles_equals_a_direct_call():
    x, y = clustered(n=150, seed=2)
    g = torch.Generator().manual_seed(3)
    is_query = torch.rand(150, generator=g) < 0.4
    data = _RolesData(x, y, EvalRoles(is_query, ~is_query))
    logged, callback = validate(data)
    expected = retrieval_metrics(x[is_query], y[is_query], x[~is_query], y[~is_query],
                                 k="max_bin_count")
    assert logged == pytest.approx({f"val/{name}": value for name, value in expected.items()},
                                   abs=1e-6)
    assert callback.last_results["val"].query_ids.tolist() == torch.nonzero(is_query)[:, 0].tolist()


def test_callback_with_every_item_both_equals_self_retrieval():
    x, y = clustered(n=90, seed=4)
    both = torch.ones(90, dtype=torch.bool)
    logged, _ = validate(_RolesData(x, y, EvalRoles(both, both)))
    without_roles, _ = validate(_RolesData(x, y, None))
    expected = retrieval_metrics(x, y, k="max_bin_count")
    assert logged == pytest.approx({f"val/{name}": value for name, value in expected.items()},
                                   abs=1e-6)
    assert without_roles == pytest.approx(logged, abs=1e-6)


# -- Recall@K at any K ---------------------------------------------------------------------------


def brute_force_first_hits(x, y, distance):
    """Rank (1-based) of each query's first same-label item in self-retrieval; inf if none."""
    if distance == "cosine":
        d = 1 - F.normalize(x.double(), dim=1) @ F.normalize(x.double(), dim=1).T
    else:
        d = torch.cdist(x.double(), x.double())
    d.fill_diagonal_(math.inf)
    order = d.argsort(dim=1)
    same = (y[order] == y[:, None]) & (order != torch.arange(len(x))[:, None])
    return torch.where(same.any(1), same.float().argmax(1).double() + 1, math.inf)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_recall_at_any_list_of_k(ranker, distance):
    x, y = clustered(n=200, classes=25, seed=5, spread=2.0)
    ks = [1, 5, 10, 30]
    ours = retrieval_metrics(x, y, distance=distance, recall_at_k=[10, 5, 1, 30, 5],
                             include=[f"recall_at_{k}" for k in ks])
    assert list(ours) == [f"recall_at_{k}" for k in ks]
    first = brute_force_first_hits(x, y, distance)
    keep = torch.isfinite(first)
    for k in ks:
        assert ours[f"recall_at_{k}"] == pytest.approx(float((first[keep] <= k).double().mean()))
    assert 0 < ours["recall_at_1"] < ours["recall_at_30"]  # the search went 30 deep


def test_recall_at_k_in_the_callback_and_its_checks():
    x, y = clustered(n=60, seed=6)
    logged, _ = validate(_RolesData(x, y, None), recall_at_k=[1, 5, 10])
    recall = sorted(name for name in logged if name.startswith("val/recall_at_"))
    assert recall == ["val/recall_at_1", "val/recall_at_10", "val/recall_at_5"]
    assert "recall_at_8" not in metric_names([1, 5, 10])
    for bad in ([0, 5], [1.5], [True], "5", 5, [-1]):
        with pytest.raises(ValueError, match="recall_at_k must be a list of positive ints"):
            RetrievalMetrics(recall_at_k=bad)
        with pytest.raises(ValueError, match="recall_at_k"):
            retrieval_metrics(x, y, recall_at_k=bad)
    with pytest.raises(ValueError, match="unknown metrics"):
        RetrievalMetrics(recall_at_k=[1, 5], include=["recall_at_8"])


# -- per category --------------------------------------------------------------------------------


def category_roles(n, seed):
    g = torch.Generator().manual_seed(seed)
    is_query = torch.rand(n, generator=g) < 0.6
    is_gallery = ~is_query | (torch.rand(n, generator=g) < 0.5)  # some items are both
    categories = torch.randint(0, 3, (n,), generator=g)
    return EvalRoles(is_query, is_gallery, categories, ("tops", "shoes", "bags"))


def test_per_category_equals_per_category_direct_calls():
    x, y = clustered(n=160, seed=7)
    roles = category_roles(160, seed=8)
    logged, _ = validate(_RolesData(x, y, roles), k=None, per_category=True)
    ids = torch.arange(160)
    q, gal = roles.is_query, roles.is_gallery
    overall = retrieval_metrics(x[q], y[q], x[gal], y[gal], query_ids=ids[q],
                                reference_ids=ids[gal], k=None)
    assert {name: logged[f"val/{name}"] for name in overall} == pytest.approx(overall, abs=1e-6)
    for code, name in enumerate(roles.category_names):
        rows = q & (roles.categories == code)
        expected = retrieval_metrics(x[rows], y[rows], x[gal], y[gal], query_ids=ids[rows],
                                     reference_ids=ids[gal], k=None)
        assert {m: logged[f"val/{name}/{m}"] for m in expected} == pytest.approx(
            expected, abs=1e-6), name
    assert len(logged) == 4 * len(overall)


def test_per_category_is_off_by_default_and_warns_without_categories():
    x, y = clustered(n=60, seed=9)
    logged, _ = validate(_RolesData(x, y, category_roles(60, seed=10)))
    assert not any(name.count("/") > 1 for name in logged)
    with pytest.warns(UserWarning, match="has no categories"):
        validate(_RolesData(x, y, None), per_category=True)
    with pytest.raises(ValueError, match="per_category must be true or false"):
        RetrievalMetrics(per_category="yes")


# -- the results object against brute force ----------------------------------------------------


def brute_force_results(query, ql, qids, gallery, gl, gids, distance, top_k):
    """Neighbours, distances, relevance, R and AP@R by a full float64 sort."""
    if distance == "cosine":
        d = 1 - F.normalize(query.double(), dim=1) @ F.normalize(gallery.double(), dim=1).T
    else:
        d = torch.cdist(query.double(), gallery.double())
    own = qids[:, None] == gids[None, :]
    d[own] = math.inf
    order = d.argsort(dim=1)
    hits = (gl[order] == ql[:, None]) & ~own.gather(1, order)
    relevant = hits.sum(1)
    ap = []
    for row, r in zip(hits, relevant.tolist(), strict=True):
        ranks = torch.nonzero(row[:r]).squeeze(1).double() + 1
        ap.append(float((torch.arange(1, len(ranks) + 1) / ranks).sum() / r) if r else math.nan)
    return order[:, :top_k], d.gather(1, order)[:, :top_k], hits[:, :top_k], relevant, ap


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_results_match_brute_force(ranker, distance):
    x, y = clustered(n=140, classes=8, seed=11, spread=1.5)
    roles = category_roles(140, seed=12)
    ids = torch.arange(140)
    q, gal = roles.is_query, roles.is_gallery
    found = retrieval_results(x[q], y[q], x[gal], y[gal], query_ids=ids[q],
                              reference_ids=ids[gal], distance=distance, top_k=7)
    neighbours, distances, hits, relevant, ap = brute_force_results(
        x[q], y[q], ids[q], x[gal], y[gal], ids[gal], distance, 7
    )
    searched = ~found.lone
    assert found.relevant.tolist() == relevant.tolist()
    assert torch.equal(found.neighbours[searched], neighbours[searched])
    assert torch.equal(found.is_relevant[searched], hits[searched])
    assert found.distances[searched].double() == pytest.approx(distances[searched], abs=1e-4)
    assert found.average_precision_at_r.tolist() == pytest.approx(ap, nan_ok=True)
    assert (found.neighbours[found.lone] == -1).all()


def test_results_pad_past_the_gallery_and_the_callback_keeps_the_same_search():
    x, y = clustered(n=40, seed=13)
    found = retrieval_results(x[:30], y[:30], x[30:], y[30:], top_k=15)
    assert found.neighbours.shape == (30, 15)
    assert (found.neighbours[~found.lone, 10:] == -1).all()
    assert found.distances[~found.lone, 10:].isnan().all()
    roles = category_roles(40, seed=14)
    _, callback = validate(_RolesData(x, y, roles), top_k=5)
    kept = callback.last_results["val"]
    ids = torch.arange(40)
    q, gal = roles.is_query, roles.is_gallery
    direct = retrieval_results(x[q], y[q], x[gal], y[gal], query_ids=ids[q],
                               reference_ids=ids[gal], k="max_bin_count", top_k=5)
    assert torch.equal(kept.neighbours, direct.neighbours)
    assert kept.per_query.keys() == direct.per_query.keys()
    for name, values in direct.per_query.items():
        assert kept.per_query[name].tolist() == pytest.approx(values.tolist(), nan_ok=True)


def test_bad_ids_roles_and_options_raise_clear_errors():
    x, y = clustered(n=20, seed=15)
    ids = torch.arange(20)
    cases = [
        (lambda: retrieval_metrics(x, y, x, y, query_ids=ids), "pass both or neither"),
        (lambda: retrieval_metrics(x, y, x, y, query_ids=ids, reference_ids=ids * 0),
         "reference_ids must be unique"),
        (lambda: retrieval_metrics(x, y, query_ids=ids), "separate reference"),
        (lambda: retrieval_metrics(x, y, x, y, query_ids=ids[:3], reference_ids=ids),
         r"query_ids must be \(20,\) integer ids"),
        (lambda: retrieval_results(x, y, top_k=-1), "top_k must be"),
        (lambda: retrieval_results(x, y, include=["NMI"]), "rank metrics only"),
        (lambda: RetrievalMetrics(top_k=1.5), "top_k must be"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    metric = RetrievalMetric()
    metric.update(x, y, ids)
    with pytest.raises(ValueError, match="beyond the eval roles' 10 items"):
        ten = torch.ones(10, dtype=torch.bool)
        metric.evaluate(EvalRoles(ten, ten))
    metric.update(x, y, ids, reference=True)
    both = torch.ones(20, dtype=torch.bool)
    with pytest.raises(ValueError, match="eval roles and reference=True batches"):
        metric.evaluate(EvalRoles(both, both))


# -- two processes -------------------------------------------------------------------------------


class _SavesResults(pl.Callback):
    """After RetrievalMetrics: each rank saves what it kept in ``last_results["val"]``."""

    def __init__(self, retrieval: RetrievalMetrics, folder):
        self.retrieval, self.folder = retrieval, folder

    def on_validation_epoch_end(self, trainer, pl_module):
        found = self.retrieval.last_results["val"]
        torch.save({"ap": found.average_precision_at_r, "neighbours": found.neighbours,
                    "query_ids": found.query_ids},
                   self.folder / f"rank{trainer.global_rank}_of_{trainer.world_size}.pt")


def validate_on(devices, data, folder):
    retrieval = RetrievalMetrics(per_category=True, top_k=4)
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_fork" if devices > 1 else "auto",
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, callbacks=[retrieval, _SavesResults(retrieval, folder)],
    )
    trainer.validate(_Identity(), datamodule=data, verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_two_processes_give_the_query_gallery_metrics_and_results_of_one(tmp_path):
    # 101 items: Lightning's DistributedSampler pads the two shards with a repeated item.
    x, y = clustered(n=101, seed=16)
    data = _RolesData(x, y, category_roles(101, seed=17), batch_size=10)
    one, two = validate_on(1, data, tmp_path), validate_on(2, data, tmp_path)
    assert "val/shoes/mean_average_precision_at_r" in one and one.keys() == two.keys()
    assert two == pytest.approx(one, abs=1e-6)
    single = torch.load(tmp_path / "rank0_of_1.pt")
    for rank in (0, 1):
        found = torch.load(tmp_path / f"rank{rank}_of_2.pt")
        assert torch.equal(found["query_ids"], single["query_ids"])
        assert torch.equal(found["neighbours"], single["neighbours"])
        assert found["ap"].tolist() == pytest.approx(single["ap"].tolist(), nan_ok=True)
