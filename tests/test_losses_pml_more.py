"""DynamicSoftMarginLoss, PNPLoss, RankedListLoss and ThresholdConsistentMarginLoss against
PML 2.9 (float64 values and gradients within 1e-5), small hand-computed cases, and what PML
gets wrong."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_parity,
    label_patterns,
    random_embeddings,
    subset_of_pairs,
    subset_of_triplets,
)
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import reducers as pml_reducers

from lightning_metric import indices, losses
from lightning_metric.distances import LpDistance
from lightning_metric.losses import _all_triplets

pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")

PATTERNS = list(label_patterns())
MINED = {"none": None, "pairs": subset_of_pairs, "triplets": subset_of_triplets}


def mined_kwargs(mined: str, labels: torch.Tensor) -> dict:
    return {} if MINED[mined] is None else {"indices_tuple": MINED[mined](labels)}


# --------------------------------------------------------------------------- DynamicSoftMargin

DSM_CONFIGS = [
    {},
    {"num_bins": 20, "momentum": 0.1},
    {"min_val": -3.0, "num_bins": 5},
]


@pytest.mark.parametrize("mined", list(MINED))
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("config", range(len(DSM_CONFIGS)))
def test_dynamic_soft_margin_matches_pml(config, pattern, mined):
    kwargs = DSM_CONFIGS[config]
    labels = label_patterns()[pattern]
    assert_parity(losses.DynamicSoftMarginLoss(**kwargs),
                  pml_losses.DynamicSoftMarginLoss(**kwargs),
                  random_embeddings(seed=1), labels, **mined_kwargs(mined, labels))


@pytest.mark.parametrize("mined", ["none", "triplets"])
def test_dynamic_soft_margin_with_a_reference_set_matches_pml(mined):
    labels, ref_labels = label_patterns()["four_per_class"], label_patterns()["two_views"]
    kwargs = mined_kwargs(mined, labels)
    assert_parity(losses.DynamicSoftMarginLoss(), pml_losses.DynamicSoftMarginLoss(),
                  random_embeddings(seed=2), labels, ref_emb=random_embeddings(seed=3),
                  ref_labels=ref_labels, **kwargs)


@pytest.mark.parametrize("ref_rows", [None, 16, 12, 20])
def test_dynamic_soft_margin_without_labels_matches_pml(ref_rows):
    """Matching descriptors: row i of the embeddings with row i of ref_emb (PML pads the
    margins with zeros when the two sets differ in size). PML's backward fails in this mode
    (it fills cdist's output in place): values against PML, gradients by finite differences."""
    anchors = random_embeddings(seed=4)
    ref = None
    if ref_rows is not None:
        ref = random_embeddings(n=ref_rows, seed=5)
        matched = min(ref_rows, len(anchors))
        ref[:matched] = anchors[:matched] + 0.3 * ref[:matched]
    with torch.no_grad():
        expected = pml_losses.DynamicSoftMarginLoss()(anchors, ref_emb=ref)
    loss_fn = losses.DynamicSoftMarginLoss()
    torch.testing.assert_close(loss_fn(anchors, ref_emb=ref), expected)
    with pytest.raises(RuntimeError, match="inplace operation"):
        pml_losses.DynamicSoftMarginLoss()(anchors.clone().requires_grad_(True),
                                           ref_emb=ref).backward()
    loss_fn.eval()  # the histogram stays put between gradcheck's calls
    small = (anchors[:5, :3].clone().requires_grad_(True),)
    if ref is not None:
        small += (ref[: ref_rows // 4, :3].clone().requires_grad_(True),)
    assert torch.autograd.gradcheck(
        lambda *x: loss_fn(x[0], ref_emb=x[1] if len(x) > 1 else None), small, fast_mode=True)


def test_dynamic_soft_margin_histogram_follows_pml_over_calls():
    """Same values, gradients and histogram as PML call after call (PML keeps the
    histogram's graph: its backward needs retain_graph from the second call on)."""
    ours, theirs = losses.DynamicSoftMarginLoss(momentum=0.3), pml_losses.DynamicSoftMarginLoss(
        momentum=0.3)
    patterns = ["four_per_class", "two_views", "no_positive_pair", "imbalanced_singletons"]
    for step, pattern in enumerate(patterns + ["matching"]):
        labels = None if pattern == "matching" else label_patterns()[pattern]
        embeddings = random_embeddings(seed=10 + step)
        ref = 0.5 * embeddings + random_embeddings(seed=20 + step) if labels is None else None
        results = []
        for loss_fn in (ours, theirs):
            emb = embeddings.clone().requires_grad_(labels is not None)
            with torch.set_grad_enabled(labels is not None):  # PML: no backward when matching
                value = loss_fn(emb, labels, ref_emb=ref)
            if labels is not None:
                value.backward(retain_graph=True)
            grad = emb.grad if labels is not None else torch.zeros_like(emb)
            results.append((value.detach(), grad, loss_fn.hist_.detach()))
        for mine, pml, what in zip(*results, ("value", "gradient", "histogram"), strict=True):
            torch.testing.assert_close(mine, pml, rtol=1e-5, atol=1e-8, msg=f"{what}, {pattern}")
    assert not ours.hist_.requires_grad and "hist_" in ours.state_dict()


def test_dynamic_soft_margin_trains_over_several_backwards():
    """PML's second backward fails (the histogram's graph of the first call is freed)."""
    labels = label_patterns()["four_per_class"]
    theirs = pml_losses.DynamicSoftMarginLoss()
    theirs(random_embeddings(seed=30).requires_grad_(True), labels).backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        theirs(random_embeddings(seed=31).requires_grad_(True), labels).backward()
    ours = losses.DynamicSoftMarginLoss()
    for seed in (30, 31, 32):
        emb = random_embeddings(seed=seed).requires_grad_(True)
        ours(emb, labels).backward()
        assert torch.isfinite(emb.grad).all()


def test_dynamic_soft_margin_leaves_its_histogram_alone_in_eval_mode():
    labels = label_patterns()["four_per_class"]
    loss_fn = losses.DynamicSoftMarginLoss(momentum=0.2)
    loss_fn(random_embeddings(seed=40), labels)
    before = loss_fn.hist_.clone()
    training_twin = copy.deepcopy(loss_fn)
    loss_fn.eval()
    value = loss_fn(random_embeddings(seed=41), labels)
    assert torch.equal(loss_fn.hist_, before)
    torch.testing.assert_close(value, training_twin(random_embeddings(seed=41), labels))
    assert not torch.equal(training_twin.hist_, before)
    empty = losses.DynamicSoftMarginLoss().eval()  # an untrained loss weighs by the batch alone
    empty(random_embeddings(seed=42), labels)
    assert torch.equal(empty.hist_, torch.zeros(10))


def test_dynamic_soft_margin_takes_margins_past_the_last_node():
    """An anchor at distance 2 from its positive and 0 from its negative: margin 2, past the
    last node (1.6); PML indexes past its histogram. Here the margin counts at the last node,
    CDF 1: loss = 2. Below min_val it counts at the first node."""
    a = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    emb = torch.cat([a, -a, a]).requires_grad_(True)
    labels = torch.tensor([0, 0, 1])
    triplet = (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
    with pytest.raises(RuntimeError):
        pml_losses.DynamicSoftMarginLoss()(emb, labels, triplet)
    loss_fn = losses.DynamicSoftMarginLoss()
    value = loss_fn(emb, labels, triplet)
    value.backward()
    assert value.item() == pytest.approx(2.0) and torch.isfinite(emb.grad).all()
    assert loss_fn.hist_.tolist() == [0.0] * 9 + [1.0]
    below = losses.DynamicSoftMarginLoss(min_val=-1.0)
    reversed_triplet = (torch.tensor([0]), torch.tensor([2]), torch.tensor([1]))
    assert below(emb, torch.tensor([0, 1, 0]), reversed_triplet).item() == pytest.approx(-2.0)
    assert below.hist_.tolist() == [1.0] + [0.0] * 9


@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("config", [{}, {"min_val": -1.0, "num_bins": 3}, {"min_val": -0.5}])
def test_dynamic_soft_margin_bins_all_triplets_as_it_bins_their_list(config, with_ref,
                                                                     monkeypatch):
    """Without an indices_tuple every triplet is binned chunk by chunk, never listed; that
    gives the value, gradient and histogram of the same triplets listed (a path checked
    against PML above), here in many chunks and with margins below min_val and past the last
    node (where PML fails), over two calls (the second blends into the first's histogram)."""
    monkeypatch.setattr(_all_triplets, "CHUNK_BYTES", 2000)  # a few anchors a chunk
    labels = label_patterns()["imbalanced_singletons"]
    ref_labels = label_patterns()["four_per_class"] if with_ref else labels
    listed, binned = losses.DynamicSoftMarginLoss(**config), losses.DynamicSoftMarginLoss(**config)
    for seed in (50, 51):
        embeddings = random_embeddings(seed=seed)
        ref = random_embeddings(seed=seed + 10) if with_ref else None
        triplets = indices.all_triplets(labels, ref_labels, same_set=not with_ref)
        results = []
        for loss_fn, indices_tuple in ((listed, triplets), (binned, None)):
            emb = embeddings.clone().requires_grad_(True)
            value = loss_fn(emb, labels, indices_tuple, ref_emb=ref,
                            ref_labels=ref_labels if with_ref else None)
            value.backward()
            results.append((value, emb.grad, loss_fn.hist_))
        for mine, expected in zip(*results, strict=True):
            torch.testing.assert_close(mine, expected)
    assert int((listed.hist_ > 0).sum()) >= 3  # the margins spread over several nodes


def test_dynamic_soft_margin_float32_agrees_with_float64_on_a_large_batch():
    """190,000 float32 margins binned and summed give float64's value and gradient."""
    labels = torch.arange(64).repeat_interleave(4)
    embeddings = random_embeddings(n=256, dim=32, seed=52)
    results = []
    for dtype in (torch.float64, torch.float32):
        emb = embeddings.detach().to(dtype).requires_grad_(True)
        value = losses.DynamicSoftMarginLoss()(emb, labels)
        value.backward()
        results.append((value.double(), emb.grad.double()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-7)


def test_dynamic_soft_margin_by_hand():
    """One triplet, margin x = 0.5 - 1 = -0.5 with min_val=-1, 2 bins (nodes -1, 0): weight
    0.5 at each node, CDF at node 0 = 0.5, loss = 0.5 * -0.5."""
    emb = torch.tensor([[1.0, 0.0], [math.cos(0.5), math.sin(0.5)],
                        [math.cos(1.0), -math.sin(1.0)]], dtype=torch.float64)
    d_pos, d_neg = (emb[0] - emb[1]).norm(), (emb[0] - emb[2]).norm()
    x = float(d_pos - d_neg)
    triplet = (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
    loss_fn = losses.DynamicSoftMarginLoss(min_val=-1.0, num_bins=2)
    value = loss_fn(emb, torch.tensor([0, 0, 1]), triplet)
    upper = x + 1  # share of node 0 (at 0) for a margin in [-1, 0)
    torch.testing.assert_close(loss_fn.hist_, torch.tensor([1 - upper, upper], dtype=torch.float64))
    torch.testing.assert_close(value.item(), (1 - upper) * x)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"distance": "cosine"}, "Euclidean"),
        ({"distance": LpDistance(normalize_embeddings=False)}, "Euclidean"),
        ({"num_bins": 1}, "num_bins"),
        ({"min_val": 1.0}, "min_val"),
        ({"momentum": 2.0}, "momentum"),
    ],
)
def test_dynamic_soft_margin_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        losses.DynamicSoftMarginLoss(**kwargs)


def test_dynamic_soft_margin_bad_input():
    loss_fn = losses.DynamicSoftMarginLoss()
    with pytest.raises(ValueError, match="2-D"):
        loss_fn(torch.randn(16))
    with pytest.raises(ValueError, match="embedding size"):
        loss_fn(torch.randn(16, 4), ref_emb=torch.randn(16, 5))
    with pytest.raises(ValueError, match="needs labels"):
        loss_fn(torch.randn(16, 4), indices_tuple=subset_of_triplets(torch.arange(4).repeat(4)))


# --------------------------------------------------------------------------- PNPLoss

PNP_CONFIGS = [
    *({"variant": v} for v in losses.PNPLoss.VARIANTS),
    {"variant": "Ib", "b": 3},
    {"variant": "Dq", "alpha": 2},
    {"variant": "O", "anneal": 0.1},
    {"variant": "Ds", "anneal": 0.5},
]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("config", range(len(PNP_CONFIGS)))
def test_pnp_matches_pml(config, pattern):
    kwargs = PNP_CONFIGS[config]
    assert_parity(losses.PNPLoss(**kwargs), pml_losses.PNPLoss(**kwargs),
                  random_embeddings(seed=50), label_patterns()[pattern])


def test_pnp_in_float32():
    assert_parity(losses.PNPLoss(anneal=0.1), pml_losses.PNPLoss(anneal=0.1),
                  random_embeddings(seed=51, dtype=torch.float32),
                  label_patterns()["four_per_class"], rtol=1e-4, atol=1e-5)


def test_pnp_by_hand():
    """Items 0 and 1 share a label, item 2 not; anneal 1. Query 0: R(0,0) = sig(s02 - 1),
    R(0,1) = sig(s02 - s01); query 1 alike; item 2 has no positive."""
    emb = F.normalize(torch.tensor([[1.0, 0.2], [0.8, 0.6], [0.1, 1.0]], dtype=torch.float64))
    s = emb @ emb.T
    sig = torch.sigmoid
    expected = ((sig(s[0, 2] - 1) + sig(s[0, 2] - s[0, 1])) / 2
                + (sig(s[1, 2] - 1) + sig(s[1, 2] - s[1, 0])) / 2) / 2
    value = losses.PNPLoss(anneal=1.0)(emb, torch.tensor([0, 0, 1]))
    torch.testing.assert_close(value, expected)


def test_pnp_bad_input():
    with pytest.raises(ValueError, match="variant='X'"):
        losses.PNPLoss(variant="X")
    with pytest.raises(ValueError, match="cosine"):
        losses.PNPLoss(distance="euclidean")
    labels = label_patterns()["four_per_class"]
    with pytest.raises(ValueError, match="indices_tuple"):
        losses.PNPLoss()(random_embeddings(), labels, subset_of_triplets(labels))
    with pytest.raises(ValueError, match="ref_emb"):
        losses.PNPLoss()(random_embeddings(), labels, ref_emb=random_embeddings(seed=1),
                         ref_labels=labels)


# --------------------------------------------------------------------------- RankedListLoss

RLL_CONFIGS = [
    ({"margin": 0.4, "Tn": 5}, {}),
    ({"margin": 0.6, "Tn": 2, "imbalance": 0.3, "Tp": 1}, {}),
    ({"margin": 0.2, "Tn": 0, "alpha": 1.0}, {}),
    ({"margin": 2.5, "Tn": 1}, {}),  # alpha - margin < 0: every positive pair counts
    ({"margin": 0.4, "Tn": 3, "reducer": "avg_non_zero"},
     {"reducer": pml_reducers.AvgNonZeroReducer()}),
    ({"margin": 0.4, "Tn": 3, "reducer": "sum"}, {"reducer": pml_reducers.SumReducer()}),
    ({"margin": 1.0, "Tn": 1, "distance": LpDistance(normalize_embeddings=False)},
     {"distance": pml_distances.LpDistance(normalize_embeddings=False)}),
]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("config", range(len(RLL_CONFIGS)))
def test_ranked_list_matches_pml(config, pattern):
    ours_kwargs, pml_extra = RLL_CONFIGS[config]
    pml_kwargs = {k: v for k, v in ours_kwargs.items() if k not in pml_extra and
                  k not in ("reducer", "distance")} | pml_extra
    embeddings = random_embeddings(seed=60)
    if "distance" in ours_kwargs:
        embeddings = 0.4 * embeddings
    assert_parity(losses.RankedListLoss(**ours_kwargs), pml_losses.RankedListLoss(**pml_kwargs),
                  embeddings, label_patterns()[pattern])


def test_ranked_list_by_hand():
    """Points on a line (no normalisation), margin 1, alpha 2: item 0's positive at 1.5
    (> 1: counts 0.5), its negative at 1 (< 2: counts 1); Tp = Tn = 0 (equal weights)."""
    emb = torch.tensor([[0.0], [1.5], [1.0]], dtype=torch.float64)
    loss_fn = losses.RankedListLoss(margin=1.0, Tn=0, alpha=2.0,
                                    distance=LpDistance(normalize_embeddings=False))
    eps = 3 * 1e-5
    per_anchor = [
        0.5 * (0.5 / (1 + eps)) + 0.5 * (1.0 / (1 + eps)),  # 0: pos at 1.5, neg at 1
        0.5 * (0.5 / (1 + eps)) + 0.5 * (1.5 / (1 + eps)),  # 1: pos at 1.5, neg at 0.5
        0.5 * 0.0 + 0.5 * (1.0 + 1.5) / (2 + eps),  # 2: no positive, negs at 1 and 0.5
    ]
    torch.testing.assert_close(loss_fn(emb, torch.tensor([0, 0, 1])).item(),
                               sum(per_anchor) / 3)


def test_ranked_list_bad_settings():
    with pytest.raises(ValueError, match="similarity"):
        losses.RankedListLoss(margin=0.4, Tn=1, distance="cosine")
    with pytest.raises(ValueError, match="imbalance"):
        losses.RankedListLoss(margin=0.4, Tn=1, imbalance=1.5)
    with pytest.warns(UserWarning, match="Tn=6"):
        losses.RankedListLoss(margin=0.4, Tn=6)
    labels = label_patterns()["four_per_class"]
    with pytest.raises(ValueError, match="indices_tuple"):
        losses.RankedListLoss(0.4, 1)(random_embeddings(), labels, subset_of_pairs(labels))
    with pytest.raises(ValueError, match="ref_emb"):
        losses.RankedListLoss(0.4, 1)(random_embeddings(), labels,
                                      ref_emb=random_embeddings(seed=1), ref_labels=labels)


# --------------------------------------------------------------------------- ThresholdConsistent

TCM_CONFIGS = [
    {},
    {"lambda_plus": 0.5, "lambda_minus": 2.0, "margin_plus": 0.3, "margin_minus": -0.1},
]


@pytest.mark.parametrize("mined", list(MINED))
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("config", range(len(TCM_CONFIGS)))
def test_threshold_consistent_margin_matches_pml(config, pattern, mined):
    kwargs = TCM_CONFIGS[config]
    labels = label_patterns()[pattern]
    assert_parity(losses.ThresholdConsistentMarginLoss(**kwargs),
                  pml_losses.ThresholdConsistentMarginLoss(**kwargs),
                  random_embeddings(seed=70), labels, **mined_kwargs(mined, labels))


@pytest.mark.parametrize("mined", ["none", "pairs"])
def test_threshold_consistent_margin_with_a_reference_set(mined):
    """PML on the concatenated batch ``[embeddings; ref_emb]`` with the cross pairs shifted
    into the reference half: what ref_emb should mean (PML's own ref_emb path is wrong)."""
    emb, ref = random_embeddings(seed=71), random_embeddings(n=12, seed=72)
    labels, ref_labels = label_patterns()["four_per_class"], torch.arange(12) % 5
    if mined == "none":
        same = labels[:, None] == ref_labels[None, :]
        a1, p = torch.where(same)
        a2, n = torch.where(~same)
    else:
        a1, p = torch.tensor([0, 1, 5, 9]), torch.tensor([0, 5, 1, 2])
        a2, n = torch.tensor([0, 3, 7]), torch.tensor([1, 2, 11])
    kwargs = {"margin_plus": 0.3, "margin_minus": -0.2}
    ours = losses.ThresholdConsistentMarginLoss(**kwargs)
    theirs = pml_losses.ThresholdConsistentMarginLoss(**kwargs)
    results = []
    e, r = emb.clone().requires_grad_(True), ref.clone().requires_grad_(True)
    tuples = None if mined == "none" else (a1, p, a2, n)
    value = ours(e, labels, tuples, ref_emb=r, ref_labels=ref_labels)
    value.backward()
    results.append((value.detach(), e.grad, r.grad))
    both = torch.cat([emb, ref]).requires_grad_(True)
    value = theirs(both, torch.cat([labels, ref_labels]), (a1, p + 16, a2, n + 16))
    value.backward()
    results.append((value.detach(), both.grad[:16], both.grad[16:]))
    for mine, pml, what in zip(*results, ("value", "grad of embeddings", "grad of ref_emb"),
                               strict=True):
        torch.testing.assert_close(mine, pml, rtol=1e-5, atol=1e-8, msg=what)


def test_threshold_consistent_margin_by_hand():
    """Positive pair at similarity cos(1) (< 0.9), negative pair at cos(0.5) (> 0.5)."""
    emb = torch.tensor([[1.0, 0.0], [math.cos(1.0), math.sin(1.0)],
                        [math.cos(0.5), -math.sin(0.5)]], dtype=torch.float64)
    pairs = (torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([2]))
    value = losses.ThresholdConsistentMarginLoss(lambda_minus=2.0)(emb, torch.tensor([0, 0, 1]),
                                                                   pairs)
    torch.testing.assert_close(value.item(), (0.9 - math.cos(1.0)) + 2 * (math.cos(0.5) - 0.5))


def test_threshold_consistent_margin_without_hard_pairs_is_a_connected_zero():
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.01], [-1.0, 0.0], [-1.0, 0.01]],
                       dtype=torch.float64, requires_grad=True)
    value = losses.ThresholdConsistentMarginLoss()(emb, torch.tensor([0, 0, 1, 1]))
    value.backward()
    assert value.item() == 0 and torch.equal(emb.grad, torch.zeros_like(emb))


def test_threshold_consistent_margin_bad_settings():
    with pytest.raises(ValueError, match="cosine"):
        losses.ThresholdConsistentMarginLoss(distance="euclidean")
