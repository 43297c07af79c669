"""FastAPLoss: PML's values and gradients, the sparse soft histogram, and edge cases."""

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

from lightning_metric.distances import CosineSimilarity, LpDistance
from lightning_metric.losses.ranking import FastAPLoss, soft_histograms

PATTERNS = label_patterns()

CASES = [
    ("default", lambda: FastAPLoss(), lambda: pml_losses.FastAPLoss()),
    ("bins5", lambda: FastAPLoss(num_bins=5), lambda: pml_losses.FastAPLoss(num_bins=5)),
    ("bins40-power1", lambda: FastAPLoss(num_bins=40, distance="euclidean"),
     lambda: pml_losses.FastAPLoss(num_bins=40, distance=pml_distances.LpDistance())),
    ("bins3-sum", lambda: FastAPLoss(num_bins=3, reducer="sum"),
     lambda: pml_losses.FastAPLoss(num_bins=3, reducer=pml_reducers.SumReducer())),
]


def make_tuple(kind, labels):
    if kind == "none":
        return None
    return subset_of_pairs(labels) if kind == "pairs" else subset_of_triplets(labels)


@pytest.mark.parametrize("indices", ["none", "pairs", "triplets"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize(("case", "ours", "theirs"), CASES, ids=[c[0] for c in CASES])
def test_parity_with_pml(case, ours, theirs, pattern, indices):
    labels = PATTERNS[pattern]
    indices_tuple = make_tuple(indices, labels)
    assert_parity(ours(), theirs(), random_embeddings(seed=1), labels,
                  indices_tuple=indices_tuple)


def test_parity_on_a_larger_batch():
    labels = torch.arange(16).repeat_interleave(4)
    assert_parity(FastAPLoss(), pml_losses.FastAPLoss(), random_embeddings(64, 16, seed=2), labels)


def dense_histogram(dist, mask, num_bins, max_value):
    """The (num_bins + 1, N, M) pulse tensor of the paper, summed over the mask."""
    delta = max_value / num_bins
    centres = torch.linspace(0, max_value, num_bins + 1, dtype=dist.dtype).view(-1, 1, 1)
    pulse = F.relu(1 - (dist - centres).abs() / delta)
    return (pulse * mask).sum(dim=2).T


@pytest.mark.parametrize("num_bins", [1, 4, 10])
def test_soft_histogram_matches_the_dense_pulse_tensor(num_bins):
    """Values and gradients, including entries on bin centres, at 0 and beyond the range."""
    generator = torch.Generator().manual_seed(0)
    dist = torch.rand(6, 9, generator=generator, dtype=torch.float64) * 4.5
    dist[0, :4] = torch.tensor([0.0, 4.0, 2.0, 4.0 / num_bins], dtype=torch.float64)
    draw = torch.rand(6, 9, generator=generator)
    masks = [draw < 0.4, draw > 0.6]  # disjoint, and some entries in neither
    weights = torch.rand(2, 6, num_bins + 1, generator=generator, dtype=torch.float64)
    results = []
    for fn in (lambda d: soft_histograms(d, masks, num_bins, 4.0),
               lambda d: [dense_histogram(d, mask, num_bins, 4.0) for mask in masks]):
        leaf = dist.clone().requires_grad_(True)
        hist = torch.stack(fn(leaf))
        (hist * weights).sum().backward()
        results.append((hist.detach(), leaf.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-12, atol=1e-12)


def test_fastap_by_hand():
    """Three items: query 0's positive is nearer than its negative, AP = 1 in the limit."""
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    # Squared distances 0 (positive, bin 0) and 4 (negative, last bin): every query with a
    # positive ranks it first, so AP = 1 and the loss is 0.
    assert FastAPLoss()(emb, labels).item() == pytest.approx(0.0, abs=1e-12)
    # Swap: the negative is at 0, the positive at 4: precision of the positive's bin is 1/2.
    emb = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    assert FastAPLoss()(emb, labels).item() == pytest.approx(0.5, abs=1e-12)


def test_no_positive_gives_a_connected_zero():
    value, grads = value_and_grad(FastAPLoss(), random_embeddings(), PATTERNS["no_positive_pair"])
    assert value.item() == 0 and torch.equal(grads[0], torch.zeros_like(grads[0]))


def test_no_negative_gives_zero_through_the_formula():
    """Every other item is relevant: AP = 1 in every bin, loss 0 and no gradient."""
    value, grads = value_and_grad(FastAPLoss(), random_embeddings(), PATTERNS["single_class"])
    assert abs(value.item()) < 1e-12 and grads[0].abs().max() < 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_finite(dtype):
    value, grads = value_and_grad(
        FastAPLoss(), random_embeddings(dtype=dtype), PATTERNS["four_per_class"]
    )
    assert torch.isfinite(value) and value > 0
    assert grads[0].dtype == dtype and torch.isfinite(grads[0]).all()


def test_autocast_bfloat16_encoder():
    torch.manual_seed(0)
    encoder = torch.nn.Linear(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = FastAPLoss()(encoder(torch.randn(16, 8)), PATTERNS["four_per_class"])
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in encoder.parameters())


@pytest.mark.parametrize(
    "distance",
    [CosineSimilarity(), LpDistance(p=1), LpDistance(normalize_embeddings=False), "dot"],
)
def test_requires_a_normalised_euclidean_distance(distance):
    with pytest.raises(ValueError, match="normalised Euclidean"):
        FastAPLoss(distance=distance)


def test_rejects_a_reference_set_and_missing_labels():
    emb, labels = random_embeddings(4), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="ref_emb"):
        FastAPLoss()(emb, labels, ref_emb=random_embeddings(3), ref_labels=labels[:3])
    triplets = (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
    with pytest.raises(ValueError, match="labels"):
        FastAPLoss()(emb, None, indices_tuple=triplets)


def test_repr_and_distance_by_name():
    loss_fn = FastAPLoss(num_bins=7, distance="euclidean")
    assert "num_bins=7" in repr(loss_fn) and loss_fn.distance.power == 1
