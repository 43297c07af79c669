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


@pytest.mark.parametrize(("make", "group"), [
    (lambda **ranks: ClassBalancedBatchSampler(LABELS, 16, 4, length=10, seed=3, **ranks), 4),
    (lambda **ranks: RandomBatchSampler(80, 8, seed=3, **ranks), 1),
])
def test_ranks_share_each_global_batch(make, group):
    """batch_size is the global batch: at every step the ranks' parts are disjoint and
    together are the single-process batch; every rank has as many batches as one process."""
    single = list(make())
    rank0, rank1 = list(make(num_replicas=2, rank=0)), list(make(num_replicas=2, rank=1))
    assert len(rank0) == len(rank1) == len(single) == len(make(num_replicas=2, rank=1))
    for whole, part0, part1 in zip(single, rank0, rank1, strict=True):
        assert not set(part0) & set(part1)
        assert sorted(part0 + part1) == sorted(whole)
        assert len(part0) == len(part1) == len(whole) // 2


def test_each_ranks_class_balanced_batch_is_class_balanced_and_the_union_too():
    labels = torch.arange(12).repeat_interleave(8)          # 12 classes x 8 items
    for rank in range(3):
        sampler = ClassBalancedBatchSampler(labels, 24, 4, seed=1, num_replicas=3, rank=rank)
        for batch in sampler:
            counts = torch.bincount(labels[batch], minlength=12)
            assert sorted(counts[counts > 0].tolist()) == [4, 4]   # 2 classes x 4 items
    steps = zip(*(ClassBalancedBatchSampler(labels, 24, 4, seed=1, num_replicas=3, rank=r)
                  for r in range(3)), strict=True)
    for parts in steps:
        union = labels[sum(parts, [])]
        assert sorted(torch.bincount(union)[torch.bincount(union) > 0].tolist()) == [4] * 6


def test_random_batches_of_the_two_ranks_are_disjoint_over_an_epoch():
    rank0 = sum(RandomBatchSampler(101, 10, num_replicas=2, rank=0), [])
    rank1 = sum(RandomBatchSampler(101, 10, num_replicas=2, rank=1), [])
    assert not set(rank0) & set(rank1)
    assert sorted(rank0 + rank1) == list(range(101))      # nothing dropped


def test_a_last_batch_too_small_to_share_joins_the_one_before():
    batches = list(RandomBatchSampler(21, 10, num_replicas=2, rank=0))   # 10, 10, 1
    assert [len(b) for b in batches] == [5, 6]
    assert len(RandomBatchSampler(21, 10, num_replicas=2, rank=0)) == 2
    assert len(RandomBatchSampler(21, 10)) == 3             # one process: 10, 10, 1


def test_ranks_default_to_the_process_group(monkeypatch):
    import lightning_metric.samplers as samplers_module

    monkeypatch.setattr(samplers_module, "is_initialized", lambda: True)
    monkeypatch.setattr(samplers_module.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(samplers_module.dist, "get_rank", lambda: 1)
    sampler = RandomBatchSampler(40, 8, seed=5)
    assert (sampler.num_replicas, sampler.rank) == (2, 1)
    assert list(sampler) == list(RandomBatchSampler(40, 8, seed=5, num_replicas=2, rank=1))


@pytest.mark.parametrize(("make", "message"), [
    (lambda: ClassBalancedBatchSampler(LABELS, 8, 4, num_replicas=4, rank=0),
     "2 classes per batch cannot be shared by 4 devices"),
    (lambda: RandomBatchSampler(40, 3, num_replicas=4, rank=0),
     "batches of 3 items cannot be shared by 4 devices"),
])
def test_a_batch_too_small_for_the_devices_is_refused(make, message):
    with pytest.raises(ValueError, match=message):
        list(make())


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
        ({"batch_size": 8, "m_per_class": 4, "rank": 0}, "pass both num_replicas and rank"),
    ],
)
def test_bad_settings_name_the_setting(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClassBalancedBatchSampler(LABELS, **kwargs)
