"""CrossBatchMemory in eval mode: the value of a training step, the memory left untouched."""

import copy

import pytest
import torch
from helpers import random_embeddings

from lightning_metric import losses, miners
from lightning_metric.indices import all_pairs

LABELS = torch.arange(4).repeat_interleave(4)


def _buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: buffer.clone() for name, buffer in module.named_buffers()}


def _assert_bit_identical(before: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
    after = dict(module.named_buffers())
    assert before.keys() == after.keys()
    for name, buffer in before.items():
        assert after[name].dtype == buffer.dtype and torch.equal(after[name], buffer), name


def test_eval_mode_does_not_enqueue():
    """The brief's case: 40 validation items used to move queue_idx from 0 to 40."""
    xbm = losses.CrossBatchMemory(losses.ContrastiveLoss(), 8, 256).eval()
    before = _buffers(xbm)
    xbm(random_embeddings(40, 8, dtype=torch.float32), torch.arange(40) % 5)
    _assert_bit_identical(before, xbm)
    assert int(xbm.queue_idx) == 0 and not bool(xbm.has_been_filled)


XBM_CASES = {
    "contrastive": lambda: losses.CrossBatchMemory(losses.ContrastiveLoss(), 8, memory_size=40),
    "easy_hard_miner": lambda: losses.CrossBatchMemory(
        losses.TripletMarginLoss(margin=0.3), 8, memory_size=40,
        miner=miners.BatchEasyHardMiner()),
    "multi_similarity_miner": lambda: losses.CrossBatchMemory(
        losses.MultiSimilarityLoss(), 8, memory_size=40,
        miner=miners.MultiSimilarityMiner(epsilon=0.5)),
}


# Training batches before the evaluation call: none (empty memory), two (16 + 16 of 40 slots:
# the evaluation batch would wrap around the end), three (the memory has wrapped around).
@pytest.mark.parametrize("trained_batches", [0, 2, 3])
@pytest.mark.parametrize("enqueue_mask", [False, True], ids=["all_enqueued", "enqueue_mask"])
@pytest.mark.parametrize("case", list(XBM_CASES))
def test_eval_mode_returns_the_training_value_and_leaves_the_memory(case, enqueue_mask,
                                                                    trained_batches):
    xbm = XBM_CASES[case]()
    for step in range(trained_batches):
        xbm(random_embeddings(16, 8, seed=step, dtype=torch.float32), LABELS.roll(step))
    assert bool(xbm.has_been_filled) == (trained_batches == 3)
    mask = (torch.arange(16) % 2 == 0) if enqueue_mask else None
    batch = random_embeddings(16, 8, seed=9, dtype=torch.float32).requires_grad_(True)
    training_copy = copy.deepcopy(xbm)
    expected = training_copy(batch, LABELS, enqueue_mask=mask)
    assert not torch.equal(training_copy.embedding_memory, xbm.embedding_memory)

    before = _buffers(xbm)
    xbm.eval()
    value = xbm(batch, LABELS, enqueue_mask=mask)
    value_again = xbm(batch, LABELS, enqueue_mask=mask)
    _assert_bit_identical(before, xbm)
    assert torch.equal(value, expected) and torch.equal(value_again, expected)
    value.backward()  # still a loss of the batch: the graph reaches the embeddings
    assert batch.grad is not None and batch.grad.abs().sum() > 0


def test_training_after_evaluation_is_as_if_it_never_happened():
    """Train, evaluate, train again: the same memory and values as training alone."""
    trained, evaluated = XBM_CASES["easy_hard_miner"](), XBM_CASES["easy_hard_miner"]()
    for step in range(4):
        batch = random_embeddings(16, 8, seed=step, dtype=torch.float32)
        expected = trained(batch, LABELS.roll(step))
        evaluated.eval()
        evaluated(random_embeddings(16, 8, seed=100 + step, dtype=torch.float32), LABELS)
        evaluated.train()
        assert torch.equal(evaluated(batch, LABELS.roll(step)), expected)
    _assert_bit_identical(_buffers(trained), evaluated)


def test_an_evaluation_batch_larger_than_the_memory_is_compared_with_memory_and_batch():
    xbm = losses.CrossBatchMemory(losses.ContrastiveLoss(), 8, memory_size=16)
    first = random_embeddings(12, 8, dtype=torch.float32)
    xbm(first, torch.arange(12) % 3)
    before = _buffers(xbm.eval())
    batch, labels = random_embeddings(40, 8, dtype=torch.float32, seed=3), torch.arange(40) % 5
    value = xbm(batch, labels)
    _assert_bit_identical(before, xbm)
    # Expected: the batch against [the 12 stored rows, the batch], its own rows left out.
    reference = torch.cat([first, batch])
    reference_labels = torch.cat([torch.arange(12) % 3, labels])
    a1, p, a2, n = all_pairs(labels, reference_labels, same_set=False)
    keep = p != a1 + 12
    expected = losses.ContrastiveLoss()(batch, labels, (a1[keep], p[keep], a2, n), reference,
                                        reference_labels)
    torch.testing.assert_close(value, expected)
    with pytest.raises(ValueError, match="does not fit memory_size=16"):
        xbm.train()(batch, labels)
