"""Batched fetching of in-memory items gives exactly what item-by-item loading gives."""

import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset, default_collate

from lightning_metric.data.in_memory import TensorBatches, batched_view, collate_batches


def _data():
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(50, 1, 4, 4, generator=generator), torch.arange(50) % 7)


@pytest.mark.parametrize("with_index", [False, True])
def test_batches_equal_default_collate_of_the_items_through_nested_subsets(with_index):
    dataset = Subset(Subset(_data(), list(range(10, 50))), [5, 3, 7, 1, 0, 2, 30])
    view = batched_view(dataset, with_index=with_index)
    assert isinstance(view, TensorBatches) and len(view) == 7
    sampler = [[6, 0, 2], [1, 5], [4, 3]]
    got = list(DataLoader(view, batch_sampler=sampler, collate_fn=collate_batches))
    for batch, positions in zip(got, sampler, strict=True):
        items = [(*dataset[i], torch.tensor(i)) if with_index else dataset[i] for i in positions]
        expected = default_collate(items)
        assert len(batch) == len(expected)
        assert all(torch.equal(a, b) for a, b in zip(batch, expected, strict=True))


def test_single_items_and_other_datasets():
    view = batched_view(_data())
    x, label = view[3]
    assert torch.equal(x, _data().tensors[0][3]) and int(label) == 3
    assert batched_view([1, 2, 3]) is None   # not tensors: the usual item-by-item path
    assert collate_batches([(torch.tensor(1), 2), (torch.tensor(3), 4)])[1].tolist() == [2, 4]
