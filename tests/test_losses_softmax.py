"""Softmax losses (NTXent, SupCon, NCA, NPairs): PML's values and gradients, and our edge cases."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
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
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from lightning_metric.losses.infonce import NTXentLoss, SupConLoss, masked_logsumexp
from lightning_metric.losses.neighbourhood import (
    NCALoss,
    NPairsLoss,
    first_pair_per_label,
    first_two_per_label,
)

PATTERNS = label_patterns()
REF_LABELS = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1])

# (id, ours, PML's, supports a reference set)
CASES = [
    ("ntxent", lambda: NTXentLoss(), lambda: pml_losses.NTXentLoss(), True),
    ("ntxent-t0.5-sum", lambda: NTXentLoss(temperature=0.5, reducer="sum"),
     lambda: pml_losses.NTXentLoss(temperature=0.5, reducer=pml_reducers.SumReducer()), True),
    ("ntxent-euclidean", lambda: NTXentLoss(temperature=0.2, distance="euclidean"),
     lambda: pml_losses.NTXentLoss(temperature=0.2, distance=pml_distances.LpDistance()), True),
    ("supcon", lambda: SupConLoss(), lambda: pml_losses.SupConLoss(), True),
    ("supcon-t0.5-mean", lambda: SupConLoss(temperature=0.5, reducer="mean"),
     lambda: pml_losses.SupConLoss(temperature=0.5, reducer=pml_reducers.MeanReducer()), True),
    ("supcon-euclidean", lambda: SupConLoss(distance="euclidean"),
     lambda: pml_losses.SupConLoss(distance=pml_distances.LpDistance()), True),
    ("nca", lambda: NCALoss(), lambda: pml_losses.NCALoss(), True),
    ("nca-scale4-cosine", lambda: NCALoss(softmax_scale=4, distance="cosine"),
     lambda: pml_losses.NCALoss(softmax_scale=4, distance=pml_distances.CosineSimilarity()),
     True),
    ("nca-avg-non-zero", lambda: NCALoss(softmax_scale=0.5, reducer="avg_non_zero"),
     lambda: pml_losses.NCALoss(softmax_scale=0.5, reducer=pml_reducers.AvgNonZeroReducer()),
     True),
    ("npairs", lambda: NPairsLoss(), lambda: pml_losses.NPairsLoss(), False),
    ("npairs-euclidean", lambda: NPairsLoss(distance="euclidean", reducer="sum"),
     lambda: pml_losses.NPairsLoss(
         distance=pml_distances.LpDistance(), reducer=pml_reducers.SumReducer()), False),
]
CASE_IDS = [case[0] for case in CASES]

# PML returns NaN here (NCA: the mean of no row at all); we return a connected 0.
PML_NAN = {("nca", "no_positive_pair"), ("nca-scale4-cosine", "no_positive_pair"),
           ("nca-avg-non-zero", "no_positive_pair")}


def ref_pairs(labels, ref_labels, seed=0, keep=0.5):
    """A fixed random subset of the (query, reference) pairs."""
    pos = labels[:, None] == ref_labels[None, :]
    generator = torch.Generator().manual_seed(seed)
    a1, p = torch.where(pos & (torch.rand(pos.shape, generator=generator) < keep))
    a2, n = torch.where(~pos & (torch.rand(pos.shape, generator=generator) < keep))
    return a1, p, a2, n


def ref_triplets(labels, ref_labels, seed=0, keep=0.3):
    pos = labels[:, None] == ref_labels[None, :]
    a, p, n = torch.where(pos[:, :, None] & ~pos[:, None, :])
    chosen = torch.rand(len(a), generator=torch.Generator().manual_seed(seed)) < keep
    return a[chosen], p[chosen], n[chosen]


def make_tuple(kind, labels, ref_labels=None):
    if kind == "none":
        return None
    if ref_labels is None:
        return subset_of_pairs(labels) if kind == "pairs" else subset_of_triplets(labels)
    return ref_pairs(labels, ref_labels) if kind == "pairs" else ref_triplets(labels, ref_labels)


def assert_connected_zero(loss_fn, embeddings, labels, **kwargs):
    value, grads = value_and_grad(loss_fn, embeddings, labels, **kwargs)
    assert value.item() == 0
    for grad in grads:
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("indices", ["none", "pairs", "triplets"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize(("case", "ours", "theirs", "with_ref"), CASES, ids=CASE_IDS)
def test_parity_with_pml(case, ours, theirs, with_ref, pattern, indices):
    labels = PATTERNS[pattern]
    embeddings = random_embeddings(seed=1)
    kwargs = {"indices_tuple": make_tuple(indices, labels)}
    their_value, _ = value_and_grad(theirs(), embeddings, labels, **kwargs)
    if torch.isnan(their_value):
        assert (case, pattern) in PML_NAN, "PML gave NaN on a case not documented here"
        assert_connected_zero(ours(), embeddings, labels, **kwargs)
        return
    assert_parity(ours(), theirs(), embeddings, labels, **kwargs)


@pytest.mark.parametrize("indices", ["none", "pairs", "triplets"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize(
    ("case", "ours", "theirs"), [c[:3] for c in CASES if c[3]], ids=[c[0] for c in CASES if c[3]]
)
def test_parity_with_pml_against_a_reference_set(case, ours, theirs, pattern, indices):
    labels = PATTERNS[pattern]
    embeddings, ref_emb = random_embeddings(seed=2), random_embeddings(12, seed=3)
    kwargs = {"ref_emb": ref_emb, "ref_labels": REF_LABELS,
              "indices_tuple": make_tuple(indices, labels, REF_LABELS)}
    assert_parity(ours(), theirs(), embeddings, labels, **kwargs)


@pytest.mark.parametrize("indices", ["pairs", "triplets"])
@pytest.mark.parametrize(
    ("ours", "theirs"),
    [(NTXentLoss, pml_losses.NTXentLoss), (SupConLoss, pml_losses.SupConLoss)],
    ids=["ntxent", "supcon"],
)
def test_indices_tuple_without_labels(ours, theirs, indices):
    tuple_ = make_tuple(indices, PATTERNS["four_per_class"])
    assert_parity(ours(), theirs(), random_embeddings(seed=4), None, indices_tuple=tuple_)


# ---- NTXent -------------------------------------------------------------------------------


def test_ntxent_by_hand():
    """Two views of two images: each positive pair against its anchor's two negatives."""
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [-0.6, 0.8]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1])
    t = 0.5
    sim = F.normalize(emb, dim=1) @ F.normalize(emb, dim=1).T / t
    losses = []
    for i, j in [(0, 2), (1, 3), (2, 0), (3, 1)]:
        negatives = [k for k in range(4) if labels[k] != labels[i]]
        denominator = math.exp(sim[i, j]) + sum(math.exp(sim[i, k]) for k in negatives)
        losses.append(-math.log(math.exp(sim[i, j]) / denominator))
    ours = NTXentLoss(temperature=t)(emb, labels)
    assert ours.item() == pytest.approx(sum(losses) / 4, rel=1e-12)


