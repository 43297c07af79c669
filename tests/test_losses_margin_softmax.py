"""Margin softmax losses (ArcFace, CosFace, ...) against PML 2.9 and hand-written formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DIM,
    assert_full_parity,
    label_patterns,
    random_embeddings,
    subset_of_pairs,
    subset_of_triplets,
)
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import reducers as pml_reducers
from pytorch_metric_learning import regularizers as pml_regularizers
from torch import nn

from lightning_metric.losses import margin_softmax
from lightning_metric.regularizers import RegularFaceRegularizer

NUM_CLASSES = 20  # every label pattern of helpers (B=16) lies in [0, 20); some classes are absent

LOSS_NAMES = [
    "ArcFaceLoss",
    "CosFaceLoss",
    "SubCenterArcFaceLoss",
    "SphereFaceLoss",
    "LargeMarginSoftmaxLoss",
    "NormalizedSoftmaxLoss",
]
ANGULAR = ["ArcFaceLoss", "SubCenterArcFaceLoss", "SphereFaceLoss", "LargeMarginSoftmaxLoss"]

# name: [(our kwargs, PML kwargs)], default first.
CONFIGS = {
    "ArcFaceLoss": [({}, {}), ({"margin": 10.0, "scale": 30}, {"margin": 10.0, "scale": 30})],
    "CosFaceLoss": [({}, {}), ({"margin": 0.2, "scale": 16}, {"margin": 0.2, "scale": 16})],
    "SubCenterArcFaceLoss": [
        ({}, {}),
        ({"margin": 20.0, "scale": 32, "sub_centers": 2},) * 2,
    ],
    "SphereFaceLoss": [({}, {}), ({"margin": 3, "scale": 2},) * 2],
    "LargeMarginSoftmaxLoss": [({}, {}), ({"margin": 2, "scale": 3},) * 2, ({"margin": 5},) * 2],
    "NormalizedSoftmaxLoss": [
        ({}, {}),
        ({"temperature": 0.2},) * 2,
        ({"distance": "euclidean"}, {"distance": pml_distances.LpDistance()}),
    ],
}
CASES = [(name, i) for name, configs in CONFIGS.items() for i in range(len(configs))]


def make_pair(name, ours_kwargs=None, pml_kwargs=None, num_classes=NUM_CLASSES, dim=DIM):
    """PML's loss and ours holding the same (PML-initialised) weights, both in float64."""
    theirs = getattr(pml_losses, name)(
        num_classes=num_classes, embedding_size=dim, **(pml_kwargs or {})
    )
    ours = getattr(margin_softmax, name)(
        num_classes=num_classes, embedding_size=dim, **(ours_kwargs or {})
    )
    ours.load_state_dict(theirs.state_dict())
    return ours.double(), theirs.double()


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("miner", ["none", "pairs", "triplets"])
@pytest.mark.parametrize("pattern", list(label_patterns()))
@pytest.mark.parametrize("name,config", CASES)
def test_parity_with_pml(name, config, pattern, miner):
    ours_kwargs, pml_kwargs = CONFIGS[name][config]
    ours, theirs = make_pair(name, ours_kwargs, pml_kwargs)
    labels = label_patterns()[pattern]
    indices = {"none": None, "pairs": subset_of_pairs, "triplets": subset_of_triplets}[miner]
    kwargs = {} if indices is None else {"indices_tuple": indices(labels)}
    assert_full_parity(ours, theirs, random_embeddings(seed=3), labels, **kwargs)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_empty_miner_output_counts_every_embedding(name):
    ours, theirs = make_pair(name)
    labels = label_patterns()["four_per_class"]
    empty = torch.empty(0, dtype=torch.long)
    assert_full_parity(
        ours, theirs, random_embeddings(seed=4), labels, indices_tuple=(empty, empty, empty)
    )


@pytest.mark.parametrize(
    "reducer,pml_reducer",
    [("avg_non_zero", pml_reducers.AvgNonZeroReducer), ("sum", pml_reducers.SumReducer)],
)
@pytest.mark.parametrize("name", ["ArcFaceLoss", "NormalizedSoftmaxLoss"])
def test_parity_other_reducers(name, reducer, pml_reducer):
    ours, theirs = make_pair(name, {"reducer": reducer}, {"reducer": pml_reducer()})
    assert_full_parity(ours, theirs, random_embeddings(seed=5), label_patterns()["two_views"])


