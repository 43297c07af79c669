"""Proxy losses (ProxyNCA, ProxyAnchor, SoftTriple) and weight regularizers against PML 2.9."""

from __future__ import annotations

import pytest
import torch
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

from lightning_metric import regularizers
from lightning_metric.losses import proxy

NUM_CLASSES = 20  # every label pattern of helpers (B=16) lies in [0, 20); some classes are absent

LOSS_NAMES = ["ProxyNCALoss", "ProxyAnchorLoss", "SoftTripleLoss"]
PARAMETER = {"ProxyNCALoss": "proxies", "ProxyAnchorLoss": "proxies", "SoftTripleLoss": "fc"}

# name: [(our kwargs, PML kwargs)], default first.
CONFIGS = {
    "ProxyNCALoss": [
        ({}, {}),
        ({"softmax_scale": 3},) * 2,
        ({"distance": "cosine"}, {"distance": pml_distances.CosineSimilarity()}),
    ],
    "ProxyAnchorLoss": [
        ({}, {}),
        ({"margin": 0.2, "alpha": 16},) * 2,
        ({"distance": "euclidean"}, {"distance": pml_distances.LpDistance()}),
        ({"reducer": "mean"}, {"reducer": pml_reducers.MeanReducer()}),
    ],
    "SoftTripleLoss": [
        ({}, {}),
        ({"centers_per_class": 3, "la": 10, "gamma": 0.2, "margin": 0.05},) * 2,
        ({"distance": "dot"}, {"distance": pml_distances.DotProductSimilarity()}),
    ],
}
CASES = [(name, i) for name, configs in CONFIGS.items() for i in range(len(configs))]


def make_pair(name, ours_kwargs=None, pml_kwargs=None, num_classes=NUM_CLASSES, dim=DIM):
    """PML's loss and ours holding the same (PML-initialised) weights, both in float64."""
    theirs = getattr(pml_losses, name)(
        num_classes=num_classes, embedding_size=dim, **(pml_kwargs or {})
    )
    ours = getattr(proxy, name)(num_classes=num_classes, embedding_size=dim, **(ours_kwargs or {}))
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
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_parity_other_reducers(name, reducer, pml_reducer):
    ours, theirs = make_pair(name, {"reducer": reducer}, {"reducer": pml_reducer()})
    assert_full_parity(ours, theirs, random_embeddings(seed=5), label_patterns()["two_views"])


@pytest.mark.parametrize(
    "name,ours_kwargs,pml_kwargs",
    [
        (
            "SoftTripleLoss",
            {"centers_per_class": 3, "weight_regularizer": "sparse_centers"},
            {
                "centers_per_class": 3,
                "weight_regularizer": pml_regularizers.SparseCentersRegularizer(NUM_CLASSES, 3),
            },
        ),
        (
            "ProxyAnchorLoss",
            {"weight_regularizer": "regular_face", "weight_reg_weight": 0.5},
            {
                "weight_regularizer": pml_regularizers.RegularFaceRegularizer(),
                "weight_reg_weight": 0.5,
            },
        ),
        (
            "ProxyNCALoss",
            {"weight_regularizer": "center_invariant", "weight_reg_weight": 0.3},
            {
                "weight_regularizer": pml_regularizers.CenterInvariantRegularizer(),
                "weight_reg_weight": 0.3,
            },
        ),
        (
            "ProxyAnchorLoss",
            {"embedding_regularizer": "lp", "weight_regularizer": "lp"},
            {
                "embedding_regularizer": pml_regularizers.LpRegularizer(),
                "weight_regularizer": pml_regularizers.LpRegularizer(),
            },
        ),
    ],
)
def test_parity_with_regularizers(name, ours_kwargs, pml_kwargs):
    ours, theirs = make_pair(name, ours_kwargs, pml_kwargs)
    assert_full_parity(ours, theirs, random_embeddings(seed=6), label_patterns()["four_per_class"])


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_parity_in_float32(name):
    ours, theirs = make_pair(name)
    ours.float(), theirs.float()
    emb = random_embeddings(seed=8, dtype=torch.float32)
    # float32 rounding of sums of O(10) terms: absolute tolerance for entries near zero.
    assert_full_parity(ours, theirs, emb, label_patterns()["four_per_class"], rtol=1e-4, atol=1e-5)


