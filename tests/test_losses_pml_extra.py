"""SelfSupervisedLoss, VICRegLoss, HistogramLoss, InstanceLoss, P2SGradLoss and ManifoldLoss
against PML 2.9 (float64 values and gradients within 1e-5), plus what PML gets wrong."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DIM,
    assert_full_parity,
    assert_parity,
    label_patterns,
    random_embeddings,
    subset_of_pairs,
    subset_of_triplets,
)
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import reducers as pml_reducers

from lightning_metric import losses
from lightning_metric.losses.instance import OWN_CROSS_ENTROPY_FROM, row_cross_entropy
from lightning_metric.losses.p2sgrad import _CosineOneHotMSE

pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")

PATTERNS = list(label_patterns())
MINED = {"none": None, "pairs": subset_of_pairs, "triplets": subset_of_triplets}


def two_view_parity(ours, theirs, view1, view2, rtol=1e-5, atol=1e-8):
    """Same value and gradients w.r.t. both views."""
    results = []
    for loss_fn in (ours, theirs):
        a = view1.detach().clone().requires_grad_(True)
        b = view2.detach().clone().requires_grad_(True)
        value = loss_fn(a, ref_emb=b)
        value.backward()
        grads = [torch.zeros_like(x) if x.grad is None else x.grad for x in (a, b)]
        results.append((value.detach(), *grads))
    for mine, pml, what in zip(*results, ("value", "grad of embeddings", "grad of ref_emb"),
                               strict=True):
        torch.testing.assert_close(mine, pml, rtol=rtol, atol=atol, msg=what)


# --------------------------------------------------------------------------- SelfSupervisedLoss

WRAPPED = {
    "ntxent": (lambda: losses.NTXentLoss(), lambda: pml_losses.NTXentLoss()),
    "ntxent_t0.2": (lambda: losses.NTXentLoss(0.2), lambda: pml_losses.NTXentLoss(0.2)),
    "triplet": (lambda: losses.TripletMarginLoss(margin=0.5),
                lambda: pml_losses.TripletMarginLoss(margin=0.5)),
    "contrastive": (lambda: losses.ContrastiveLoss(), lambda: pml_losses.ContrastiveLoss()),
    "multi_similarity": (lambda: losses.MultiSimilarityLoss(),
                         lambda: pml_losses.MultiSimilarityLoss()),
}


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("wrapped", list(WRAPPED))
def test_self_supervised_matches_pml(wrapped, symmetric):
    make_ours, make_theirs = WRAPPED[wrapped]
    ours = losses.SelfSupervisedLoss(make_ours(), symmetric=symmetric)
    theirs = pml_losses.SelfSupervisedLoss(make_theirs(), symmetric=symmetric)
    view1 = random_embeddings(seed=1)
    view2 = view1 + 0.3 * random_embeddings(seed=2)
    two_view_parity(ours, theirs, view1, view2)


def test_self_supervised_is_the_wrapped_loss_on_item_labels():
    view1, view2 = random_embeddings(8, seed=3), random_embeddings(8, seed=4)
    labels = torch.arange(8)
    ntxent = losses.NTXentLoss()
    torch.testing.assert_close(
        losses.SelfSupervisedLoss(ntxent)(view1, view2),
        ntxent(torch.cat([view1, view2]), torch.cat([labels, labels])),
    )


def test_self_supervised_labels_are_unique_across_ranks(monkeypatch):
    """Under DDP, rank 1 of two ranks of 4 items labels its items 4..7, so that a gathering
    loss never takes item i of one rank for a view of item i of another."""
    from lightning_metric.distributed import Gathered
    from lightning_metric.losses import self_supervised

    seen = []
    monkeypatch.setattr(self_supervised, "is_distributed", lambda: True)
    monkeypatch.setattr(self_supervised, "gather_no_grad",
                        lambda t: Gathered(torch.cat([t, t]), [4, 4], rank=1))
    loss_fn = self_supervised.SelfSupervisedLoss(lambda emb, labels: seen.append(labels))
    loss_fn(random_embeddings(4), random_embeddings(4, seed=1))
    assert seen[0].tolist() == [4, 5, 6, 7, 4, 5, 6, 7]


def test_self_supervised_refuses_losses_with_class_weights():
    with pytest.raises(ValueError, match="ArcFaceLoss"):
        losses.SelfSupervisedLoss(losses.ArcFaceLoss(4, DIM))


# --------------------------------------------------------------------------- VICRegLoss

VICREG_CONFIGS = [
    ({}, {}),
    ({"invariance_lambda": 5, "variance_mu": 10, "covariance_v": 2, "eps": 1e-3},) * 2,
    ({"reducer": "avg_non_zero"}, {"reducer": pml_reducers.AvgNonZeroReducer()}),
    ({"reducer": "sum"}, {"reducer": pml_reducers.SumReducer()}),
]


@pytest.mark.parametrize("config", range(len(VICREG_CONFIGS)))
@pytest.mark.parametrize("scale", [0.5, 2.0])  # std below 1 (hinge active) and above
def test_vicreg_matches_pml(config, scale):
    ours_kwargs, pml_kwargs = VICREG_CONFIGS[config]
    view1 = scale * random_embeddings(seed=5)
    view2 = view1 + 0.2 * random_embeddings(seed=6)
    two_view_parity(losses.VICRegLoss(**ours_kwargs), pml_losses.VICRegLoss(**pml_kwargs),
                    view1, view2)


def test_vicreg_in_float32():
    view1 = random_embeddings(seed=7, dtype=torch.float32)
    view2 = random_embeddings(seed=8, dtype=torch.float32)
    two_view_parity(losses.VICRegLoss(), pml_losses.VICRegLoss(), view1, view2,
                    rtol=1e-4, atol=1e-5)


def test_vicreg_by_hand():
    """Two items, one feature: no covariance, variance hinge at std = 1."""
    view1 = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    view2 = torch.tensor([[0.0], [3.0]], dtype=torch.float64)
    invariance = 25 * (0 + 4) / 2
    variance = 25 * (max(0, 1 - math.sqrt(0.5 + 1e-4)) / 2 + max(0, 1 - math.sqrt(4.5 + 1e-4)) / 2)
    torch.testing.assert_close(losses.VICRegLoss()(view1, view2).item(), invariance + variance)


# --------------------------------------------------------------------------- HistogramLoss

HISTOGRAM_CONFIGS = [
    ({}, {}),
    ({"n_bins": 10},) * 2,
    ({"delta": 0.05},) * 2,
    ({"n_bins": 7, "distance": "dot"},
     {"n_bins": 7, "distance": pml_distances.DotProductSimilarity()}),
]


@pytest.mark.parametrize("mined", list(MINED))
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("config", range(len(HISTOGRAM_CONFIGS)))
def test_histogram_matches_pml(config, pattern, mined):
    ours_kwargs, pml_kwargs = HISTOGRAM_CONFIGS[config]
    labels = label_patterns()[pattern]
    kwargs = {} if MINED[mined] is None else {"indices_tuple": MINED[mined](labels)}
    embeddings = random_embeddings(seed=9)
    if "distance" in ours_kwargs:  # a dot product stays in [-1, 1] on unit rows
        embeddings = torch.nn.functional.normalize(embeddings, dim=1)
    assert_parity(losses.HistogramLoss(**ours_kwargs), pml_losses.HistogramLoss(**pml_kwargs),
                  embeddings, labels, **kwargs)


def test_histogram_by_hand():
    """One positive pair at similarity 0.5, one negative at 0.75, two bins ([-1, 0], [0, 1]):
    p+ = [0, 0.5, 0.5], p- = [0, 0.25, 0.75], loss = 0 + 0.25 * 0.5 + 0.75 * 1."""
    emb = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(0.75)], [0.75, -math.sqrt(1 - 0.5625)]],
                       dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    triplets = (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
    value = losses.HistogramLoss(n_bins=2)(emb, labels, triplets)
    torch.testing.assert_close(value.item(), 0.25 * 0.5 + 0.75 * 1.0)


def test_histogram_takes_a_similarity_of_one():
    """PML's bin index runs past its histogram for identical embeddings (an IndexError)."""
    emb = random_embeddings(seed=10)
    emb[1] = emb[0]
    labels = label_patterns()["four_per_class"]
    with pytest.raises(RuntimeError):
        pml_losses.HistogramLoss()(emb, labels)
    emb.requires_grad_(True)
    value = losses.HistogramLoss()(emb, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(emb.grad).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_bins": 10, "delta": 0.1}, "delta = 2 / n_bins"),
        ({"n_bins": 0}, "n_bins"),
        ({"distance": "euclidean"}, "similarity"),
    ],
)
def test_histogram_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        losses.HistogramLoss(**kwargs)


