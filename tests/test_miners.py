"""Miners: the same tuples as PML 2.9; Finetuner's strategies by hand and by brute force."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import label_patterns, random_embeddings
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

from lightning_metric import indices, miners
from lightning_metric.distances import CosineSimilarity, LpDistance
from lightning_metric.losses.base import BaseMetricLoss
from lightning_metric.miners import (
    BatchEasyHardMiner,
    BatchHardMiner,
    MultiSimilarityMiner,
    PairMarginMiner,
    SiameseEasyHardMiner,
    TripletEasyHardMiner,
    TripletMarginMiner,
)

PATTERNS = label_patterns()
REF_LABELS = torch.tensor([0, 1, 2, 3, 0, 1, 5, 6, 0, 0, 2, 7])

VALID_COMBOS = [
    (pos, neg)
    for pos, neg in itertools.product(miners.STRATEGIES, repeat=2)
    if not ("semihard" in (pos, neg) and ("all" in (pos, neg) or pos == neg))
]


def as_sets(indices_tuple) -> dict[str, list[tuple[int, ...]]]:
    """Sorted tuples: pairs as positive and negative pair lists, or triplets."""
    lists = [t.tolist() for t in indices_tuple]
    if len(lists) == 3:
        return {"triplets": sorted(zip(*lists, strict=True))}
    return {
        "pos": sorted(zip(lists[0], lists[1], strict=True)),
        "neg": sorted(zip(lists[2], lists[3], strict=True)),
    }


def pml_distance(name: str):
    return {
        "euclidean": pml_distances.LpDistance,
        "cosine": pml_distances.CosineSimilarity,
        "dot": pml_distances.DotProductSimilarity,
        "snr": pml_distances.SNRDistance,
    }[name]()


def case(our_cls, pml_cls, distance=None, **params):
    """A (ours, PML) factory pair with the same parameters and distance."""
    name = f"{our_cls.__name__}-{distance or 'default'}-" + "-".join(
        f"{k}={v}" for k, v in params.items()
    )

    def make():
        if distance is None:
            return our_cls(**params), pml_cls(**params)
        return our_cls(distance=distance, **params), pml_cls(
            distance=pml_distance(distance), **params
        )

    return pytest.param(make, id=name)


PML_CASES = [
    case(BatchHardMiner, pml_miners.BatchHardMiner),
    case(BatchHardMiner, pml_miners.BatchHardMiner, "cosine"),
    case(BatchHardMiner, pml_miners.BatchHardMiner, "snr"),
    case(
        BatchHardMiner,
        pml_miners.BatchHardMiner,
        allowed_pos_range=(0.3, 1.2),
        allowed_neg_range=(0.9, 1.6),
    ),
    case(BatchEasyHardMiner, pml_miners.BatchEasyHardMiner),
    *[
        case(BatchEasyHardMiner, pml_miners.BatchEasyHardMiner, pos_strategy=p, neg_strategy=n)
        for p, n in VALID_COMBOS
    ],
    *[
        case(
            BatchEasyHardMiner,
            pml_miners.BatchEasyHardMiner,
            "cosine",
            pos_strategy=p,
            neg_strategy=n,
        )
        for p, n in [("semihard", "hard"), ("hard", "semihard"), ("easy", "easy"), ("all", "hard")]
    ],
    case(
        BatchEasyHardMiner,
        pml_miners.BatchEasyHardMiner,
        "cosine",
        pos_strategy="hard",
        neg_strategy="semihard",
        allowed_pos_range=(-0.5, 0.6),
        allowed_neg_range=(-0.8, 0.5),
    ),
    case(MultiSimilarityMiner, pml_miners.MultiSimilarityMiner),
    case(MultiSimilarityMiner, pml_miners.MultiSimilarityMiner, epsilon=0.4),
    case(MultiSimilarityMiner, pml_miners.MultiSimilarityMiner, "euclidean", epsilon=0.2),
    *[
        case(TripletMarginMiner, pml_miners.TripletMarginMiner, type_of_triplets=t)
        for t in miners.TRIPLET_TYPES
    ],
    *[
        case(
            TripletMarginMiner,
            pml_miners.TripletMarginMiner,
            "cosine",
            margin=0.3,
            type_of_triplets=t,
        )
        for t in miners.TRIPLET_TYPES
    ],
    case(TripletMarginMiner, pml_miners.TripletMarginMiner, margin=-0.1, type_of_triplets="hard"),
    case(PairMarginMiner, pml_miners.PairMarginMiner),
    case(PairMarginMiner, pml_miners.PairMarginMiner, pos_margin=1.2, neg_margin=1.4),
    case(PairMarginMiner, pml_miners.PairMarginMiner, "cosine", pos_margin=0.2, neg_margin=-0.1),
]


@pytest.mark.parametrize("use_ref", [False, True], ids=["batch", "ref"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("make", PML_CASES)
def test_same_tuples_as_pml(make, pattern, use_ref):
    ours, theirs = make()
    labels = PATTERNS[pattern]
    embeddings = random_embeddings(len(labels), seed=1)
    kwargs = {}
    if use_ref:
        kwargs = {"ref_emb": random_embeddings(len(REF_LABELS), seed=2), "ref_labels": REF_LABELS}
    mined = ours(embeddings, labels, **kwargs)
    expected = theirs(embeddings, labels, **kwargs)
    assert len(mined) == len(expected)
    for idx in mined:
        assert idx.dtype == torch.long and idx.device == embeddings.device
    assert as_sets(mined) == as_sets(expected)


def test_triplets_are_enumerated_in_chunks(monkeypatch):
    """A tiny chunk budget gives the same triplets (the B^3 block is never needed)."""
    labels = PATTERNS["imbalanced_singletons"]
    embeddings = random_embeddings(len(labels), seed=3)
    expected = pml_miners.TripletMarginMiner(margin=0.5)(embeddings, labels)
    monkeypatch.setattr(miners, "_CHUNK_ELEMENTS", 20)
    mined = TripletMarginMiner(margin=0.5)(embeddings, labels)
    assert as_sets(mined) == as_sets(expected)
    assert as_sets(TripletEasyHardMiner("all", "all")(embeddings, labels)) == as_sets(
        indices.all_triplets(labels, labels, True)
    )


def test_our_indices_give_pml_losses_the_same_value():
    labels = PATTERNS["four_per_class"]
    embeddings = random_embeddings(len(labels), seed=4)
    loss = pml_losses.TripletMarginLoss(margin=0.1)
    for ours, theirs in [
        (BatchHardMiner(), pml_miners.BatchHardMiner()),
        (
            TripletMarginMiner(type_of_triplets="semihard"),
            pml_miners.TripletMarginMiner(type_of_triplets="semihard"),
        ),
        (MultiSimilarityMiner(), pml_miners.MultiSimilarityMiner()),
    ]:
        torch.testing.assert_close(
            loss(embeddings, labels, ours(embeddings, labels)),
            loss(embeddings, labels, theirs(embeddings, labels)),
        )


# ------------------------------------------------------------------ Finetuner miners by hand

# 1-D points, Euclidean distance |x_i - x_j|. Item 3 duplicates item 0 (other class: a
# negative at distance 0) and item 5 duplicates item 4 (same class: a positive at distance 0).
HAND_X = torch.tensor([[0.0], [1.0], [3.0], [0.0], [2.0], [2.0]], dtype=torch.float64)
HAND_LABELS = torch.tensor([0, 0, 0, 1, 1, 1])

# Per anchor: hard positive (farthest), easy positive (closest), hard negative (closest),
# easy negative (farthest); ties go to the lowest index.
#   anchor:          0  1  2  3  4  5
#   hard positive:   2  2  0  4  3  3
#   easy positive:   1  0  1  4  5  4
#   hard negative:   3  3  4  0  1  1
#   easy negative:   4  3  3  2  0  0
HAND_TRIPLETS = {
    ("hard", "hard"): [(0, 2, 3), (1, 2, 3), (2, 0, 4), (3, 4, 0), (4, 3, 1), (5, 3, 1)],
    ("easy", "hard"): [(0, 1, 3), (1, 0, 3), (2, 1, 4), (3, 4, 0), (4, 5, 1), (5, 4, 1)],
    ("hard", "easy"): [(0, 2, 4), (1, 2, 3), (2, 0, 3), (3, 4, 2), (4, 3, 0), (5, 3, 0)],
    ("easy", "easy"): [(0, 1, 4), (1, 0, 3), (2, 1, 3), (3, 4, 2), (4, 5, 0), (5, 4, 0)],
    # semihard negative: the closest negative strictly farther than the chosen positive.
    ("hard", "semihard"): [(3, 4, 2)],
    ("easy", "semihard"): [(0, 1, 4), (2, 1, 3), (3, 4, 2), (4, 5, 1), (5, 4, 1)],
    # semihard positive: the farthest positive strictly closer than the chosen negative.
    ("semihard", "hard"): [(4, 5, 1), (5, 4, 1)],
    ("semihard", "easy"): [(0, 1, 4), (2, 1, 3), (3, 4, 2), (4, 5, 0), (5, 4, 0)],
    ("all", "hard"): [
        (0, 1, 3), (0, 2, 3), (1, 0, 3), (1, 2, 3), (2, 0, 4), (2, 1, 4),
        (3, 4, 0), (3, 5, 0), (4, 3, 1), (4, 5, 1), (5, 3, 1), (5, 4, 1),
    ],
    ("hard", "all"): [
        (0, 2, 3), (0, 2, 4), (0, 2, 5), (1, 2, 3), (1, 2, 4), (1, 2, 5),
        (2, 0, 3), (2, 0, 4), (2, 0, 5), (3, 4, 0), (3, 4, 1), (3, 4, 2),
        (4, 3, 0), (4, 3, 1), (4, 3, 2), (5, 3, 0), (5, 3, 1), (5, 3, 2),
    ],
}


@pytest.mark.parametrize("strategies", list(HAND_TRIPLETS), ids=lambda s: "-".join(s))
def test_triplet_easy_hard_miner_by_hand(strategies):
    miner = TripletEasyHardMiner(*strategies, distance="euclidean")
    assert as_sets(miner(HAND_X, HAND_LABELS))["triplets"] == HAND_TRIPLETS[strategies]


def test_siamese_easy_hard_miner_by_hand():
    mined = SiameseEasyHardMiner("hard", "hard", distance="euclidean")(HAND_X, HAND_LABELS)
    assert as_sets(mined) == {
        "pos": [(0, 2), (1, 2), (2, 0), (3, 4), (4, 3), (5, 3)],
        "neg": [(0, 3), (1, 3), (2, 4), (3, 0), (4, 1), (5, 1)],
    }
    # Semihard positives need the anchor's chosen negative: only anchors 4 and 5 have one.
    mined = SiameseEasyHardMiner("semihard", "hard", distance="euclidean")(HAND_X, HAND_LABELS)
    assert as_sets(mined)["pos"] == [(4, 5), (5, 4)]
    assert len(mined[2]) == 6


def test_siamese_sides_are_independent():
    """An anchor without negatives still gives its positive pair, and vice versa."""
    x = torch.tensor([[0.0], [1.0], [3.0], [5.0]])
    labels = torch.tensor([0, 0, 0, 1])
    mined = SiameseEasyHardMiner(distance="euclidean")(x, labels)
    assert as_sets(mined) == {
        "pos": [(0, 2), (1, 2), (2, 0)],
        "neg": [(0, 3), (1, 3), (2, 3), (3, 2)],
    }
    triplets = TripletEasyHardMiner(distance="euclidean")(x, labels)
    assert as_sets(triplets)["triplets"] == [(0, 2, 3), (1, 2, 3), (2, 0, 3)]


def test_all_all_is_every_pair_and_triplet():
    labels = PATTERNS["imbalanced_singletons"]
    x = random_embeddings(len(labels), seed=5)
    assert as_sets(SiameseEasyHardMiner("all", "all")(x, labels)) == as_sets(
        indices.all_pairs(labels, labels, True)
    )
    assert as_sets(TripletEasyHardMiner("all", "all")(x, labels)) == as_sets(
        indices.all_triplets(labels, labels, True)
    )


def test_finetuner_distances():
    x = random_embeddings(16, seed=6) * 3
    labels = PATTERNS["four_per_class"]
    # "cosine" is 1 - cos: the same choices as ranking by cosine similarity.
    assert isinstance(TripletEasyHardMiner().distance, CosineSimilarity)
    euclid = TripletEasyHardMiner(distance="euclidean")
    assert isinstance(euclid.distance, LpDistance) and not euclid.distance.normalize_embeddings
    assert as_sets(euclid(x, labels)) == as_sets(
        TripletEasyHardMiner(distance="sqeuclidean")(x, labels)
    )


# ------------------------------------------------------------------ Finetuner miners, brute force


def brute_force_choice(mat, labels, pos_strategy, neg_strategy, inverted):
    """Each anchor's chosen positives and negatives, straight from the definitions."""
    d = (-mat if inverted else mat).tolist()
    labels = labels.tolist()
    n_items = len(labels)

    def closest(a, cands):
        return [min(cands, key=lambda j: (d[a][j], j))] if cands else []

    def farthest(a, cands):
        return [min(cands, key=lambda j: (-d[a][j], j))] if cands else []

    pick_pos = {"hard": farthest, "semihard": farthest, "easy": closest}
    pick_neg = {"hard": closest, "semihard": closest, "easy": farthest}
    chosen = {}
    for a in range(n_items):
        pos = [j for j in range(n_items) if j != a and labels[j] == labels[a]]
        neg = [j for j in range(n_items) if labels[j] != labels[a]]
        if pos_strategy == "semihard":
            neg = pick_neg[neg_strategy](a, neg)
            pos = farthest(a, [p for p in pos if neg and d[a][p] < d[a][neg[0]]])
        elif neg_strategy == "semihard":
            pos = pick_pos[pos_strategy](a, pos)
            neg = closest(a, [n for n in neg if pos and d[a][n] > d[a][pos[0]]])
        else:
            pos = pos if pos_strategy == "all" else pick_pos[pos_strategy](a, pos)
            neg = neg if neg_strategy == "all" else pick_neg[neg_strategy](a, neg)
        chosen[a] = (pos, neg)
    return chosen


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("pattern", ["four_per_class", "imbalanced_singletons", "two_views"])
def test_finetuner_miners_match_brute_force(pattern, distance):
    labels = PATTERNS[pattern]
    x = random_embeddings(len(labels), dim=4, seed=7)
    x[2] = x[0]  # duplicates: ties and items at distance 0
    x[9] = x[5]
    for pos_strategy, neg_strategy in VALID_COMBOS:
        triplet_miner = TripletEasyHardMiner(pos_strategy, neg_strategy, distance)
        siamese_miner = SiameseEasyHardMiner(pos_strategy, neg_strategy, distance)
        mat = triplet_miner.distance(x)
        chosen = brute_force_choice(
            mat, labels, pos_strategy, neg_strategy, triplet_miner.distance.is_inverted
        )
        expected_triplets = sorted(
            (a, p, n) for a, (pos, neg) in chosen.items() for p in pos for n in neg
        )
        expected_pairs = {
            "pos": sorted((a, p) for a, (pos, _) in chosen.items() for p in pos),
            "neg": sorted((a, n) for a, (_, neg) in chosen.items() for n in neg),
        }
        assert as_sets(triplet_miner(x, labels))["triplets"] == expected_triplets
        assert as_sets(siamese_miner(x, labels)) == expected_pairs