def test_proxy_anchor_by_hand():
    """One class with two embeddings, one other class: the paper's formula, written out."""
    emb = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    loss_fn = proxy.ProxyAnchorLoss(2, 2, margin=0.1, alpha=32).double()
    loss_fn.proxies.data.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    cos = emb @ loss_fn.proxies.detach().T
    pos = [torch.log1p(torch.exp(32 * (0.1 - cos[labels == c, c])).sum()) for c in (0, 1)]
    neg = [torch.log1p(torch.exp(32 * (cos[labels != c, c] + 0.1)).sum()) for c in (0, 1)]
    expected = sum(pos) / 2 + sum(neg) / 2
    torch.testing.assert_close(loss_fn(emb, labels), expected)


# --------------------------------------------------------------------------- weights and state


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_default_init_and_layout_match_pml(name):
    torch.manual_seed(11)
    theirs = getattr(pml_losses, name)(num_classes=7, embedding_size=5)
    torch.manual_seed(11)
    ours = getattr(proxy, name)(num_classes=7, embedding_size=5)
    key = PARAMETER[name]
    assert ours.state_dict().keys() == theirs.state_dict().keys() == {key}
    torch.testing.assert_close(getattr(ours, key), getattr(theirs, key), rtol=0, atol=0)
    assert getattr(ours, key).dtype == torch.float32


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_state_dict_round_trip_with_pml(name):
    theirs = getattr(pml_losses, name)(num_classes=6, embedding_size=4)
    ours = getattr(proxy, name)(num_classes=6, embedding_size=4)
    key = PARAMETER[name]
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(getattr(ours, key), getattr(theirs, key))
    with torch.no_grad():
        getattr(ours, key).add_(1.0)
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(getattr(theirs, key), getattr(ours, key))


def test_shapes():
    assert proxy.ProxyNCALoss(5, 4).proxies.shape == (5, 4)
    assert proxy.ProxyAnchorLoss(5, 4).proxies.shape == (5, 4)
    assert proxy.SoftTripleLoss(5, 4, centers_per_class=3).fc.shape == (4, 15)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_wrong_embedding_size(name):
    loss_fn = getattr(proxy, name)(num_classes=5, embedding_size=8)
    with pytest.raises(ValueError, match=r"(?s)(?=.*\b6\b)(?=.*\b8\b)"):
        loss_fn(torch.randn(4, 6), torch.tensor([0, 1, 2, 3]))


@pytest.mark.parametrize("bad", [5, 9, -2])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_label_out_of_range(name, bad):
    loss_fn = getattr(proxy, name)(num_classes=5, embedding_size=8)
    with pytest.raises(ValueError, match=rf"label {bad}\b.*\[0, 5\)"):
        loss_fn(torch.randn(4, 8), torch.tensor([0, 1, bad, 3]))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_unsupported_inputs(name):
    loss_fn = getattr(proxy, name)(num_classes=5, embedding_size=8)
    emb, labels = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="ref_emb"):
        loss_fn(emb, labels, ref_emb=emb.clone(), ref_labels=labels)
    with pytest.raises(ValueError, match="labels"):
        loss_fn(emb, None, indices_tuple=subset_of_triplets(labels))