def test_histogram_refuses_a_reference_set():
    labels = label_patterns()["four_per_class"]
    with pytest.raises(ValueError, match="ref_emb"):
        losses.HistogramLoss()(random_embeddings(), labels, ref_emb=random_embeddings(seed=1),
                               ref_labels=labels)


# --------------------------------------------------------------------------- InstanceLoss

INSTANCE_CONFIGS = [
    ({}, {}),
    ({"gamma": 10},) * 2,
    ({"reducer": "sum"}, {"reducer": pml_reducers.SumReducer()}),
]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("config", range(len(INSTANCE_CONFIGS)))
def test_instance_matches_pml(config, pattern):
    ours_kwargs, pml_kwargs = INSTANCE_CONFIGS[config]
    labels = label_patterns()[pattern] * 3 + 1  # labels need not be 0..C-1
    assert_parity(losses.InstanceLoss(**ours_kwargs), pml_losses.InstanceLoss(**pml_kwargs),
                  random_embeddings(seed=11), labels)


@pytest.mark.parametrize("rows", [8, 300])   # autograd's cross-entropy, then our own
def test_instance_cross_entropy_matches_torch_in_values_and_gradients(rows):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, rows, generator=generator, dtype=torch.float64) * 20
    target = torch.randint(rows, (rows,), generator=generator)
    weights = torch.rand(rows, generator=generator, dtype=torch.float64)
    ours, theirs = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    assert (logits.numel() >= OWN_CROSS_ENTROPY_FROM) == (rows == 300)
    mine = row_cross_entropy(ours, target)
    reference = torch.nn.functional.cross_entropy(theirs, target, reduction="none")
    torch.testing.assert_close(mine, reference, rtol=1e-12, atol=1e-12)
    (mine * weights).sum().backward()
    (reference * weights).sum().backward()
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-12, atol=1e-12)


