"""MultipleLosses and CrossBatchMemory against PML 2.9, and the queue's checkpoint round trip."""

import pytest
import torch
from helpers import assert_parity, random_embeddings, subset_of_triplets
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

from lightning_metric import losses, miners

LABELS = torch.arange(4).repeat_interleave(4)


def _xbm_pair(kind, memory_size, with_miner):
    ours_loss, theirs_loss = {
        "contrastive": (losses.ContrastiveLoss(), pml_losses.ContrastiveLoss()),
        "triplet": (losses.TripletMarginLoss(margin=0.3), pml_losses.TripletMarginLoss(margin=0.3)),
        "ntxent": (losses.NTXentLoss(), pml_losses.NTXentLoss()),
        "multi_similarity": (losses.MultiSimilarityLoss(), pml_losses.MultiSimilarityLoss()),
    }[kind]
    ours_miner = miners.MultiSimilarityMiner(epsilon=0.5) if with_miner else None
    theirs_miner = pml_miners.MultiSimilarityMiner(epsilon=0.5) if with_miner else None
    ours = losses.CrossBatchMemory(ours_loss, 8, memory_size=memory_size, miner=ours_miner)
    theirs = pml_losses.CrossBatchMemory(theirs_loss, 8, memory_size=memory_size,
                                         miner=theirs_miner)
    theirs.embedding_memory = theirs.embedding_memory.double()
    return ours, theirs


@pytest.mark.parametrize("kind", ["contrastive", "triplet", "ntxent", "multi_similarity"])
@pytest.mark.parametrize("memory_size", [40, 20])  # 20 wraps around within three batches
@pytest.mark.parametrize("with_miner", [False, True])
def test_cross_batch_memory_matches_pml_over_three_batches(kind, memory_size, with_miner):
    ours, theirs = _xbm_pair(kind, memory_size, with_miner)
    for step in range(3):
        embeddings = random_embeddings(16, 8, seed=10 + step)
        labels = LABELS.roll(step)
        assert_parity(ours, theirs, embeddings, labels)
    torch.testing.assert_close(ours.embedding_memory.double(), theirs.embedding_memory)
    assert torch.equal(ours.label_memory, theirs.label_memory)
    assert int(ours.queue_idx) == theirs.queue_idx


def test_cross_batch_memory_with_enqueue_mask_matches_pml():
    ours, theirs = _xbm_pair("contrastive", 40, False)
    mask = torch.arange(16) % 2 == 0
    for step in range(3):
        embeddings = random_embeddings(16, 8, seed=20 + step)
        assert_parity(ours, theirs, embeddings, LABELS, enqueue_mask=mask)


def test_cross_batch_memory_survives_a_checkpoint_round_trip():
    first = losses.CrossBatchMemory(losses.ContrastiveLoss(), 8, memory_size=20)
    for step in range(2):
        first(random_embeddings(16, 8, seed=step, dtype=torch.float32), LABELS)
    restored = losses.CrossBatchMemory(losses.ContrastiveLoss(), 8, memory_size=20)
    restored.load_state_dict(first.state_dict())
    batch = random_embeddings(16, 8, seed=5, dtype=torch.float32)
    torch.testing.assert_close(restored(batch, LABELS), first(batch, LABELS))
    assert bool(restored.has_been_filled) and int(restored.queue_idx) == int(first.queue_idx)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"embeddings": random_embeddings(16, 5)}, "embedding_size=8"),
        ({"embeddings": random_embeddings(64, 8), "labels": torch.zeros(64)}, "memory_size=20"),
        ({"labels": torch.zeros(3)}, "same length"),
    ],
)
def test_cross_batch_memory_bad_input(kwargs, message):
    xbm = losses.CrossBatchMemory(losses.ContrastiveLoss(), 8, memory_size=20)
    args = {"embeddings": random_embeddings(16, 8), "labels": LABELS}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        xbm(**args)


def test_multiple_losses_list_with_miners_and_weights_matches_pml():
    ours = losses.MultipleLosses(
        [losses.TupletMarginLoss(), losses.IntraPairVarianceLoss(), losses.ContrastiveLoss()],
        miners=[None, miners.MultiSimilarityMiner(), None], weights=[1.0, 0.5, 2.0])
    theirs = pml_losses.MultipleLosses(
        [pml_losses.TupletMarginLoss(), pml_losses.IntraPairVarianceLoss(),
         pml_losses.ContrastiveLoss()],
        miners=[None, pml_miners.MultiSimilarityMiner(), None], weights=[1.0, 0.5, 2.0])
    assert_parity(ours, theirs, random_embeddings(16, 8, seed=3), LABELS)


def test_multiple_losses_dict_with_indices_tuple_matches_pml():
    triplets = subset_of_triplets(LABELS)
    ours = losses.MultipleLosses({"t": losses.TripletMarginLoss(), "c": losses.CircleLoss()},
                                 weights={"t": 0.3, "c": 1.0})
    theirs = pml_losses.MultipleLosses(
        {"t": pml_losses.TripletMarginLoss(), "c": pml_losses.CircleLoss()},
        weights={"t": 0.3, "c": 1.0})
    assert_parity(ours, theirs, random_embeddings(16, 8, seed=4), LABELS, indices_tuple=triplets)


def test_multiple_losses_bad_configuration():
    with pytest.raises(ValueError, match="weights must be a list of 2"):
        losses.MultipleLosses([losses.ContrastiveLoss(), losses.CircleLoss()], weights=[1.0])
    with pytest.raises(ValueError, match="keys"):
        losses.MultipleLosses({"a": losses.ContrastiveLoss()}, weights={"b": 1.0})