def test_soft_triple_needs_a_similarity():
    with pytest.raises(ValueError, match="similarity"):
        proxy.SoftTripleLoss(5, 8, distance="euclidean")


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_half_precision_embeddings(name, dtype):
    torch.manual_seed(0)
    loss_fn = getattr(proxy, name)(num_classes=NUM_CLASSES, embedding_size=32)
    emb = torch.randn(64, 32).to(dtype).requires_grad_(True)
    labels = torch.randint(0, NUM_CLASSES, (64,))
    loss = loss_fn(emb, labels)
    loss.backward()
    weight = getattr(loss_fn, PARAMETER[name])
    assert torch.isfinite(loss)
    assert emb.grad.dtype == dtype and torch.isfinite(emb.grad).all()
    assert weight.dtype == torch.float32 and weight.grad.dtype == torch.float32
    assert torch.isfinite(weight.grad).all()


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_autocast_bfloat16_keeps_float32_weights(name):
    torch.manual_seed(2)
    encoder = nn.Linear(12, 32)
    loss_fn = getattr(proxy, name)(num_classes=NUM_CLASSES, embedding_size=32)
    x, labels = torch.randn(48, 12), torch.randint(0, NUM_CLASSES, (48,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = encoder(x)
        loss = loss_fn(emb, labels)
    loss.backward()
    weight = getattr(loss_fn, PARAMETER[name])
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert weight.dtype == torch.float32
    assert weight.grad.dtype == torch.float32 and torch.isfinite(weight.grad).all()
    assert torch.isfinite(encoder.weight.grad).all()


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_embeddings_on_the_proxies(name):
    """Zero distances (cdist's gradient is delicate there) stay finite."""
    loss_fn = getattr(proxy, name)(num_classes=4, embedding_size=8)
    weight = getattr(loss_fn, PARAMETER[name]).detach()
    emb = (weight[:4] if name != "SoftTripleLoss" else weight.T[::10]).clone().requires_grad_(True)
    loss = loss_fn(emb, torch.arange(4))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(emb.grad).all()


def test_proxy_anchor_extreme_similarities_are_stable():
    """alpha * (margin - s) up to ~2000: log(1 + sum exp) must not overflow."""
    loss_fn = proxy.ProxyAnchorLoss(3, 4, alpha=1000.0, distance="dot")
    emb = torch.randn(6, 4, requires_grad=True)
    loss = loss_fn(emb, torch.tensor([0, 0, 1, 1, 2, 2]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(emb.grad).all()


# --------------------------------------------------------------------------- regularizers


def _reg_value_and_grad(reg, weights):
    w = weights.detach().clone().requires_grad_(True)
    value = reg(w)
    value.backward()
    return value.detach(), w.grad


@pytest.mark.parametrize(
    "ours,theirs",
    [
        (regularizers.RegularFaceRegularizer(), pml_regularizers.RegularFaceRegularizer()),
        (regularizers.CenterInvariantRegularizer(), pml_regularizers.CenterInvariantRegularizer()),
        (
            regularizers.SparseCentersRegularizer(5, 3),
            pml_regularizers.SparseCentersRegularizer(5, 3),
        ),
    ],
)
def test_weight_regularizers_match_pml(ours, theirs):
    weights = random_embeddings(n=15, dim=6, seed=9)
    our_value, our_grad = _reg_value_and_grad(ours, weights)
    their_value, their_grad = _reg_value_and_grad(theirs, weights)
    torch.testing.assert_close(our_value, their_value, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-5, atol=1e-8)


def test_regular_face_chunks_give_the_same_answer():
    weights = random_embeddings(n=23, dim=6, seed=10)
    whole = regularizers.RegularFaceRegularizer()
    chunked = regularizers.RegularFaceRegularizer()
    chunked.chunk_rows = 4
    torch.testing.assert_close(
        _reg_value_and_grad(whole, weights), _reg_value_and_grad(chunked, weights)
    )


def test_get_regularizer_names():
    assert isinstance(
        regularizers.get_regularizer("regular_face"), regularizers.RegularFaceRegularizer
    )
    assert isinstance(
        regularizers.get_regularizer("center_invariant"),
        regularizers.CenterInvariantRegularizer,
    )
    sparse = regularizers.get_regularizer("sparse_centers", num_classes=4, centers_per_class=2)
    assert isinstance(sparse, regularizers.SparseCentersRegularizer)
    with pytest.raises(ValueError, match="centers_per_class"):
        regularizers.SparseCentersRegularizer(4, 1)
    with pytest.raises(ValueError, match="rows"):
        sparse(torch.randn(7, 3))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_int32_labels(name):
    ours, _ = make_pair(name)
    labels = label_patterns()["four_per_class"]
    emb = random_embeddings(seed=13)
    torch.testing.assert_close(ours(emb, labels.int()), ours(emb, labels))


def test_soft_max_similarity_gradient():
    from lightning_metric.losses.proxy import _SoftMaxSimilarity

    sims = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda s: _SoftMaxSimilarity.apply(s, 7.0), (sims,))
    reference = (torch.softmax(sims * 7.0, dim=1) * sims).sum(dim=1)
    torch.testing.assert_close(_SoftMaxSimilarity.apply(sims, 7.0), reference)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_empty_batch_gives_connected_zero(name):
    loss_fn = getattr(proxy, name)(num_classes=5, embedding_size=4)
    emb = torch.randn(0, 4, requires_grad=True)
    loss = loss_fn(emb, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and emb.grad.shape == (0, 4)
    assert getattr(loss_fn, PARAMETER[name]).grad is not None
