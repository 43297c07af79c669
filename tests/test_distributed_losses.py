"""In-batch losses across ranks: 2 real CPU processes (gloo) against 1 process on the whole batch.

One spawn runs every case (starting processes is the slow part); each rank writes its
results to a file and the test process compares them with a single-process reference,
in float64: same loss value on every rank, same encoder gradients after DDP's averaging.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_metric.losses import (
    ArcFaceLoss,
    CircleLoss,
    ContrastiveLoss,
    CrossBatchMemory,
    FastAPLoss,
    GeneralizedLiftedStructureLoss,
    LiftedStructureLoss,
    MultiSimilarityLoss,
    NCALoss,
    NTXentLoss,
    SupConLoss,
    TripletMarginLoss,
    TupletMarginLoss,
    pair,
)
from lightning_metric.miners import MultiSimilarityMiner, TripletMarginMiner

WORLD = 2
BATCH = 12
SPLITS = {"even": (6, 6), "uneven": (7, 5)}
TOLERANCE = 1e-5


class _OnGatheredPairs(nn.Module):
    """Both of ContrastiveLoss's terms computed on the gathered pairs' values (the path its
    positives take when they are under an eighth of the matrix; 4 classes of 3 are not)."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, embeddings, labels):
        saved, pair.SPARSE_PAIRS = pair.SPARSE_PAIRS, 1.0
        try:
            return self.loss(embeddings, labels)
        finally:
            pair.SPARSE_PAIRS = saved


CASES = {
    "ntxent": lambda: NTXentLoss(temperature=0.1),
    "ntxent_ms_miner": lambda: NTXentLoss(temperature=0.1, miner=MultiSimilarityMiner(-0.05)),
    "supcon": lambda: SupConLoss(temperature=0.1),
    "supcon_triplet_miner": lambda: SupConLoss(miner=TripletMarginMiner(margin=0.3)),
    "contrastive": lambda: ContrastiveLoss(pos_margin=0.2, neg_margin=1.2),
    "contrastive_sum": lambda: ContrastiveLoss(reducer="sum"),
    "contrastive_mean_lp": lambda: ContrastiveLoss(
        reducer="mean", embedding_regularizer="lp", embedding_reg_weight=0.1
    ),
    "contrastive_gathered_pairs": lambda: _OnGatheredPairs(ContrastiveLoss(pos_margin=0.2)),
    "triplet_all": lambda: TripletMarginLoss(margin=0.2),
    "triplet_swap_mean": lambda: TripletMarginLoss(margin=0.2, swap=True, reducer="mean"),
    "triplet_margin_miner": lambda: TripletMarginLoss(
        margin=0.2, miner=TripletMarginMiner(margin=0.3, type_of_triplets="semihard")
    ),
    "triplet_ms_miner": lambda: TripletMarginLoss(margin=0.2, miner=MultiSimilarityMiner(-0.05)),
    "multi_similarity": lambda: MultiSimilarityLoss(),
    "circle": lambda: CircleLoss(),
    "generalized_lifted": lambda: GeneralizedLiftedStructureLoss(),
    "tuplet_margin": lambda: TupletMarginLoss(),
    # gather_mode "global": the whole gathered batch on every rank
    "lifted": lambda: LiftedStructureLoss(),
    "fastap": lambda: FastAPLoss(),
    "nca": lambda: NCALoss(),
}
XBM_STEPS = 2
ARCFACE_STEPS = 3


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4)).double()