def test_finetuner_miners_with_a_reference_set():
    labels = PATTERNS["four_per_class"]
    x = random_embeddings(len(labels), seed=8)
    ref = random_embeddings(len(REF_LABELS), seed=9)
    mined = TripletEasyHardMiner("easy", "hard")(x, labels, ref, REF_LABELS)
    theirs = pml_miners.BatchEasyHardMiner(
        "easy", "hard", distance=pml_distances.CosineSimilarity()
    )(x, labels, ref, REF_LABELS)
    a, p, _, n = (t.tolist() for t in theirs)
    assert as_sets(mined)["triplets"] == sorted(zip(a, p, n, strict=True))


# ------------------------------------------------------------------ contract, precision, errors

ALL_MINERS = [
    BatchHardMiner,
    BatchEasyHardMiner,
    MultiSimilarityMiner,
    TripletMarginMiner,
    PairMarginMiner,
    TripletEasyHardMiner,
    SiameseEasyHardMiner,
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("miner_cls", ALL_MINERS)
def test_half_precision_is_mined_in_float32(miner_cls, dtype):
    labels = PATTERNS["four_per_class"]
    x = random_embeddings(len(labels), seed=10, dtype=dtype)
    miner = miner_cls()
    mined = miner(x, labels)
    assert all(idx.dtype == torch.long for idx in mined)
    assert as_sets(mined) == as_sets(miner(x.float(), labels))


def test_miner_runs_without_grad_and_under_autocast():
    torch.manual_seed(0)
    encoder = torch.nn.Linear(8, 4)
    labels = PATTERNS["four_per_class"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embeddings = encoder(random_embeddings(len(labels), dtype=torch.float32))
        for miner_cls in ALL_MINERS:
            mined = miner_cls()(embeddings, labels)
            assert all(not idx.requires_grad and idx.dtype == torch.long for idx in mined)
    assert embeddings.dtype == torch.bfloat16 and embeddings.requires_grad


class _RecordingLoss(BaseMetricLoss):
    """Records the indices tuple the base class hands over."""

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels, same_set):
        self.seen = indices_tuple
        return {}


@pytest.mark.parametrize("use_ref", [False, True])
@pytest.mark.parametrize("miner_cls", ALL_MINERS)
def test_a_loss_uses_the_miners_tuples(miner_cls, use_ref):
    labels = PATTERNS["two_views"]
    x = random_embeddings(len(labels), seed=11).requires_grad_(True)
    kwargs = {}
    if use_ref:
        kwargs = {"ref_emb": random_embeddings(12, seed=12), "ref_labels": REF_LABELS}
    loss = _RecordingLoss(miner=miner_cls())
    value = loss(x, labels, **kwargs)
    value.backward()
    assert as_sets(loss.seen) == as_sets(miner_cls()(x, labels, **kwargs))


def _ref_columns(indices_tuple) -> tuple[int, ...]:
    """Positions of the reference-set indices: ``p, n`` of triplets, ``p, n`` of pairs."""
    return (1, 2) if len(indices_tuple) == 3 else (1, 3)


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("miner_cls", ALL_MINERS)
def test_ref_self_index_excludes_the_own_copy_like_the_diagonal(miner_cls, pattern):
    """The batch, shuffled, as its own reference set, each anchor's copy named by
    ref_self_index: the same tuples as mining the batch against itself."""
    labels = PATTERNS[pattern]
    x = random_embeddings(len(labels), seed=15)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    miner = miner_cls()
    mined = list(miner(x, labels, x[perm], labels[perm], ref_self_index=perm.argsort()))
    for column in _ref_columns(mined):
        mined[column] = perm[mined[column]]
    assert as_sets(mined) == as_sets(miner(x, labels))


def test_without_ref_self_index_the_easy_positive_is_the_own_copy():
    """What ref_self_index prevents: the copy at distance 0 is every anchor's closest positive."""
    labels = PATTERNS["four_per_class"]
    x = random_embeddings(len(labels), seed=17)
    a1, p, _, _ = BatchEasyHardMiner()(x, labels, x, labels)
    assert torch.equal(p, a1)
    a1, p, _, _ = BatchEasyHardMiner()(x, labels, x, labels, ref_self_index=torch.arange(16))
    assert len(a1) == 16 and not torch.equal(p, a1)
    assert torch.equal(labels[p], labels[a1])


@pytest.mark.parametrize("miner_cls", ALL_MINERS)
def test_ref_self_index_within_the_batch_is_the_diagonal(miner_cls):
    labels = PATTERNS["imbalanced_singletons"]
    x = random_embeddings(len(labels), seed=18)
    miner = miner_cls()
    assert as_sets(miner(x, labels, ref_self_index=torch.arange(len(labels)))) == as_sets(
        miner(x, labels)
    )


@pytest.mark.parametrize(
    ("ref_self_index", "message"),
    [
        (torch.arange(15), r"\(16,\) integer tensor"),
        (torch.arange(16).float(), r"\(16,\) integer tensor"),
        (torch.ones(16, dtype=torch.bool), r"\(16,\) integer tensor"),
        ([0] * 16, "got list"),
        (torch.arange(16) + 5, r"\[0, 20\)"),
        (torch.arange(16) - 1, r"\[0, 20\)"),
    ],
)
def test_bad_ref_self_index_is_refused(ref_self_index, message):
    x, labels = random_embeddings(16), PATTERNS["four_per_class"]
    ref = random_embeddings(20, seed=19)
    with pytest.raises(ValueError, match=message):
        BatchHardMiner()(x, labels, ref, torch.arange(20) % 4, ref_self_index=ref_self_index)


@pytest.mark.parametrize("miner_cls", ALL_MINERS)
def test_tiny_batches_give_empty_long_tuples(miner_cls):
    for labels in (torch.tensor([3]), torch.tensor([1, 2])):
        x = random_embeddings(len(labels), seed=13)
        mined = miner_cls()(x, labels)
        for idx in mined:
            assert idx.dtype == torch.long
        if len(labels) == 1:
            assert all(len(idx) == 0 for idx in mined)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("miner_cls", ALL_MINERS)
def test_indices_live_on_the_embeddings_device(miner_cls):
    labels = PATTERNS["four_per_class"]
    x = random_embeddings(len(labels), seed=14)
    mined = miner_cls()(x.cuda(), labels)
    assert all(idx.is_cuda for idx in mined)
    assert as_sets(mined) == as_sets(miner_cls()(x, labels))


@pytest.mark.parametrize(
    "miner_cls", [BatchEasyHardMiner, TripletEasyHardMiner, SiameseEasyHardMiner]
)
def test_bad_strategies_are_refused(miner_cls):
    with pytest.raises(ValueError, match="expected one of.*easy.*semihard.*hard.*all"):
        miner_cls(pos_strategy="hardest")
    with pytest.raises(ValueError, match="neg_strategy"):
        miner_cls(neg_strategy="medium")
    with pytest.raises(ValueError, match="both be 'semihard'"):
        miner_cls(pos_strategy="semihard", neg_strategy="semihard")
    with pytest.raises(ValueError, match="'all'"):
        miner_cls(pos_strategy="all", neg_strategy="semihard")


def test_bad_parameters_are_refused():
    # PML silently treats an unknown type_of_triplets as "all"; we refuse it.
    with pytest.raises(ValueError, match="expected one of.*all.*hard.*semihard.*easy"):
        TripletMarginMiner(type_of_triplets="medium")
    with pytest.raises(ValueError, match="cosine.*euclidean.*sqeuclidean"):
        TripletEasyHardMiner(distance="manhattan")
    with pytest.raises(ValueError, match="unknown distance"):
        BatchHardMiner(distance="manhattan")


@pytest.mark.parametrize("miner_cls", ALL_MINERS)
def test_bad_inputs_are_refused(miner_cls):
    miner = miner_cls()
    x = random_embeddings(16)
    labels = PATTERNS["four_per_class"]
    with pytest.raises(ValueError, match="same length"):
        miner(x, labels[:-1])
    with pytest.raises(ValueError, match="needs labels"):
        miner(x, None)
    with pytest.raises(ValueError, match="2-D"):
        miner(x[None], labels)
    with pytest.raises(ValueError, match="ref_labels"):
        miner(x, labels, ref_emb=x)
    with pytest.raises(ValueError, match="same length"):
        miner(x, labels, ref_emb=x, ref_labels=labels[:3])
