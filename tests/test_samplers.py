"""Samplers: batch composition, epoch coverage, reproducibility, DDP sharding, bad settings."""

import pytest
import torch

from lightning_metric.samplers import ClassBalancedBatchSampler, RandomBatchSampler

LABELS = torch.arange(10).repeat_interleave(8)  # 10 classes x 8 items


def test_every_batch_holds_p_classes_of_k_items():
    sampler = ClassBalancedBatchSampler(LABELS, batch_size=16, m_per_class=4)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 80 // 16
    for batch in batches:
        counts = torch.bincount(LABELS[batch], minlength=10)
        assert sorted(counts[counts > 0].tolist()) == [4, 4, 4, 4]


def test_an_epoch_covers_every_item_once_when_class_sizes_allow():
    seen = torch.cat([torch.tensor(b) for b in ClassBalancedBatchSampler(LABELS, 20, 4)])
    assert sorted(seen.tolist()) == list(range(80))


def test_small_classes_are_filled_with_replacement():
    labels = torch.tensor([0, 0, 0, 0, 1, 2, 2, 2, 2, 2, 2, 2, 2])
    for batch in ClassBalancedBatchSampler(labels, batch_size=8, m_per_class=4, length=20):
        counts = torch.bincount(labels[batch], minlength=3)
        assert sorted(counts[counts > 0].tolist()) == [4, 4]


def test_same_seed_and_epoch_give_the_same_batches_and_epochs_differ():
    first = ClassBalancedBatchSampler(LABELS, 16, 4, seed=3)
    second = ClassBalancedBatchSampler(LABELS, 16, 4, seed=3)
    torch.manual_seed(0)  # the global generator must not matter
    epoch0 = list(first)
    torch.manual_seed(1)
    assert list(second) == epoch0
    first.set_epoch(1)
    assert list(first) != epoch0


def test_length_sets_the_number_of_batches():
    sampler = ClassBalancedBatchSampler(LABELS, 16, 4, length=37)
    assert len(sampler) == 37 and len(list(sampler)) == 37


@pytest.mark.parametrize("make", [
    lambda rank: ClassBalancedBatchSampler(LABELS, 8, 4, num_replicas=2, rank=rank, length=10),
    lambda rank: RandomBatchSampler(80, 8, num_replicas=2, rank=rank),
])
def test_ranks_get_different_batches(make):
    rank0, rank1 = list(make(0)), list(make(1))
    assert len(rank0) == len(rank1) == 5
    assert not {tuple(b) for b in rank0} & {tuple(b) for b in rank1}


def test_random_sampler_is_a_permutation():
    batches = list(RandomBatchSampler(10, 4))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(sum(batches, [])) == list(range(10))
    assert [len(b) for b in RandomBatchSampler(10, 4, drop_last=True)] == [4, 4]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 10, "m_per_class": 4}, r"batch_size \(10\).*m_per_class \(4\)"),
        ({"batch_size": 48, "m_per_class": 4}, "12 classes per batch.*only 10 classes"),
        ({"batch_size": 8, "m_per_class": 4, "length": 0}, "length"),
        ({"batch_size": 8, "m_per_class": 4, "rank": 2, "num_replicas": 2}, "rank"),
    ],
)
def test_bad_settings_name_the_setting(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClassBalancedBatchSampler(LABELS, **kwargs)
