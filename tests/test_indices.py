"""Pair and triplet index utilities: PML's order and sets, without a B^3 tensor."""

import pytest
import torch
from helpers import label_patterns
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from lightning_metric import indices
from lightning_metric._checks import check_indices_tuple, check_inputs

PATTERNS = label_patterns()


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_all_pairs_and_triplets_match_pml(pattern):
    labels = PATTERNS[pattern]
    for ours, theirs in [
        (indices.all_pairs(labels, labels, True), lmu.get_all_pairs_indices(labels)),
        (indices.all_triplets(labels, labels, True), lmu.get_all_triplets_indices(labels)),
    ]:
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a, b.long())


def test_triplets_against_a_reference_set_match_pml():
    labels, ref_labels = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 3, 0])
    ours = indices.all_triplets(labels, ref_labels, same_set=False)
    theirs = lmu.get_all_triplets_indices(labels, ref_labels)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


def test_pairs_to_triplets_matches_pml():
    pairs = (torch.tensor([0, 0, 2]), torch.tensor([1, 3, 3]),
             torch.tensor([0, 2, 2, 1]), torch.tensor([4, 5, 6, 7]))
    ours = indices.to_triplets(pairs, None, None, True)
    theirs = lmu.convert_to_triplets(pairs, None)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


def test_hand_computed_pairs():
    a1, p, a2, n = indices.all_pairs(torch.tensor([7, 7, 9]), torch.tensor([7, 7, 9]), True)
    assert list(zip(a1.tolist(), p.tolist(), strict=True)) == [(0, 1), (1, 0)]
    assert list(zip(a2.tolist(), n.tolist(), strict=True)) == [(0, 2), (1, 2), (2, 0), (2, 1)]


def test_random_triplets_are_valid_and_bounded():
    labels = torch.arange(8).repeat_interleave(4)
    generator = torch.Generator().manual_seed(0)
    a, p, n = indices.random_triplets(labels, labels, True, 5, generator=generator)
    assert len(a) == 32 * 5
    assert torch.all(labels[a] == labels[p]) and torch.all(a != p)
    assert torch.all(labels[a] != labels[n])


def test_random_triplets_skip_anchors_without_positives():
    labels = torch.tensor([0, 1, 1, 2])
    a, _, _ = indices.random_triplets(labels, labels, True, 3)
    assert set(a.tolist()) == {1, 2}


def test_all_triplets_scale_without_cubic_memory():
    labels = torch.arange(512).repeat_interleave(4)  # B = 2048: a B^3 bool tensor is 8.6 GB
    a, p, n = indices.all_triplets(labels, labels, True)
    assert len(a) == 2048 * 3 * 2044


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"embeddings": torch.randn(4)}, "2-D"),
        ({"labels": torch.zeros(3)}, "same length"),
        ({"labels": torch.zeros(4, 1)}, "1-D"),
        ({"ref_emb": torch.randn(5, 2)}, "without ref_labels"),
        ({"ref_emb": torch.randn(5, 3), "ref_labels": torch.zeros(5)}, "embedding size"),
        ({"ref_labels": torch.zeros(5)}, "without ref_emb"),
        ({"labels": None}, "labels are required"),
        ({"embeddings": torch.zeros(4, 2, dtype=torch.long)}, "floating-point"),
    ],
)
def test_bad_inputs_name_the_problem(kwargs, message):
    args = {"embeddings": torch.randn(4, 2), "labels": torch.zeros(4), "ref_emb": None,
            "ref_labels": None, "indices_tuple": None}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        check_inputs(**args)


@pytest.mark.parametrize(
    ("indices_tuple", "message"),
    [
        ((torch.tensor([0]), torch.tensor([1])), "triplets"),
        ((torch.tensor([0, 1]), torch.tensor([1]), torch.tensor([2])), "equal lengths"),
        ((torch.tensor([0]), torch.tensor([1]), torch.tensor([9])), "outside"),
        ((torch.tensor([0.0]), torch.tensor([1]), torch.tensor([2])), "integer"),
    ],
)
def test_bad_indices_tuples_name_the_problem(indices_tuple, message):
    with pytest.raises(ValueError, match=message):
        check_indices_tuple(indices_tuple, 4, 4)