@pytest.mark.parametrize(
    "name,ours_reg,pml_reg,weight",
    [
        ("ArcFaceLoss", "regular_face", pml_regularizers.RegularFaceRegularizer(), 1.0),
        ("CosFaceLoss", "center_invariant", pml_regularizers.CenterInvariantRegularizer(), 0.3),
        ("SphereFaceLoss", "lp", pml_regularizers.LpRegularizer(), 0.5),
        (
            "SubCenterArcFaceLoss",
            "sparse_centers",
            pml_regularizers.SparseCentersRegularizer(NUM_CLASSES, 3),
            2.0,
        ),
        (
            "NormalizedSoftmaxLoss",
            RegularFaceRegularizer(),
            pml_regularizers.RegularFaceRegularizer(),
            0.7,
        ),
    ],
)
def test_parity_with_weight_regularizer(name, ours_reg, pml_reg, weight):
    ours, theirs = make_pair(
        name,
        {"weight_regularizer": ours_reg, "weight_reg_weight": weight},
        {"weight_regularizer": pml_reg, "weight_reg_weight": weight},
    )
    assert_full_parity(ours, theirs, random_embeddings(seed=6), label_patterns()["four_per_class"])


def test_parity_with_embedding_regularizer():
    ours, theirs = make_pair(
        "CosFaceLoss",
        {"embedding_regularizer": "lp", "embedding_reg_weight": 0.1},
        {"embedding_regularizer": pml_regularizers.LpRegularizer(), "embedding_reg_weight": 0.1},
    )
    assert_full_parity(ours, theirs, random_embeddings(seed=7), label_patterns()["two_views"])


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_parity_in_float32(name):
    ours, theirs = make_pair(name)
    ours.float(), theirs.float()
    emb = random_embeddings(seed=8, dtype=torch.float32)
    # float32 rounding of sums of O(10) terms: absolute tolerance for entries near zero.
    assert_full_parity(ours, theirs, emb, label_patterns()["four_per_class"], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- hand-written oracle


def _two_class_case(angle_deg):
    """One embedding at ``angle_deg`` from class 0's centre, class 1's centre at 90 degrees."""
    theta = math.radians(angle_deg)
    emb = torch.tensor([[math.cos(theta), math.sin(theta)]], dtype=torch.float64)
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # (D, C)
    return emb, weight, torch.tensor([0]), theta


@pytest.mark.parametrize("angle", [10.0, 60.0, 170.0])
def test_arcface_margin_is_in_degrees(angle):
    emb, weight, labels, theta = _two_class_case(angle)
    loss_fn = margin_softmax.ArcFaceLoss(2, 2, margin=30.0, scale=10).double()
    loss_fn.W.data.copy_(weight)
    m = math.radians(30.0)
    target = math.cos(theta + m) if theta <= math.pi - m else math.cos(theta) - m * math.sin(m)
    logits = torch.tensor([[10 * target, 10 * math.cos(math.pi / 2 - theta)]], dtype=torch.float64)
    expected = F.cross_entropy(logits, labels)
    torch.testing.assert_close(loss_fn(emb, labels), expected)


def test_cosface_margin_is_in_cosine_units():
    emb, weight, labels, theta = _two_class_case(40.0)
    loss_fn = margin_softmax.CosFaceLoss(2, 2, margin=0.35, scale=64).double()
    loss_fn.W.data.copy_(weight)
    logits = 64 * torch.tensor([[math.cos(theta) - 0.35, math.sin(theta)]], dtype=torch.float64)
    torch.testing.assert_close(loss_fn(emb, labels), F.cross_entropy(logits, labels))


@pytest.mark.parametrize("angle", [30.0, 120.0])
def test_large_margin_softmax_formula(angle):
    emb, weight, labels, theta = _two_class_case(angle)
    emb, weight = emb * 3, weight * 2  # |x| = 3, |W_c| = 2
    loss_fn = margin_softmax.LargeMarginSoftmaxLoss(2, 2, margin=2, scale=1).double()
    loss_fn.W.data.copy_(weight)
    k = math.floor(theta / (math.pi / 2))
    psi = (-1) ** k * math.cos(2 * theta) - 2 * k
    logits = 6 * torch.tensor([[psi, math.sin(theta)]], dtype=torch.float64)
    torch.testing.assert_close(loss_fn(emb, labels), F.cross_entropy(logits, labels))


# --------------------------------------------------------------------------- weights and state


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_default_init_and_layout_match_pml(name):
    torch.manual_seed(11)
    theirs = getattr(pml_losses, name)(num_classes=7, embedding_size=5)
    torch.manual_seed(11)
    ours = getattr(margin_softmax, name)(num_classes=7, embedding_size=5)
    assert ours.state_dict().keys() == theirs.state_dict().keys() == {"W"}
    torch.testing.assert_close(ours.W, theirs.W, rtol=0, atol=0)
    assert ours.W.dtype == torch.float32


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_state_dict_round_trip_with_pml(name):
    theirs = getattr(pml_losses, name)(num_classes=6, embedding_size=4)
    ours = getattr(margin_softmax, name)(num_classes=6, embedding_size=4)
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours.W, theirs.W)
    with torch.no_grad():
        ours.W.add_(1.0)
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(theirs.W, ours.W)


