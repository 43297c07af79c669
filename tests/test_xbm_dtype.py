"""CrossBatchMemory keeps the embeddings' dtype: float64 bit for bit, half as float32."""

from __future__ import annotations

import copy
import io

import torch
from helpers import random_embeddings
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

from lightning_metric import losses, miners
from lightning_metric.module import buffers_restored

LABELS = torch.tensor([0, 0, 1, 1])


def _pairs(indices_tuple):
    a1, p, a2, n = (t.tolist() for t in indices_tuple)
    return sorted(zip(a1, p, strict=True)), sorted(zip(a2, n, strict=True))


def test_the_issues_case_float64_memory_and_pml_pairs():
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    xbm = losses.CrossBatchMemory(losses.ContrastiveLoss(), embedding_size=3, memory_size=8)
    value = xbm(x, LABELS)
    assert xbm.embedding_memory.dtype == torch.float64
    assert torch.equal(xbm.embedding_memory[:4], x)  # bit for bit

    theirs = pml_losses.CrossBatchMemory(pml_losses.ContrastiveLoss(), embedding_size=3,
                                         memory_size=8)
    torch.testing.assert_close(value, theirs(x, LABELS), rtol=1e-12, atol=0)
    ours_mined = miners.PairMarginMiner(pos_margin=0, neg_margin=1)(
        x, LABELS, xbm.embedding_memory, xbm.label_memory)
    pml_mined = pml_miners.PairMarginMiner(pos_margin=0, neg_margin=1)(
        x, LABELS, theirs.embedding_memory, theirs.label_memory)
    assert len(ours_mined[0]) == 12
    assert _pairs(ours_mined) == _pairs(pml_mined)


def test_float32_stays_float32_and_switches_on_the_first_float64_batch():
    xbm = losses.CrossBatchMemory(losses.ContrastiveLoss(), 8, memory_size=32)
    first = random_embeddings(8, 8, seed=1, dtype=torch.float32)
    xbm(first, torch.arange(8) % 2)
    assert xbm.embedding_memory.dtype == torch.float32
    buffer = xbm.embedding_memory
    second = random_embeddings(8, 8, seed=2)
    xbm(second, torch.arange(8) % 2)
    assert xbm.embedding_memory is buffer and buffer.dtype == torch.float64  # same object
    assert torch.equal(buffer[:8], first.double()) and torch.equal(buffer[8:16], second)


def test_half_precision_is_stored_as_float32():
    xbm = losses.CrossBatchMemory(losses.ContrastiveLoss(), 8, memory_size=32)
    for dtype in (torch.float16, torch.bfloat16):
        x = random_embeddings(8, 8, seed=3, dtype=dtype)
        xbm(x, torch.arange(8) % 2)
        assert xbm.embedding_memory.dtype == torch.float32
    assert torch.equal(xbm.embedding_memory[8:16], x.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        encoder = torch.nn.Linear(8, 8)
        out = encoder(random_embeddings(8, 8, seed=4, dtype=torch.float32))
        assert out.dtype == torch.bfloat16
        xbm(out, torch.arange(8) % 2)
    assert xbm.embedding_memory.dtype == torch.float32


def test_state_dict_keeps_the_dtype_into_a_fresh_float32_module():
    xbm = losses.CrossBatchMemory(losses.ContrastiveLoss(), 8, memory_size=16)
    x = random_embeddings(12, 8, seed=5)
    xbm(x, torch.arange(12) % 3)
    buffer = io.BytesIO()
    torch.save(xbm.state_dict(), buffer)
    buffer.seek(0)
    fresh = losses.CrossBatchMemory(losses.ContrastiveLoss(), 8, memory_size=16)
    assert fresh.embedding_memory.dtype == torch.float32
    fresh.load_state_dict(torch.load(buffer))
    assert fresh.embedding_memory.dtype == torch.float64
    assert torch.equal(fresh.embedding_memory, xbm.embedding_memory)
    assert int(fresh.queue_idx) == 12
    batch = random_embeddings(4, 8, seed=6)
    assert torch.equal(fresh(batch, torch.arange(4) % 3), xbm(batch, torch.arange(4) % 3))


def test_evaluation_leaves_the_memory_bit_identical_dtype_included():
    """A float32 memory evaluated on float64 embeddings: the value of a training step
    (memory switched to float64), the buffers untouched."""
    xbm = losses.CrossBatchMemory(losses.TripletMarginLoss(), 8, memory_size=24,
                                  miner=miners.BatchEasyHardMiner())
    xbm(random_embeddings(16, 8, seed=7, dtype=torch.float32), torch.arange(16) % 4)
    before = {name: b.clone() for name, b in xbm.named_buffers()}
    batch, labels = random_embeddings(16, 8, seed=8), torch.arange(16) % 4
    expected = copy.deepcopy(xbm)(batch, labels)  # training mode; wraps around the end
    xbm.eval()
    with buffers_restored(xbm):
        value = xbm(batch, labels)
    for name, buffer in xbm.named_buffers():
        assert buffer.dtype == before[name].dtype and torch.equal(buffer, before[name]), name
    assert torch.equal(value, expected)
    assert value.dtype == torch.float64