def test_ntxent_counts_repeated_negative_pairs_and_anchors_without_negatives():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    # anchor 0: negative 2 twice; anchor 4 has positive pairs but no negative pair (loss 0).
    pairs = (torch.tensor([0, 0, 2, 4, 4]), torch.tensor([1, 1, 3, 5, 5]),
             torch.tensor([0, 0, 0, 2, 2]), torch.tensor([2, 2, 3, 0, 5]))
    embeddings = random_embeddings(6, seed=4)
    assert_parity(NTXentLoss(), pml_losses.NTXentLoss(), embeddings, labels, indices_tuple=pairs)
    assert_parity(NTXentLoss(reducer="avg_non_zero"),
                  pml_losses.NTXentLoss(reducer=pml_reducers.AvgNonZeroReducer()),
                  embeddings, labels, indices_tuple=pairs)


def test_single_pair_and_single_negative_give_zero_as_in_pml():
    """PML's pair losses return 0 when every index list has at most one entry."""
    labels = torch.tensor([0, 0, 1])
    triplet = (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
    embeddings = random_embeddings(3)
    for ours, theirs in [(NTXentLoss(), pml_losses.NTXentLoss()),
                         (SupConLoss(), pml_losses.SupConLoss())]:
        assert_parity(ours, theirs, embeddings, labels, indices_tuple=triplet)
        assert_connected_zero(ours, embeddings, labels, indices_tuple=triplet)


def test_ntxent_large_logits_stay_finite():
    """Unnormalised dot products of size 1e3 over t=0.07: no overflow, and no 87-nat cap."""
    embeddings = (random_embeddings(16, seed=5) * 30).float()
    loss_fn = NTXentLoss(distance="dot", normalize_embeddings=False)
    value, grads = value_and_grad(loss_fn, embeddings, PATTERNS["four_per_class"])
    assert torch.isfinite(value) and value > 100
    assert torch.isfinite(grads[0]).all()


# ---- SupCon -------------------------------------------------------------------------------


def test_supcon_by_hand():
    emb = random_embeddings(6, 3, seed=6)
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    t = 0.1
    sim = F.normalize(emb, dim=1) @ F.normalize(emb, dim=1).T / t
    per_anchor = []
    for i in range(6):
        candidates = [k for k in range(6) if k != i]
        positives = [j for j in candidates if labels[j] == labels[i]]
        if not positives:
            continue
        log_z = torch.logsumexp(sim[i, candidates], dim=0)
        per_anchor.append(sum(log_z - sim[i, j] for j in positives) / len(positives))
    expected = torch.stack(per_anchor).mean()
    assert SupConLoss(temperature=t)(emb, labels).item() == pytest.approx(expected.item(), 1e-12)


def test_supcon_rejects_a_pair_that_is_both_positive_and_negative():
    pairs = (torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([0, 0]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="both positive and negative"):
        SupConLoss()(random_embeddings(3), torch.tensor([0, 0, 1]), indices_tuple=pairs)


# ---- NCA ----------------------------------------------------------------------------------


def test_nca_by_hand():
    emb = random_embeddings(5, 3, seed=7)
    labels = torch.tensor([0, 0, 1, 1, 2])
    sq = torch.cdist(F.normalize(emb, dim=1), F.normalize(emb, dim=1)) ** 2
    losses = []
    for i in range(5):
        others = [k for k in range(5) if k != i]
        prob = torch.softmax(-sq[i, others], dim=0)
        p_same = sum(prob[m] for m, k in enumerate(others) if labels[k] == labels[i])
        if p_same != 0:
            losses.append(-torch.log(p_same))
    assert NCALoss()(emb, labels).item() == pytest.approx(torch.stack(losses).mean().item(), 1e-12)


def test_nca_underflowing_rows_are_recomputed_in_log_space():
    """Positives 200 nats less likely than a negative: float32's softmax mass is 0.

    PML drops such rows in float32; we keep their (large) loss and gradient, equal to
    the float64 value, where PML agrees with us.
    """
    angles = torch.tensor([0.0, 10.0, 180.0, 190.0]) * torch.pi / 180
    emb = torch.stack([angles.cos(), angles.sin()], dim=1).double()
    labels = torch.tensor([0, 1, 0, 1])
    loss_fn = NCALoss(softmax_scale=50)
    value64, grads64 = value_and_grad(loss_fn, emb, labels)
    assert value64 > 150
    assert_parity(loss_fn, pml_losses.NCALoss(softmax_scale=50), emb, labels)
    value32, grads32 = value_and_grad(loss_fn, emb.float(), labels)
    torch.testing.assert_close(value32.double(), value64, rtol=1e-5, atol=0)
    torch.testing.assert_close(grads32[0].double(), grads64[0], rtol=1e-4, atol=1e-4)


def test_nca_needs_labels():
    with pytest.raises(ValueError, match="labels"):
        NCALoss()(random_embeddings(4), None, indices_tuple=subset_of_triplets(torch.arange(4)))


# ---- NPairs -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_first_pair_per_label_matches_numpy_unique(seed):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 6, (30,), generator=generator)
    anchors = torch.randint(0, 30, (50,), generator=generator)
    positives = torch.randint(0, 30, (50,), generator=generator)
    _, first = np.unique(labels[anchors].numpy(), return_index=True)
    ours = first_pair_per_label(anchors, positives, labels)
    assert torch.equal(ours[0], anchors[first]) and torch.equal(ours[1], positives[first])


def test_npairs_by_hand():
    emb = random_embeddings(6, 4, seed=8)
    labels = torch.tensor([5, 3, 5, 3, 9, 9])
    # First positive pair of labels 3, 5, 9 (row-major order): (1, 3), (0, 2), (4, 5).
    anchors, positives = torch.tensor([1, 0, 4]), torch.tensor([3, 2, 5])
    unit = F.normalize(emb, dim=1)
    logits = unit[anchors] @ unit[positives].T
    expected = F.cross_entropy(logits, torch.arange(3))
    assert NPairsLoss()(emb, labels).item() == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("loss_class", [NPairsLoss, NCALoss])
def test_labels_are_required(loss_class):
    triplets = (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
    with pytest.raises(ValueError, match="labels"):
        loss_class()(random_embeddings(4), None, indices_tuple=triplets)


def test_npairs_rejects_a_reference_set():
    with pytest.raises(ValueError, match="ref_emb"):
        NPairsLoss()(random_embeddings(4), torch.tensor([0, 0, 1, 1]),
                     ref_emb=random_embeddings(3), ref_labels=torch.tensor([0, 1, 1]))


# ---- Shared behaviour ---------------------------------------------------------------------

ALL = [NTXentLoss, SupConLoss, NCALoss, NPairsLoss]


@pytest.mark.parametrize("pattern", ["no_positive_pair", "single_class"])
@pytest.mark.parametrize("loss_class", ALL)
def test_nothing_to_learn_gives_a_connected_zero(loss_class, pattern):
    if loss_class is NCALoss and pattern == "single_class":
        # Every neighbour is a positive: -log(1), zero through the formula itself.
        value, grads = value_and_grad(NCALoss(), random_embeddings(), PATTERNS[pattern])
        assert abs(value.item()) < 1e-12 and grads[0].abs().max() < 1e-12
        return
    assert_connected_zero(loss_class(), random_embeddings(), PATTERNS[pattern])


def test_masked_logsumexp_empty_rows_and_counts():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 5.0, 1.0]], requires_grad=True)
    counts = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    lse = masked_logsumexp(logits, counts)
    assert lse[0].item() == pytest.approx(math.log(2 * math.e + math.e**3))
    assert lse[1].item() == float("-inf")
    lse[0].backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[1].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss_class", ALL)
