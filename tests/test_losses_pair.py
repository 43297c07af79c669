"""Pair-based losses: parity with pytorch-metric-learning 2.9, edge cases, mixed precision."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    PATTERN_NAMES,
    assert_parity,
    label_patterns,
    random_embeddings,
    subset_of_pairs,
    subset_of_triplets,
    value_and_grad,
)
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import reducers as pml_reducers
from pytorch_metric_learning import regularizers as pml_regularizers

from lightning_metric import distances
from lightning_metric.losses import pair

# Each distance as (ours, PML's); ours is given by name where a name exists (Hydra-style).
DISTANCES = {
    "cosine": (lambda: "cosine", lambda: pml_distances.CosineSimilarity()),
    "euclidean": (lambda: "euclidean", lambda: pml_distances.LpDistance()),
    "squared_euclidean": (
        lambda: distances.LpDistance(power=2),
        lambda: pml_distances.LpDistance(power=2),
    ),
    "raw_dot": (
        lambda: distances.DotProductSimilarity(normalize_embeddings=False),
        lambda: pml_distances.DotProductSimilarity(normalize_embeddings=False),
    ),
    "snr": (lambda: "snr", lambda: pml_distances.SNRDistance()),
    "raw_l1": (
        lambda: distances.LpDistance(p=1, normalize_embeddings=False),
        lambda: pml_distances.LpDistance(p=1, normalize_embeddings=False),
    ),
}
REDUCERS = {
    "mean": pml_reducers.MeanReducer,
    "avg_non_zero": pml_reducers.AvgNonZeroReducer,
    "sum": pml_reducers.SumReducer,
}

CASES = [
    ("ContrastiveLoss", {}),
    ("ContrastiveLoss", {"pos_margin": 0.2, "neg_margin": 0.8}),
    ("ContrastiveLoss", {"distance": "cosine", "pos_margin": 1, "neg_margin": 0.5}),
    ("ContrastiveLoss", {"distance": "squared_euclidean", "neg_margin": 1.5}),
    ("ContrastiveLoss", {"distance": "raw_dot", "pos_margin": 2, "neg_margin": -1}),
    ("ContrastiveLoss", {"reducer": "mean"}),
    ("ContrastiveLoss", {"reducer": "sum", "pos_margin": 0.5}),
    ("SignalToNoiseRatioContrastiveLoss", {}),
    ("SignalToNoiseRatioContrastiveLoss", {"pos_margin": 0.1, "neg_margin": 1.5}),
    ("SignalToNoiseRatioContrastiveLoss", {"reducer": "mean"}),
    ("SignalToNoiseRatioContrastiveLoss", {"distance": "snr", "neg_margin": 0.7}),
    ("LiftedStructureLoss", {}),
    ("LiftedStructureLoss", {"neg_margin": 0.5, "pos_margin": 0.3}),
    ("LiftedStructureLoss", {"distance": "cosine", "neg_margin": 0.2, "pos_margin": 0.9}),
    ("LiftedStructureLoss", {"reducer": "avg_non_zero", "distance": "raw_l1"}),
    ("GeneralizedLiftedStructureLoss", {}),
    ("GeneralizedLiftedStructureLoss", {"neg_margin": 0.5, "pos_margin": 0.3}),
    ("GeneralizedLiftedStructureLoss", {"distance": "cosine"}),
    ("GeneralizedLiftedStructureLoss", {"reducer": "avg_non_zero"}),
    ("MultiSimilarityLoss", {}),
    ("MultiSimilarityLoss", {"alpha": 1, "beta": 10, "base": 0.2}),
    ("MultiSimilarityLoss", {"distance": "euclidean", "base": 1.0}),
    ("MultiSimilarityLoss", {"reducer": "avg_non_zero"}),
    ("CircleLoss", {}),
    ("CircleLoss", {"m": 0.25, "gamma": 256}),
    ("CircleLoss", {"reducer": "mean"}),
    ("IntraPairVarianceLoss", {}),
    ("IntraPairVarianceLoss", {"pos_eps": 0.1, "neg_eps": 0.05}),
    ("IntraPairVarianceLoss", {"distance": "euclidean"}),
    ("IntraPairVarianceLoss", {"reducer": "avg_non_zero"}),
    ("TupletMarginLoss", {}),
    ("TupletMarginLoss", {"margin": 10, "scale": 32}),
    ("TupletMarginLoss", {"reducer": "sum"}),
]
LOSS_NAMES = sorted({name for name, _ in CASES})
MODES = ["all_pairs", "mined_pairs", "mined_triplets", "ref_set"]


def make_pair(name: str, kwargs: dict):
    """Our loss and PML's, configured the same way from one case."""
    ours, theirs = dict(kwargs), dict(kwargs)
    if "distance" in kwargs:
        ours_distance, pml_distance = DISTANCES[kwargs["distance"]]
        ours["distance"], theirs["distance"] = ours_distance(), pml_distance()
    if "reducer" in kwargs:
        theirs["reducer"] = REDUCERS[kwargs["reducer"]]()
    return getattr(pair, name)(**ours), getattr(pml_losses, name)(**theirs)