def test_sub_center_layout():
    loss_fn = margin_softmax.SubCenterArcFaceLoss(num_classes=5, embedding_size=4, sub_centers=3)
    assert loss_fn.W.shape == (4, 15)
    assert loss_fn.num_classes == 5


def test_weight_init_func_is_used():
    loss_fn = margin_softmax.CosFaceLoss(3, 4, weight_init_func=nn.init.ones_)
    assert torch.equal(loss_fn.W, torch.ones(4, 3))


@pytest.mark.parametrize("threshold", [40.0, 75.0])
def test_sub_center_outliers_match_pml(threshold):
    ours, theirs = make_pair("SubCenterArcFaceLoss", num_classes=4)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 0, 1, 2])
    emb = random_embeddings(n=12, seed=12)
    with torch.no_grad():  # half the embeddings close to a sub-centre of their class
        emb[::2] = ours.W[:, labels[::2] * 3 + 1].T + 0.1 * emb[::2]
    our_outliers, our_centres = ours.get_outliers(emb, labels, threshold=threshold)
    their_outliers, their_centres = theirs.get_outliers(emb, labels, threshold=threshold)
    assert our_outliers.tolist() == their_outliers.long().tolist()
    present = labels.unique()
    torch.testing.assert_close(our_centres[:, present], their_centres[:, present])
    assert torch.equal(our_centres[:, 3], torch.zeros(DIM, dtype=torch.float64))
    assert torch.equal(ours.get_outliers(emb, labels, threshold, False), our_outliers)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_wrong_embedding_size(name):
    loss_fn = getattr(margin_softmax, name)(num_classes=5, embedding_size=8)
    with pytest.raises(ValueError, match=r"(?s)(?=.*\b6\b)(?=.*\b8\b)"):
        loss_fn(torch.randn(4, 6), torch.tensor([0, 1, 2, 3]))


@pytest.mark.parametrize("bad", [5, 7, -1])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_label_out_of_range(name, bad):
    loss_fn = getattr(margin_softmax, name)(num_classes=5, embedding_size=8)
    with pytest.raises(ValueError, match=rf"label {bad}\b.*\[0, 5\)"):
        loss_fn(torch.randn(4, 8), torch.tensor([0, bad, 2, 3]))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_unsupported_inputs(name):
    loss_fn = getattr(margin_softmax, name)(num_classes=5, embedding_size=8)
    emb, labels = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="ref_emb"):
        loss_fn(emb, labels, ref_emb=emb.clone(), ref_labels=labels)
    with pytest.raises(ValueError, match="labels"):
        loss_fn(emb, None, indices_tuple=subset_of_triplets(labels))
    with pytest.raises(ValueError, match="integer"):
        loss_fn(emb, labels.float())


@pytest.mark.parametrize("name", ANGULAR + ["CosFaceLoss"])
def test_angular_losses_need_cosine(name):
    with pytest.raises(ValueError, match="cosine"):
        getattr(margin_softmax, name)(num_classes=5, embedding_size=8, distance="euclidean")