def test_instance_bad_input():
    with pytest.raises(ValueError, match="cosine"):
        losses.InstanceLoss(distance="euclidean")
    labels = label_patterns()["four_per_class"]
    with pytest.raises(ValueError, match="indices_tuple"):
        losses.InstanceLoss()(random_embeddings(), labels, subset_of_triplets(labels))
    with pytest.raises(ValueError, match="ref_emb"):
        losses.InstanceLoss()(random_embeddings(), labels, ref_emb=random_embeddings(seed=1),
                              ref_labels=labels)


# --------------------------------------------------------------------------- P2SGradLoss

NUM_CLASSES = 20  # every label pattern (B=16) lies in [0, 20)


def p2sgrad_pair(dim=DIM, num_classes=NUM_CLASSES):
    theirs = pml_losses.P2SGradLoss(dim, num_classes)
    ours = losses.P2SGradLoss(dim, num_classes)
    ours.load_state_dict(theirs.state_dict())
    return ours.double(), theirs.double()


@pytest.mark.parametrize("pattern", PATTERNS)
def test_p2sgrad_matches_pml(pattern):
    ours, theirs = p2sgrad_pair()
    assert_full_parity(ours, theirs, random_embeddings(seed=12), label_patterns()[pattern])


def test_p2sgrad_in_float32():
    ours, theirs = p2sgrad_pair()
    ours.float(), theirs.float()
    assert_full_parity(ours, theirs, random_embeddings(seed=12, dtype=torch.float32),
                       label_patterns()["four_per_class"], rtol=1e-4, atol=1e-5)


