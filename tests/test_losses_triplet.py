"""Triplet-based losses: parity with pytorch-metric-learning 2.9, the all-triplets path at
B=2048 against an independent (sorting-based) computation, edge cases, mixed precision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DIM,
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

from lightning_metric import distances, indices
from lightning_metric.losses import _all_triplets
from lightning_metric.losses.triplet import (
    AngularLoss,
    MarginLoss,
    TripletLoss,
    TripletMarginLoss,
)

PATTERNS = label_patterns()
EMB = random_embeddings()
REF_EMB = random_embeddings(12, DIM, seed=1)
# Overlaps every pattern's labels (0..15) and adds labels found only in the reference set.
REF_LABELS = torch.tensor([0, 0, 1, 1, 2, 3, 3, 5, 8, 8, 20, 21])

# (our kwargs, PML kwargs) for each configuration.
TRIPLET_CONFIGS = {
    "default": ({}, {}),
    "swap": ({"swap": True, "margin": 0.2}, {"swap": True, "margin": 0.2}),
    "smooth": ({"smooth_loss": True}, {"smooth_loss": True}),
    "finetuner_cosine": (
        {"distance": "cosine", "margin": 0.5},
        {"distance": pml_distances.CosineSimilarity(), "margin": 0.5},
    ),
    "cosine_swap_smooth": (
        {"distance": "cosine", "margin": 0.3, "swap": True, "smooth_loss": True},
        {
            "distance": pml_distances.CosineSimilarity(),
            "margin": 0.3,
            "swap": True,
            "smooth_loss": True,
        },
    ),
    # The legacy spec names: p=1 distance, squared, mean over all triplets.
    "legacy_names": (
        {"distance_norm": 1, "power": 2, "avg_non_zero_only": False, "margin": 0.4},
        {
            "distance": pml_distances.LpDistance(p=1, power=2),
            "reducer": pml_reducers.MeanReducer(),
            "margin": 0.4,
        },
    ),
    "sum": (
        {"reducer": "sum", "margin": 0.1},
        {"reducer": pml_reducers.SumReducer(), "margin": 0.1},
    ),
}

MARGIN_CONFIGS = {
    "default": ({}, {}),
    "learn_beta": (
        {"margin": 0.1, "nu": 0.1, "beta": 0.8, "learn_beta": True},
        {"margin": 0.1, "nu": 0.1, "beta": 0.8, "learn_beta": True},
    ),
    "per_class_beta": (
        {"learn_beta": True, "num_classes": 32, "nu": 0.3, "beta": 1.0},
        {"learn_beta": True, "num_classes": 32, "nu": 0.3, "beta": 1.0},
    ),
    "cosine": (
        {"distance": "cosine", "beta": 0.5, "margin": 0.3},
        {"distance": pml_distances.CosineSimilarity(), "beta": 0.5, "margin": 0.3},
    ),
    "mean_reducer": (
        {"reducer": "mean", "learn_beta": True, "nu": 0.2},
        {"reducer": pml_reducers.MeanReducer(), "learn_beta": True, "nu": 0.2},
    ),
    "avg_non_zero_per_class": (
        {"reducer": "avg_non_zero", "learn_beta": True, "num_classes": 32, "nu": 0.1},
        {
            "reducer": pml_reducers.AvgNonZeroReducer(),
            "learn_beta": True,
            "num_classes": 32,
            "nu": 0.1,
        },
    ),
}

MARGIN_CONFIGS["sum_per_class"] = (
    {"reducer": "sum", "learn_beta": True, "num_classes": 32, "nu": 0.1, "margin": 0.5},
    {
        "reducer": pml_reducers.SumReducer(),
        "learn_beta": True,
        "num_classes": 32,
        "nu": 0.1,
        "margin": 0.5,
    },
)
# A negative beta: the regularizer's per-triplet values are negative, so avg_non_zero drops them.
MARGIN_CONFIGS["avg_non_zero_negative_beta"] = (
    {
        "distance": "cosine",
        "reducer": "avg_non_zero",
        "learn_beta": True,
        "num_classes": 32,
        "beta": -0.2,
        "nu": 0.5,
    },
    {
        "distance": pml_distances.CosineSimilarity(),
        "reducer": pml_reducers.AvgNonZeroReducer(),
        "learn_beta": True,
        "num_classes": 32,
        "beta": -0.2,
        "nu": 0.5,
    },
)

ANGULAR_CONFIGS = {
    "default": ({}, {}),
    "alpha_30": ({"alpha": 30}, {"alpha": 30}),
    "alpha_45_avg_non_zero": (
        {"alpha": 45, "reducer": "avg_non_zero"},
        {"alpha": 45, "reducer": pml_reducers.AvgNonZeroReducer()},
    ),
}

INDICES = {
    "all": lambda labels: None,
    "triplets": subset_of_triplets,
    "pairs": subset_of_pairs,
}


def _forward_kwargs(labels, index_kind, with_ref):
    if not with_ref:
        return {"indices_tuple": INDICES[index_kind](labels)}
    # With a reference set, indices are (query, ref) pairs: mine them against REF_LABELS.
    kwargs = {"ref_emb": REF_EMB, "ref_labels": REF_LABELS}
    if index_kind != "all":
        kwargs["indices_tuple"] = _subset_against_ref(labels, index_kind)
    return kwargs


def _subset_against_ref(labels, kind, seed=0):
    """A fixed random subset of the (query, reference) triplets or pairs."""
    generator = torch.Generator().manual_seed(seed)
    pos = labels[:, None] == REF_LABELS[None, :]
    neg = ~pos
    if kind == "triplets":
        a, p, n = torch.where(pos[:, :, None] & neg[:, None, :])
        keep = torch.rand(len(a), generator=generator) < 0.3
        return a[keep], p[keep], n[keep]
    a1, p = torch.where(pos & (torch.rand(pos.shape, generator=generator) < 0.5))
    a2, n = torch.where(neg & (torch.rand(neg.shape, generator=generator) < 0.5))
    return a1, p, a2, n


# ----------------------------------------------------------------------------- TripletMarginLoss


# PML 2.9 indexes the wrong matrix for swap with ref_emb: those cases are checked against a
# hand-written formula in the next test instead.
PML_COMPARABLE = [
    (config, with_ref)
    for config, (ours, _) in TRIPLET_CONFIGS.items()
    for with_ref in (False, True)
    if not (with_ref and ours.get("swap"))
]


@pytest.mark.parametrize(("config", "with_ref"), PML_COMPARABLE)
@pytest.mark.parametrize("index_kind", list(INDICES))
@pytest.mark.parametrize("pattern", PATTERN_NAMES)
def test_triplet_margin_matches_pml(pattern, config, index_kind, with_ref):
    ours, theirs = TRIPLET_CONFIGS[config]
    labels = PATTERNS[pattern]
    kwargs = _forward_kwargs(labels, index_kind, with_ref)
    assert_parity(
        TripletMarginLoss(**ours), pml_losses.TripletMarginLoss(**theirs), EMB, labels, **kwargs
    )


@pytest.mark.parametrize("index_kind", ["all", "triplets"])
@pytest.mark.parametrize("config", ["swap", "cosine_swap_smooth"])
@pytest.mark.parametrize("pattern", ["four_per_class", "imbalanced_singletons"])
def test_triplet_margin_swap_with_ref_matches_a_hand_formula(
    pattern, config, index_kind, monkeypatch
):
    """With ref_emb, swap compares the positive and negative *reference* items.

    PML 2.9 instead reads mat[p, n] of the (query, reference) matrix, mixing a query row with
    a reference column; we differ on purpose and check against the formula instead.
    """
    monkeypatch.setattr(_all_triplets, "CHUNK_BYTES", 256)  # several chunks
    kwargs, _ = TRIPLET_CONFIGS[config]
    loss_fn = TripletMarginLoss(**kwargs)
    labels = PATTERNS[pattern]
    forward_kwargs = _forward_kwargs(labels, index_kind, with_ref=True)

    def by_hand(emb, labels, ref_emb, ref_labels, indices_tuple=None):
        dist = loss_fn.distance
        if indices_tuple is None:
            indices_tuple = indices.all_triplets(labels, ref_labels, same_set=False)
        a, p, n = indices_tuple
        query_to_ref, ref_to_ref = dist(emb, ref_emb), dist(ref_emb)
        ap, an, pn = query_to_ref[a, p], query_to_ref[a, n], ref_to_ref[p, n]
        an = torch.maximum(an, pn) if dist.is_inverted else torch.minimum(an, pn)
        violation = dist.margin(ap, an) + loss_fn.margin
        losses = F.softplus(violation) if loss_fn.smooth_loss else F.relu(violation)
        return losses[losses > 0].mean()

    assert_parity(loss_fn, by_hand, EMB, labels, **forward_kwargs)


@pytest.mark.parametrize("with_ref", [False, True], ids=["batch", "ref"])
@pytest.mark.parametrize("config", ["default", "cosine_swap_smooth", "legacy_names", "sum"])
@pytest.mark.parametrize("pattern", ["four_per_class", "imbalanced_singletons", "two_views"])
def test_triplet_margin_all_triplets_in_many_chunks(pattern, config, with_ref, monkeypatch):
    monkeypatch.setattr(_all_triplets, "CHUNK_BYTES", 1)  # one anchor a chunk
    ours, theirs = TRIPLET_CONFIGS[config]
    if with_ref and ours.get("swap"):
        ours = {**ours, "swap": False}
        theirs = {**theirs, "swap": False}
    labels = PATTERNS[pattern]
    kwargs = _forward_kwargs(labels, "all", with_ref)
    assert_parity(
        TripletMarginLoss(**ours), pml_losses.TripletMarginLoss(**theirs), EMB, labels, **kwargs
    )


def _sorted_triplet_reference(emb, labels, margin):
    """Avg-non-zero triplet loss and dL/d(distance matrix), by sorting instead of broadcasting.

    For an anchor, sum_{p,n} relu(d_ap + m - d_an) = sum_p (c_p (d_ap + m) - S(c_p)), with c_p
    the number of negatives closer than d_ap + m and S the sum of the c_p closest negatives.
    """
    mat = torch.cdist(F.normalize(emb, dim=1), F.normalize(emb, dim=1))
    positive, negative = indices.label_masks(labels, labels, same_set=True)
    neg_sorted = mat.masked_fill(~negative, float("inf")).sort(dim=1).values
    neg_prefix = torch.cat(
        [torch.zeros(len(mat), 1, dtype=mat.dtype), neg_sorted.nan_to_num(posinf=0).cumsum(1)], 1
    )
    a, p = torch.where(positive)
    shifted = mat[a, p] + margin
    closer = torch.searchsorted(neg_sorted[a], shifted.unsqueeze(1), right=False).squeeze(1)
    total = (closer * shifted - neg_prefix[a, closer]).sum()
    num_active = closer.sum()
    # Each negative n of anchor a gets -1 for every positive whose d_ap + m exceeds d_an.
    shifted_per_anchor = mat.masked_fill(~positive, float("-inf")) + margin
    shifted_sorted = shifted_per_anchor.sort(dim=1).values
    not_above = torch.searchsorted(shifted_sorted, mat, right=True)
    above = (len(mat) - not_above) * negative
    grad_mat = torch.zeros_like(mat)
    grad_mat[a, p] = closer.to(mat.dtype)
    grad_mat = (grad_mat - above) / num_active
    return total / num_active, grad_mat


def test_triplet_margin_all_triplets_at_batch_2048():
    """B=2048, D=16, 4 per class: finite, and equal to a float64 sorting-based reference."""
    batch = 2048
    labels = torch.arange(batch // 4).repeat_interleave(4)
    emb64 = random_embeddings(batch, 16, seed=3)
    emb = emb64.clone().requires_grad_(True)
    ref_value, grad_mat = _sorted_triplet_reference(emb, labels, 0.05)
    mat = torch.cdist(F.normalize(emb, dim=1), F.normalize(emb, dim=1))
    (ref_grad,) = torch.autograd.grad((mat * grad_mat).sum(), emb)

    for dtype, rtol in [(torch.float64, 1e-7), (torch.float32, 1e-4)]:
        value, (grad,) = value_and_grad(TripletMarginLoss(), emb64.to(dtype), labels)
        assert torch.isfinite(value) and torch.isfinite(grad).all()
        torch.testing.assert_close(value.double(), ref_value.detach(), rtol=rtol, atol=0)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=rtol * 1e-3)


def test_sorted_reference_matches_pml_on_a_small_batch():
    """The B=2048 reference is itself checked against PML where PML is affordable."""
    labels = torch.arange(32).repeat_interleave(4)
    emb = random_embeddings(128, 16, seed=4).requires_grad_(True)
    value, grad_mat = _sorted_triplet_reference(emb, labels, 0.05)
    mat = torch.cdist(F.normalize(emb, dim=1), F.normalize(emb, dim=1))
    (grad,) = torch.autograd.grad((mat * grad_mat).sum(), emb)
    their_value, (their_grad,) = value_and_grad(pml_losses.TripletMarginLoss(), emb, labels)
    torch.testing.assert_close(value.detach(), their_value, rtol=1e-7, atol=0)
    torch.testing.assert_close(grad, their_grad, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda: TripletMarginLoss(), lambda: pml_losses.TripletMarginLoss()),
        (
            lambda: TripletMarginLoss(swap=True, smooth_loss=True, margin=0.3),
            lambda: pml_losses.TripletMarginLoss(swap=True, smooth_loss=True, margin=0.3),
        ),
        (
            lambda: MarginLoss(learn_beta=True, num_classes=40, nu=0.1),
            lambda: pml_losses.MarginLoss(learn_beta=True, num_classes=40, nu=0.1),
        ),
        (
            lambda: MarginLoss(reducer="avg_non_zero"),
            lambda: pml_losses.MarginLoss(reducer=pml_reducers.AvgNonZeroReducer()),
        ),
        (lambda: AngularLoss(), lambda: pml_losses.AngularLoss()),
    ],
    ids=["triplet", "triplet_swap_smooth", "margin_per_class", "margin_avg_non_zero", "angular"],
)
def test_parity_on_a_larger_imbalanced_batch(ours, theirs):
    """B=128 with classes of 1 to 8 items: many anchors, ragged positive counts."""
    generator = torch.Generator().manual_seed(6)
    labels = torch.randint(0, 40, (128,), generator=generator)
    assert_parity(ours(), theirs(), random_embeddings(128, 16, seed=6), labels)


@pytest.mark.parametrize("loss_cls", [TripletMarginLoss, MarginLoss])
def test_sampled_triplets_are_bounded_and_match_the_explicit_loss(loss_cls):
    """PML samples with its own RNG, so there is no parity: check the sampled triplets instead."""
    labels = PATTERNS["imbalanced_singletons"]
    per_anchor = 3
    loss_fn = loss_cls(triplets_per_anchor=per_anchor)
    torch.manual_seed(7)
    sampled_value = loss_fn(EMB, labels)
    torch.manual_seed(7)
    triplets = indices.random_triplets(labels, labels, True, per_anchor)
    assert 0 < len(triplets[0]) <= len(labels) * per_anchor
    a, p, n = triplets
    assert torch.all(labels[a] == labels[p]) and torch.all(a != p)
    assert torch.all(labels[a] != labels[n])
    explicit = loss_cls()(EMB, labels, indices_tuple=triplets)
    torch.testing.assert_close(sampled_value, explicit, rtol=1e-12, atol=0)


def test_finetuner_style_triplet_loss_with_a_miner():
    labels = PATTERNS["four_per_class"]
    triplets = subset_of_triplets(labels, seed=5)

    def miner(embeddings, labels, ref_emb=None, ref_labels=None):
        return triplets

    assert TripletLoss is TripletMarginLoss
    mined = TripletLoss(distance="cosine", margin=0.5, miner=miner)
    theirs = pml_losses.TripletMarginLoss(distance=pml_distances.CosineSimilarity(), margin=0.5)
    value = assert_parity(mined, theirs, EMB, labels, indices_tuple=triplets)
    torch.testing.assert_close(mined(EMB, labels), value)


# ----------------------------------------------------------------------------- MarginLoss


@pytest.mark.parametrize("with_ref", [False, True], ids=["batch", "ref"])
@pytest.mark.parametrize("index_kind", list(INDICES))
@pytest.mark.parametrize("config", list(MARGIN_CONFIGS))
@pytest.mark.parametrize("pattern", PATTERN_NAMES)
def test_margin_loss_matches_pml(pattern, config, index_kind, with_ref):
    ours_kwargs, theirs_kwargs = MARGIN_CONFIGS[config]
    ours, theirs = MarginLoss(**ours_kwargs), pml_losses.MarginLoss(**theirs_kwargs)
    labels = PATTERNS[pattern]
    kwargs = _forward_kwargs(labels, index_kind, with_ref)
    assert_parity(ours, theirs, EMB, labels, **kwargs)
    if ours.learn_beta:
        their_grad = theirs.beta.grad if theirs.beta.grad is not None else 0 * theirs.beta
        our_grad = ours.beta.grad if ours.beta.grad is not None else 0 * ours.beta
        torch.testing.assert_close(our_grad, their_grad, rtol=1e-5, atol=1e-7, msg="beta grad")
        assert ours.beta.dtype == torch.float32  # never recast to the embeddings' dtype


def test_margin_loss_legacy_learnable_param_names():
    loss_fn = MarginLoss(learnable_param_names=["beta"])
    assert isinstance(loss_fn.beta, torch.nn.Parameter)
    assert [name for name, _ in loss_fn.named_parameters()] == ["beta"]
    assert "beta" not in MarginLoss().state_dict()
    with pytest.raises(ValueError, match="beta"):
        MarginLoss(learnable_param_names=["gamma"])


# ----------------------------------------------------------------------------- AngularLoss


@pytest.mark.parametrize("with_ref", [False, True], ids=["batch", "ref"])
@pytest.mark.parametrize("index_kind", list(INDICES))
@pytest.mark.parametrize("config", list(ANGULAR_CONFIGS))
@pytest.mark.parametrize("pattern", PATTERN_NAMES)
def test_angular_loss_matches_pml(pattern, config, index_kind, with_ref):
    ours, theirs = ANGULAR_CONFIGS[config]
    labels = PATTERNS[pattern]
    kwargs = _forward_kwargs(labels, index_kind, with_ref)
    assert_parity(AngularLoss(**ours), pml_losses.AngularLoss(**theirs), EMB, labels, **kwargs)


def test_angular_loss_hand_computed():
    """One positive pair, one negative, unit vectors: log(1 + exp(f)) by hand."""
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    sq_tan = torch.tan(torch.deg2rad(torch.tensor(40.0, dtype=torch.float64))) ** 2
    # Pairs (0, 1) and (1, 0); a + p = (1, 1) for both, a . p = 0, negative (-1, 0).
    expected = torch.log1p(torch.exp(4 * sq_tan * -1.0))
    torch.testing.assert_close(AngularLoss()(emb, labels), expected)


@pytest.mark.parametrize("distance", ["cosine", distances.LpDistance(power=2)])
def test_angular_loss_rejects_other_distances(distance):
    with pytest.raises(ValueError, match="AngularLoss"):
        AngularLoss(distance=distance)


# ----------------------------------------------------------------------------- all three

LOSSES = {
    "triplet_default": lambda: TripletMarginLoss(),
    "triplet_swap_smooth": lambda: TripletMarginLoss(swap=True, smooth_loss=True),
    "triplet_cosine_sampled": lambda: TripletMarginLoss(distance="cosine", triplets_per_anchor=2),
    "margin_default": lambda: MarginLoss(),
    "margin_learned": lambda: MarginLoss(learn_beta=True, num_classes=16, nu=0.1),
    "angular": lambda: AngularLoss(),
}


@pytest.mark.parametrize("pattern", ["no_positive_pair", "single_class"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_nothing_to_learn_gives_a_connected_zero(name, pattern):
    emb = EMB.clone().requires_grad_(True)
    loss = LOSSES[name]()(emb, PATTERNS[pattern])
    assert loss.item() == 0
    loss.backward()
    assert emb.grad is not None and torch.all(emb.grad == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(LOSSES))
def test_half_precision_inputs(name, dtype):
    emb = random_embeddings(32, DIM, seed=2, dtype=dtype).requires_grad_(True)
    labels = torch.arange(8).repeat_interleave(4)
    loss = LOSSES[name]()(emb, labels)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert emb.grad.dtype == dtype and torch.isfinite(emb.grad).all()


@pytest.mark.parametrize("name", list(LOSSES))
def test_under_bfloat16_autocast(name):
    torch.manual_seed(0)
    encoder = torch.nn.Linear(12, DIM)
    loss_fn = LOSSES[name]()
    x, labels = torch.randn(32, 12), torch.arange(8).repeat_interleave(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(encoder(x), labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in encoder.parameters())
    assert all(p.dtype == torch.float32 for p in loss_fn.parameters())


@pytest.mark.parametrize("name", list(LOSSES))
def test_bad_inputs_raise_value_errors(name):
    loss_fn = LOSSES[name]()
    labels = PATTERNS["four_per_class"]
    with pytest.raises(ValueError, match="2-D"):
        loss_fn(EMB[0], labels[:1])
    with pytest.raises(ValueError, match="2-D"):
        loss_fn(EMB.reshape(4, 4, DIM), labels[:4])
    with pytest.raises(ValueError, match="same length"):
        loss_fn(EMB, labels[:-1])
    with pytest.raises(ValueError, match="ref_labels"):
        loss_fn(EMB, labels, ref_emb=REF_EMB)


@pytest.mark.parametrize("loss_cls", [TripletMarginLoss, MarginLoss])
@pytest.mark.parametrize("bad", [0, -2, "some", 1.5])
def test_bad_triplets_per_anchor(loss_cls, bad):
    with pytest.raises(ValueError, match="triplets_per_anchor"):
        loss_cls(triplets_per_anchor=bad)