def ref_set(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 reference rows: 6 share labels with the batch, 6 have labels of their own."""
    ref_labels = torch.cat([labels[:6], torch.arange(100, 106)])
    return random_embeddings(12, seed=1), ref_labels


def forward_kwargs(mode: str, labels: torch.Tensor) -> dict:
    if mode == "mined_pairs":
        return {"indices_tuple": subset_of_pairs(labels)}
    if mode == "mined_triplets":
        return {"indices_tuple": subset_of_triplets(labels)}
    if mode == "ref_set":
        ref_emb, ref_labels = ref_set(labels)
        return {"ref_emb": ref_emb, "ref_labels": ref_labels}
    return {}


def case_id(case) -> str:
    name, kwargs = case
    return name + "".join(f"-{k}={v}" for k, v in kwargs.items())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pattern", PATTERN_NAMES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_parity_with_pml(case, pattern, mode):
    labels = label_patterns()[pattern]
    ours, theirs = make_pair(*case)
    assert_parity(ours, theirs, random_embeddings(), labels, **forward_kwargs(mode, labels))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_parity_with_duplicated_mined_pairs(name):
    """A pair listed twice counts twice in pair-based losses and once in matrix-based ones."""
    labels = label_patterns()["four_per_class"]
    a1, p, a2, n = subset_of_pairs(labels)
    indices = (
        torch.cat([a1, a1[:5]]),
        torch.cat([p, p[:5]]),
        torch.cat([a2, a2[:9]]),
        torch.cat([n, n[:9]]),
    )
    ours, theirs = make_pair(name, {})
    assert_parity(ours, theirs, random_embeddings(), labels, indices_tuple=indices)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_parity_without_labels_given_indices(name):
    labels = label_patterns()["two_views"]
    ours, theirs = make_pair(name, {})
    indices = subset_of_pairs(labels)
    emb = random_embeddings()
    our_value, our_grads = value_and_grad(ours, emb, None, indices_tuple=indices)
    their_value, their_grads = value_and_grad(theirs, emb, None, indices_tuple=indices)
    torch.testing.assert_close(our_value, their_value)
    torch.testing.assert_close(our_grads[0], their_grads[0])


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_parity_with_embedding_regularizer(name):
    ours = getattr(pair, name)(embedding_regularizer="lp", embedding_reg_weight=0.3)
    theirs = getattr(pml_losses, name)(
        embedding_regularizer=pml_regularizers.LpRegularizer(), embedding_reg_weight=0.3
    )
    labels = label_patterns()["four_per_class"]
    assert_parity(ours, theirs, random_embeddings(), labels)


# ----- legacy and Finetuner spellings -------------------------------------------------------


def test_contrastive_use_similarity_is_cosine():
    labels = label_patterns()["four_per_class"]
    ours = pair.ContrastiveLoss(use_similarity=True, pos_margin=1, neg_margin=0)
    theirs = pml_losses.ContrastiveLoss(
        distance=pml_distances.DotProductSimilarity(), pos_margin=1, neg_margin=0
    )
    assert isinstance(ours.distance, distances.DotProductSimilarity)
    assert_parity(ours, theirs, random_embeddings(), labels)


def test_contrastive_use_similarity_with_distance_is_an_error():
    with pytest.raises(ValueError, match="use_similarity"):
        pair.ContrastiveLoss(use_similarity=True, distance="cosine")


def test_contrastive_legacy_power_raises_each_pair_loss():
    """Old PML's ``power``: each pair's loss (not the distance) is raised to it."""
    emb = random_embeddings(4, 3)
    labels = torch.tensor([0, 0, 1, 1])
    loss = pair.ContrastiveLoss(pos_margin=0.1, neg_margin=1.2, power=2, avg_non_zero_only=False)
    dist = torch.cdist(*(2 * [torch.nn.functional.normalize(emb)]))
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~torch.eye(4, dtype=torch.bool)
    pos = torch.relu(dist[same & off_diagonal] - 0.1) ** 2
    neg = torch.relu(1.2 - dist[~same]) ** 2
    torch.testing.assert_close(loss(emb, labels), pos.mean() + neg.mean())


def test_contrastive_legacy_avg_non_zero_only_false_is_mean():
    labels = label_patterns()["four_per_class"]
    ours = pair.ContrastiveLoss(avg_non_zero_only=False, neg_margin=0.9)
    theirs = pml_losses.ContrastiveLoss(reducer=pml_reducers.MeanReducer(), neg_margin=0.9)
    assert_parity(ours, theirs, random_embeddings(), labels)


def test_siamese_is_contrastive_with_cosine_margins():
    assert pair.SiameseLoss is pair.ContrastiveLoss
    labels = label_patterns()["two_views"]
    ours = pair.SiameseLoss(distance="cosine", pos_margin=1, neg_margin=0.5)
    theirs = pml_losses.ContrastiveLoss(
        distance=pml_distances.CosineSimilarity(), pos_margin=1, neg_margin=0.5
    )
    assert_parity(ours, theirs, random_embeddings(), labels)


def test_snr_legacy_regularizer_weight_is_zero_mean_regularizer():
    labels = label_patterns()["four_per_class"]
    ours = pair.SignalToNoiseRatioContrastiveLoss(regularizer_weight=0.1)
    theirs = pml_losses.SignalToNoiseRatioContrastiveLoss(
        embedding_regularizer=pml_regularizers.ZeroMeanRegularizer(), embedding_reg_weight=0.1
    )
    assert_parity(ours, theirs, random_embeddings(), labels)


@pytest.mark.parametrize(
    ("name", "distance"),
    [
        ("CircleLoss", "euclidean"),
        ("CircleLoss", "dot"),
        ("TupletMarginLoss", "euclidean"),
        ("SignalToNoiseRatioContrastiveLoss", "cosine"),
    ],
)
def test_losses_reject_the_wrong_distance(name, distance):
    with pytest.raises(ValueError, match="requires distance"):
        getattr(pair, name)(distance=distance)


def test_circle_accepts_only_all_triplets_per_anchor():
    pair.CircleLoss(triplets_per_anchor="all")
    with pytest.raises(ValueError, match="triplets_per_anchor"):
        pair.CircleLoss(triplets_per_anchor=10)


@pytest.mark.parametrize(
    "name", ["GeneralizedLiftedStructureLoss", "MultiSimilarityLoss", "CircleLoss"]
)
def test_matrix_losses_reject_a_pair_both_positive_and_negative(name):
    """PML asserts; we raise a ValueError."""
    labels = label_patterns()["four_per_class"]
    a1, p, a2, n = subset_of_pairs(labels)
    indices = (a1, p, torch.cat([a2, a1[:1]]), torch.cat([n, p[:1]]))
    with pytest.raises(ValueError, match="both as positive and as negative"):
        getattr(pair, name)()(random_embeddings(), labels, indices_tuple=indices)


def test_tuplet_margin_is_in_degrees():
    loss = pair.TupletMarginLoss(margin=5.73)
    assert loss.margin == 5.73
    assert loss.margin_radians == pytest.approx(0.1, abs=1e-4)


# ----- nothing to learn from: a connected zero ----------------------------------------------


def assert_connected_zero(loss_fn, embeddings, labels, **kwargs):
    value, grads = value_and_grad(loss_fn, embeddings, labels, **kwargs)
    assert value.item() == 0
    for grad in grads:
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_at_most_one_pair_of_each_kind_gives_a_connected_zero(name):
    """PML's rule: <= 1 positive and <= 1 negative pair give 0, even if their loss is not 0."""
    loss_fn = getattr(pair, name)()
    emb = random_embeddings(4)
    assert_connected_zero(loss_fn, emb[:1], torch.tensor([0]))
    one_each = tuple(torch.tensor([i]) for i in (0, 1, 0, 2))
    assert_connected_zero(loss_fn, emb[:3], torch.tensor([0, 0, 1]), indices_tuple=one_each)
    ours, theirs = make_pair(name, {})
    assert_parity(ours, theirs, emb[:3], torch.tensor([0, 0, 1]), indices_tuple=one_each)
    empty = tuple(torch.tensor([], dtype=torch.long) for _ in range(4))
    assert_connected_zero(loss_fn, emb, torch.tensor([0, 0, 1, 1]), indices_tuple=empty)


@pytest.mark.parametrize("name", ["LiftedStructureLoss", "CircleLoss", "TupletMarginLoss"])
@pytest.mark.parametrize("pattern", ["no_positive_pair", "single_class"])
def test_losses_needing_both_kinds_of_pair_give_a_connected_zero(name, pattern):
    labels = label_patterns()[pattern]
    assert_connected_zero(getattr(pair, name)(), random_embeddings(), labels)


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("pattern", ["no_positive_pair", "single_class"])
def test_one_sided_batches_are_finite(name, pattern):
    labels = label_patterns()[pattern]
    value, grads = value_and_grad(getattr(pair, name)(), random_embeddings(), labels)
    assert torch.isfinite(value)
    assert all(torch.isfinite(g).all() for g in grads)


def test_tuplet_margin_identical_positives_have_finite_gradients():
    """PML's acos has an infinite derivative at cosine 1; we clip the cosine (documented)."""
    emb = random_embeddings(8)
    emb[1] = emb[0]
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    value, grads = value_and_grad(pair.TupletMarginLoss(), emb, labels)
    assert torch.isfinite(value) and value > 0
    assert torch.isfinite(grads[0]).all()


# ----- mixed precision --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_half_precision_is_finite(case, dtype):
    labels = label_patterns()["four_per_class"]
    ours, _ = make_pair(*case)
    emb = (random_embeddings(dtype=torch.float32) * 3).to(dtype)
    value, grads = value_and_grad(ours, emb, labels)
    assert torch.isfinite(value)
    assert grads[0].dtype == dtype
    assert torch.isfinite(grads[0]).all()


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_autocast_bfloat16_with_an_encoder(name):
    torch.manual_seed(0)
    encoder = torch.nn.Linear(8, 8)
    labels = label_patterns()["four_per_class"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embeddings = encoder(random_embeddings(dtype=torch.float32))
        loss = getattr(pair, name)()(embeddings, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert encoder.weight.dtype == torch.float32
    assert torch.isfinite(encoder.weight.grad).all()