def test_p2sgrad_matches_pml_after_optimizer_steps():
    """An SGD step moves the columns off the unit sphere; both renormalise before the next."""
    ours, theirs = p2sgrad_pair()
    labels = label_patterns()["two_views"]
    optimizers = [torch.optim.SGD(loss.parameters(), lr=0.5) for loss in (ours, theirs)]
    for step in range(3):
        assert_full_parity(ours, theirs, random_embeddings(seed=13 + step), labels)
        for optimizer in optimizers:
            optimizer.step()
    torch.testing.assert_close(ours.weight, theirs.weight)


def test_p2sgrad_fused_mse_matches_autograd_where_the_clamp_cuts():
    """The fused cosine MSE against autograd's clamp + mse_loss, with rows long enough that
    20-80% of the products leave [-1, 1] (where the clamp passes no gradient)."""
    generator = torch.Generator().manual_seed(15)
    unit = (0.5 * torch.randn(12, 6, generator=generator, dtype=torch.float64)).requires_grad_()
    weight = torch.randn(6, 9, generator=generator, dtype=torch.float64).requires_grad_()
    labels = torch.randint(0, 9, (12,), generator=generator)
    cos = unit @ weight
    assert 0.2 < float((cos.abs() > 1).double().mean()) < 0.8
    expected = F.mse_loss(cos.clamp(-1, 1), F.one_hot(labels, 9).double())
    expected_grads = torch.autograd.grad(3 * expected, (unit, weight))
    value = _CosineOneHotMSE.apply(unit, weight, labels)
    grads = torch.autograd.grad(3 * value, (unit, weight))
    torch.testing.assert_close(value, expected)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_p2sgrad_init_layout_and_state_dict_match_pml():
    torch.manual_seed(14)
    theirs = pml_losses.P2SGradLoss(5, 7)
    torch.manual_seed(14)
    ours = losses.P2SGradLoss(5, 7)
    assert ours.state_dict().keys() == theirs.state_dict().keys() == {"weight"}
    assert ours.weight.shape == (5, 7) and ours.weight.dtype == torch.float32
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=0, atol=0)
    with torch.no_grad():
        ours.weight.mul_(-1)
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(theirs.weight, ours.weight)


def test_p2sgrad_keeps_float32_weights_under_half_inputs():
    loss_fn = losses.P2SGradLoss(DIM, 4)
    value = loss_fn(random_embeddings(dtype=torch.float16), torch.arange(4).repeat(4))
    assert torch.isfinite(value) and loss_fn.weight.dtype == torch.float32


def test_p2sgrad_bad_input():
    loss_fn = losses.P2SGradLoss(DIM, 4)
    labels = label_patterns()["four_per_class"]
    with pytest.raises(ValueError, match="indices_tuple"):
        loss_fn(random_embeddings(), labels, subset_of_triplets(labels))
    with pytest.raises(ValueError, match="outside"):
        loss_fn(random_embeddings(), labels + 1)
    with pytest.raises(ValueError, match=f"embedding_size={DIM}"):
        loss_fn(random_embeddings(dim=DIM + 1), labels)


# --------------------------------------------------------------------------- ManifoldLoss

MANIFOLD_CONFIGS = [
    {},
    {"lambdaC": 0.0},
    {"lambdaC": 3.0, "alpha": 0.5, "margin": 0.01},
]
K = 5