def test_half_precision_is_finite(loss_class, dtype):
    value, grads = value_and_grad(
        loss_class(), random_embeddings(dtype=dtype), PATTERNS["four_per_class"]
    )
    assert torch.isfinite(value) and value > 0
    assert grads[0].dtype == dtype and torch.isfinite(grads[0]).all()


@pytest.mark.parametrize("loss_class", ALL)
def test_autocast_bfloat16_encoder(loss_class):
    torch.manual_seed(0)
    encoder = torch.nn.Linear(8, 16)
    inputs = torch.randn(16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_class()(encoder(inputs), PATTERNS["four_per_class"])
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in encoder.parameters())


@pytest.mark.parametrize("loss_class", ALL)
def test_distance_by_name_and_repr(loss_class):
    loss_fn = loss_class(distance="cosine")
    assert loss_fn.distance.is_inverted
    assert loss_class.__name__ in repr(loss_fn)



@pytest.mark.parametrize("seed", range(5))
def test_first_two_per_label_are_pmls_npairs_pairs(seed):
    labels = torch.randint(0, 8, (24,), generator=torch.Generator().manual_seed(seed))
    ours = first_two_per_label(labels)
    theirs = lmu.convert_to_pos_pairs_with_unique_labels(None, labels)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


@pytest.mark.parametrize("kind", ["all", "mask", "counts"])
def test_masked_logsumexp_gradcheck(kind):
    generator = torch.Generator().manual_seed(9)
    logits = torch.randn(5, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    weights = {
        "all": None,
        "mask": torch.rand(5, 7, generator=generator) < 0.5,
        "counts": torch.randint(0, 3, (5, 7), generator=generator).double(),
    }[kind]
    if weights is not None:
        weights[1] = 0  # an empty row: -inf, gradient 0
        weights[2, 3] = 1
    lse = masked_logsumexp(logits, weights)
    reference = torch.logsumexp(logits.detach() + (
        0 if weights is None else weights.double().log()), dim=1)
    torch.testing.assert_close(lse.detach(), reference)
    finite = torch.isfinite(lse)
    torch.autograd.gradcheck(lambda x: masked_logsumexp(x, weights)[finite], (logits,))