def _batch(step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    inputs = torch.randn(BATCH, 5, generator=generator, dtype=torch.float64)
    labels = torch.arange(4).repeat(3)[torch.randperm(BATCH, generator=generator)]
    return inputs, labels


def _rows(split: tuple[int, ...], rank: int) -> slice:
    start = sum(split[:rank])
    return slice(start, start + split[rank])


def _loss_and_grads(make_loss, inputs, labels, wrap=None) -> dict:
    encoder = _encoder()
    model = encoder if wrap is None else wrap(encoder)
    value = make_loss()(model(inputs), labels)
    value.backward()
    return {"value": value.item(), "grads": [p.grad.clone() for p in encoder.parameters()]}


def _xbm_run(inputs_and_labels, wrap=None) -> dict:
    """``XBM_STEPS`` steps of CrossBatchMemory(ContrastiveLoss); the last step's results."""
    encoder = _encoder()
    model = encoder if wrap is None else wrap(encoder)
    xbm = CrossBatchMemory(ContrastiveLoss(), embedding_size=4, memory_size=64)
    for inputs, labels in inputs_and_labels:
        encoder.zero_grad()
        value = xbm(model(inputs), labels)
        value.backward()
    return {
        "value": value.item(),
        "grads": [p.grad.clone() for p in encoder.parameters()],
        "memory": xbm.embedding_memory.clone(),
        "memory_labels": xbm.label_memory.clone(),
        "queue_idx": int(xbm.queue_idx),
    }


class _EncoderAndLoss(nn.Module):
    """What DDP wraps in MetricLearningModule: the encoder and the loss as submodules."""

    def __init__(self, encoder: nn.Module, loss: nn.Module):
        super().__init__()
        self.encoder, self.loss = encoder, loss

    def forward(self, inputs, labels):
        return self.loss(self.encoder(inputs), labels)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    results: dict = {}

    def ddp(module):
        return DistributedDataParallel(module)

    for split_name, split in SPLITS.items():
        inputs, labels = _batch()
        rows = _rows(split, rank)
        for name, make_loss in CASES.items():
            results[name, split_name] = _loss_and_grads(
                make_loss, inputs[rows], labels[rows], wrap=ddp
            )
        steps = [(x[rows], y[rows]) for x, y in (_batch(step) for step in range(XBM_STEPS))]
        results["xbm", split_name] = _xbm_run(steps, wrap=ddp)

    # A loss that computes the whole batch on every rank refuses a reference set.
    try:
        LiftedStructureLoss(gather_distributed=True)(
            torch.randn(3, 4), torch.arange(3), ref_emb=torch.randn(5, 4),
            ref_labels=torch.arange(5),
        )
        results["lifted_ref_error"] = ""
    except ValueError as error:
        results["lifted_ref_error"] = str(error)

    # ArcFace: the centres are parameters of the DDP-wrapped module, stepped by their own
    # optimizer (as MetricLearningModule does); each rank trains on different items.
    model = ddp(_EncoderAndLoss(_encoder(), ArcFaceLoss(num_classes=4, embedding_size=4)).double())
    encoder_optimizer = torch.optim.SGD(model.module.encoder.parameters(), lr=0.1)
    loss_optimizer = torch.optim.SGD(model.module.loss.parameters(), lr=0.5)
    for step in range(ARCFACE_STEPS):
        inputs, labels = _batch(step)
        rows = _rows(SPLITS["uneven"], rank)
        model(inputs[rows], labels[rows]).backward()
        encoder_optimizer.step()
        loss_optimizer.step()
        encoder_optimizer.zero_grad()
        loss_optimizer.zero_grad()
    results["arcface_centres"] = model.module.loss.W.detach().clone()

    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("ddp")
    start = time.monotonic()
    context = mp.start_processes(
        _worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=False,
        start_method="spawn",
    )
    deadline = start + 240
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail("the 2-process run did not finish in 240 s (a collective hung?)")
    return [torch.load(tmp / f"rank{rank}.pt") for rank in range(WORLD)]


def _assert_close(actual, expected, what):
    difference = (torch.as_tensor(actual) - torch.as_tensor(expected)).abs().max()
    assert difference <= TOLERANCE, f"{what}: differs by {float(difference):.3g}"


@pytest.mark.parametrize("split_name", list(SPLITS))
@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_one_process(rank_results, name, split_name):
    inputs, labels = _batch()
    expected = _loss_and_grads(CASES[name], inputs, labels)
    for rank, results in enumerate(rank_results):
        got = results[name, split_name]
        _assert_close(got["value"], expected["value"], f"{name} value on rank {rank}")
        for i, (g, e) in enumerate(zip(got["grads"], expected["grads"], strict=True)):
            _assert_close(g, e, f"{name} gradient of parameter {i} on rank {rank}")


@pytest.mark.parametrize("split_name", list(SPLITS))
def test_cross_batch_memory_enqueues_every_rank(rank_results, split_name):
    steps = [_batch(step) for step in range(XBM_STEPS)]
    expected = _xbm_run(steps)
    first, second = (results["xbm", split_name] for results in rank_results)
    # Both ranks hold the same memory: both halves of every batch, in batch order.
    assert first["queue_idx"] == second["queue_idx"] == XBM_STEPS * BATCH
    assert torch.equal(first["memory"], second["memory"])
    assert torch.equal(first["memory_labels"], expected["memory_labels"])
    _assert_close(first["memory"], expected["memory"], "memory")
    for rank, got in enumerate((first, second)):
        _assert_close(got["value"], expected["value"], f"XBM value on rank {rank}")
        for g, e in zip(got["grads"], expected["grads"], strict=True):
            _assert_close(g, e, f"XBM gradient on rank {rank}")


def test_arcface_centres_stay_equal_across_ranks(rank_results):
    first, second = (results["arcface_centres"] for results in rank_results)
    assert torch.equal(first, second)
    _encoder()  # the same random draws as the worker's: the encoder, then the centres
    initial = ArcFaceLoss(num_classes=4, embedding_size=4).W.double()
    assert not torch.allclose(first, initial)  # the centres did learn


def test_global_loss_refuses_a_reference_set(rank_results):
    assert "cannot take ref_emb" in rank_results[0]["lifted_ref_error"]


def test_gather_is_off_in_one_process():
    embeddings, labels = torch.randn(8, 4), torch.arange(4).repeat(2)
    loss = NTXentLoss()
    assert not loss._gathers(has_ref=False)
    assert torch.equal(loss(embeddings, labels), NTXentLoss(gather_distributed=False)(
        embeddings, labels))


def test_gather_true_without_process_group_raises():
    with pytest.raises(RuntimeError, match="process group"):
        NTXentLoss(gather_distributed=True)(torch.randn(8, 4), torch.arange(4).repeat(2))
    with pytest.raises(RuntimeError, match="process group"):
        CrossBatchMemory(ContrastiveLoss(), 4, gather_distributed=True)(
            torch.randn(8, 4), torch.arange(4).repeat(2))


def test_class_weight_losses_refuse_to_gather():
    with pytest.raises(ValueError, match="nothing to gather"):
        ArcFaceLoss(num_classes=4, embedding_size=4, gather_distributed=True)