def manifold_pair(**kwargs):
    theirs = pml_losses.ManifoldLoss(DIM, K=K, **kwargs)
    ours = losses.ManifoldLoss(DIM, K=K, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours.double(), theirs.double()


def manifold_parity(ours, theirs, embeddings, meta=None, seed=None, rtol=1e-5, atol=1e-8):
    """Value and gradients (embeddings, proxies); ``seed`` seeds the random meta-classes."""
    results = []
    for loss_fn in (ours, theirs):
        loss_fn.zero_grad()
        emb = embeddings.detach().clone().requires_grad_(True)
        if seed is not None:
            torch.manual_seed(seed)
        value = loss_fn(emb, indices_tuple=meta)
        value.backward()
        results.append((value.detach().reshape(()), emb.grad, loss_fn.proxies.grad))
    for mine, pml, what in zip(*results, ("value", "grad of embeddings", "grad of proxies"),
                               strict=True):
        torch.testing.assert_close(mine, pml, rtol=rtol, atol=atol, msg=what)


@pytest.mark.parametrize("meta_seed", [0, 1])
@pytest.mark.parametrize("config", range(len(MANIFOLD_CONFIGS)))
def test_manifold_matches_pml(config, meta_seed):
    ours, theirs = manifold_pair(**MANIFOLD_CONFIGS[config])
    meta = torch.randint(0, K, (16,), generator=torch.Generator().manual_seed(meta_seed))
    manifold_parity(ours, theirs, random_embeddings(seed=15 + meta_seed), meta)


def test_manifold_draws_the_meta_classes_as_pml_does():
    ours, theirs = manifold_pair()
    manifold_parity(ours, theirs, random_embeddings(seed=17), seed=18)
    generator = torch.Generator().manual_seed(18)
    seeded = losses.ManifoldLoss(DIM, K=K, generator=generator).double()
    seeded.load_state_dict(ours.state_dict())
    torch.manual_seed(18)
    expected = ours(random_embeddings(seed=17))
    torch.manual_seed(99)  # the global RNG is not used
    torch.testing.assert_close(seeded(random_embeddings(seed=17)), expected)


def test_manifold_in_float32():
    ours, theirs = manifold_pair()
    ours.float(), theirs.float()
    meta = torch.arange(16) % K
    manifold_parity(ours, theirs, random_embeddings(seed=19, dtype=torch.float32), meta,
                    rtol=1e-4, atol=1e-5)


def test_manifold_infinite_lambda_is_the_context_loss_alone():
    """PML returns inf (or NaN) here, never the context loss."""
    meta = torch.arange(16) % K
    emb = random_embeddings(seed=20)
    inf_loss = losses.ManifoldLoss(DIM, K=K, lambdaC=math.inf)
    ctx_only = losses.ManifoldLoss(DIM, K=K, lambdaC=1.0)
    ctx_only.load_state_dict(inf_loss.state_dict())
    no_ctx = losses.ManifoldLoss(DIM, K=K, lambdaC=0.0)
    no_ctx.load_state_dict(inf_loss.state_dict())
    for loss_fn in (inf_loss, ctx_only, no_ctx):
        loss_fn.double()
    expected = ctx_only(emb, indices_tuple=meta) - no_ctx(emb, indices_tuple=meta)
    torch.testing.assert_close(inf_loss(emb, indices_tuple=meta), expected)


def test_manifold_init_layout_and_state_dict_match_pml():
    torch.manual_seed(21)
    theirs = pml_losses.ManifoldLoss(6, K=4)
    torch.manual_seed(21)
    ours = losses.ManifoldLoss(6, K=4)
    assert ours.state_dict().keys() == theirs.state_dict().keys() == {"proxies"}
    assert ours.proxies.shape == (4, 6) and ours.proxies.dtype == torch.float32
    torch.testing.assert_close(ours.proxies, theirs.proxies, rtol=0, atol=0)
    with torch.no_grad():
        ours.proxies.add_(1.0)
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(theirs.proxies, ours.proxies)


def test_manifold_bad_input():
    loss_fn = losses.ManifoldLoss(DIM, K=K)
    with pytest.raises(ValueError, match=f"K={K}"):
        loss_fn(random_embeddings(n=4))
    with pytest.raises(ValueError, match="meta-classes"):
        loss_fn(random_embeddings(), indices_tuple=torch.full((16,), K))
    with pytest.raises(ValueError, match="lambdaC"):
        losses.ManifoldLoss(DIM, lambdaC=-1)