def test_large_margin_needs_positive_integer_margin():
    with pytest.raises(ValueError, match="margin"):
        margin_softmax.SphereFaceLoss(num_classes=5, embedding_size=8, margin=0)


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_half_precision_embeddings(name, dtype):
    torch.manual_seed(0)
    loss_fn = getattr(margin_softmax, name)(num_classes=NUM_CLASSES, embedding_size=32)
    emb = torch.randn(64, 32).to(dtype).requires_grad_(True)
    labels = torch.randint(0, NUM_CLASSES, (64,))
    loss = loss_fn(emb, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert emb.grad.dtype == dtype and torch.isfinite(emb.grad).all()
    assert loss_fn.W.dtype == torch.float32 and loss_fn.W.grad.dtype == torch.float32
    assert torch.isfinite(loss_fn.W.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("name", ANGULAR + ["CosFaceLoss"])
def test_embedding_on_its_class_centre_has_finite_gradients(name, dtype):
    """cos = +1 and cos = -1 exactly: PML's acos has an infinite derivative there."""
    torch.manual_seed(1)
    loss_fn = getattr(margin_softmax, name)(num_classes=6, embedding_size=16)
    with torch.no_grad():  # make the centres exactly representable in ``dtype``
        loss_fn.W.copy_(loss_fn.W.to(dtype).float())
    columns_per_class = loss_fn.W.shape[1] // 6
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    centres = loss_fn.W[:, labels * columns_per_class].T.detach()
    emb = torch.cat([centres[:3], -centres[3:]]).to(dtype).requires_grad_(True)
    loss = loss_fn(emb, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(emb.grad).all()
    assert torch.isfinite(loss_fn.W.grad).all()


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_autocast_bfloat16_keeps_float32_weights(name):
    torch.manual_seed(2)
    encoder = nn.Linear(12, 32)
    loss_fn = getattr(margin_softmax, name)(num_classes=NUM_CLASSES, embedding_size=32)
    x, labels = torch.randn(48, 12), torch.randint(0, NUM_CLASSES, (48,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = encoder(x)
        assert emb.dtype == torch.bfloat16
        loss = loss_fn(emb, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss_fn.W.dtype == torch.float32
    assert loss_fn.W.grad.dtype == torch.float32 and torch.isfinite(loss_fn.W.grad).all()
    assert torch.isfinite(encoder.weight.grad).all()


def test_autocast_computes_margin_in_float32():
    """Under autocast the loss equals the float32 loss of the same bfloat16 embeddings."""
    torch.manual_seed(3)
    loss_fn = margin_softmax.ArcFaceLoss(num_classes=NUM_CLASSES, embedding_size=32)
    emb = torch.randn(48, 32).bfloat16()
    labels = torch.randint(0, NUM_CLASSES, (48,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = loss_fn(emb, labels)
    torch.testing.assert_close(under_autocast, loss_fn(emb.float(), labels))


def test_training_step_reduces_the_loss():
    torch.manual_seed(4)
    emb = torch.randn(32, 16)
    labels = torch.randint(0, 4, (32,))
    loss_fn = margin_softmax.ArcFaceLoss(num_classes=4, embedding_size=16)
    optimizer = torch.optim.SGD(loss_fn.parameters(), lr=0.01)
    before = loss_fn(emb, labels)
    before.backward()
    optimizer.step()
    assert loss_fn(emb, labels) < before


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_int32_labels(name):
    ours, _ = make_pair(name)
    labels = label_patterns()["four_per_class"]
    emb = random_embeddings(seed=13)
    torch.testing.assert_close(ours(emb, labels.int()), ours(emb, labels))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_empty_batch_gives_connected_zero(name):
    loss_fn = getattr(margin_softmax, name)(num_classes=5, embedding_size=4)
    emb = torch.randn(0, 4, requires_grad=True)
    loss = loss_fn(emb, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and emb.grad.shape == (0, 4)
    assert loss_fn.W.grad is not None


@pytest.mark.parametrize("loss_class", [margin_softmax.ArcFaceLoss, margin_softmax.CosFaceLoss,
                                        margin_softmax.SubCenterArcFaceLoss,
                                        margin_softmax.SphereFaceLoss,
                                        margin_softmax.LargeMarginSoftmaxLoss])
@pytest.mark.parametrize("scale", [0, -16])
def test_a_scale_that_is_not_positive_is_refused(loss_class, scale):
    with pytest.raises(ValueError, match=f"{loss_class.__name__}: scale must be > 0, got {scale}"):
        loss_class(num_classes=4, embedding_size=8, scale=scale)


@pytest.mark.parametrize("loss_class", [margin_softmax.ArcFaceLoss,
                                        margin_softmax.SubCenterArcFaceLoss])
@pytest.mark.parametrize("margin", [-1, 180, 200])
def test_an_arcface_margin_outside_0_to_180_degrees_is_refused(loss_class, margin):
    with pytest.raises(ValueError, match=r"margin is in degrees and must lie in \[0, 180\)"):
        loss_class(num_classes=4, embedding_size=8, margin=margin)


@pytest.mark.parametrize("margin", [0, 0.5, 28.6, 179.9])
def test_arcface_margins_from_0_to_under_180_degrees_are_accepted(margin):
    loss = margin_softmax.ArcFaceLoss(num_classes=4, embedding_size=8, margin=margin)
    assert loss.margin == margin
