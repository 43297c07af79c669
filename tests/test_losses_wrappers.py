"""MultipleLosses and CrossBatchMemory against PML 2.9 (by hand where PML pairs an item with its
own copy in memory), and the queue's checkpoint round trip."""

import functools

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_parity, random_embeddings, subset_of_triplets
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

from lightning_metric import losses, miners

LABELS = torch.arange(4).repeat_interleave(4)


# Miners whose tuples the own copy in memory cannot change, so PML's mine-then-drop answer is
# right: with three other positives per anchor in memory, MultiSimilarityMiner keeps the copy
# (dropped afterwards) without it moving any threshold, and a hard positive is never the copy
# at distance 0. Miners that can choose the copy are checked by hand below.
PML_RIGHT_MINERS = {
    None: (lambda: None, lambda: None),
    "multi_similarity": (lambda: miners.MultiSimilarityMiner(epsilon=0.5),
                         lambda: pml_miners.MultiSimilarityMiner(epsilon=0.5)),
    "batch_hard": (miners.BatchHardMiner, pml_miners.BatchHardMiner),
}


def _xbm_pair(kind, memory_size, miner):
    ours_loss, theirs_loss = {
        "contrastive": (losses.ContrastiveLoss(), pml_losses.ContrastiveLoss()),
        "triplet": (losses.TripletMarginLoss(margin=0.3), pml_losses.TripletMarginLoss(margin=0.3)),
        "ntxent": (losses.NTXentLoss(), pml_losses.NTXentLoss()),
        "multi_similarity": (losses.MultiSimilarityLoss(), pml_losses.MultiSimilarityLoss()),
    }[kind]
    make_ours, make_theirs = PML_RIGHT_MINERS[miner]
    ours = losses.CrossBatchMemory(ours_loss, 8, memory_size=memory_size, miner=make_ours())
    theirs = pml_losses.CrossBatchMemory(theirs_loss, 8, memory_size=memory_size,
                                         miner=make_theirs())
    theirs.embedding_memory = theirs.embedding_memory.double()
    return ours, theirs


@pytest.mark.parametrize("kind", ["contrastive", "triplet", "ntxent", "multi_similarity"])
@pytest.mark.parametrize("memory_size", [40, 20])  # 20 wraps around within three batches
@pytest.mark.parametrize("miner", list(PML_RIGHT_MINERS))
def test_cross_batch_memory_matches_pml_over_three_batches(kind, memory_size, miner):
    ours, theirs = _xbm_pair(kind, memory_size, miner)
    for step in range(3):
        embeddings = random_embeddings(16, 8, seed=10 + step)
        labels = LABELS.roll(step)
        assert_parity(ours, theirs, embeddings, labels)
    torch.testing.assert_close(ours.embedding_memory.double(), theirs.embedding_memory)
    assert torch.equal(ours.label_memory, theirs.label_memory)
    assert int(ours.queue_idx) == theirs.queue_idx


def test_cross_batch_memory_with_enqueue_mask_matches_pml():
    ours, theirs = _xbm_pair("contrastive", 40, None)
    mask = torch.arange(16) % 2 == 0
    for step in range(3):
        embeddings = random_embeddings(16, 8, seed=20 + step)
        assert_parity(ours, theirs, embeddings, LABELS, enqueue_mask=mask)


# A tiny case for the own copy in memory: 2-D embeddings, two classes of two.
SMALL = torch.tensor([[0.803, 0.175], [0.089, -0.614], [0.046, -1.368], [0.337, 1.011]])
SMALL_LABELS = torch.tensor([0, 0, 1, 1])


def _unit_distance(x, i, j):
    """TripletMarginLoss's default distance: Euclidean between L2-normalised embeddings."""
    return float(torch.dist(F.normalize(x[i], dim=0), F.normalize(x[j], dim=0)))


def test_cross_batch_memory_excludes_the_own_copy_before_mining_by_hand():
    """BatchEasyHardMiner() takes the closest positive and the closest negative beyond it.
    Mined first, every anchor's closest positive is its own copy in memory (distance 0),
    dropped afterwards: PML 2.9 returns 0 here. Excluded first, memory holding only this
    batch is the batch itself: the same triplets and value as the miner without memory."""
    d = functools.partial(_unit_distance, SMALL)
    # d(0,1) = 1.4633, d(0,2) = 1.5362, d(0,3) = 0.9890, d(1,2) = 0.1102, d(1,3) = 1.9460,
    # d(2,3) = 1.9685. Anchor 0: positive 1, negatives beyond 1.4633: {2} -> (0, 1, 2).
    # Anchor 1: positive 0, beyond 1.4633: {3} -> (1, 0, 3), loss 0. Anchors 2 and 3: their
    # positive (1.9685) is farther than every negative, so no semihard negative: dropped.
    hand = max(0.0, d(0, 1) - d(0, 2) + 0.2)  # 1.4633 - 1.5362 + 0.2; mean of non-zero losses
    assert hand == pytest.approx(0.12705, abs=1e-5)
    loss = losses.TripletMarginLoss(margin=0.2)
    without_memory = loss(SMALL, SMALL_LABELS, miners.BatchEasyHardMiner()(SMALL, SMALL_LABELS))
    xbm = losses.CrossBatchMemory(losses.TripletMarginLoss(margin=0.2), embedding_size=2,
                                  memory_size=8, miner=miners.BatchEasyHardMiner())
    value = xbm(SMALL, SMALL_LABELS)
    assert float(without_memory) == pytest.approx(hand, abs=1e-6)
    assert float(value) == pytest.approx(hand, abs=1e-6)
    pml = pml_losses.CrossBatchMemory(pml_losses.TripletMarginLoss(margin=0.2), 2, 8,
                                      miner=pml_miners.BatchEasyHardMiner())
    assert float(pml(SMALL, SMALL_LABELS)) == 0.0  # the fault this fixes


def test_cross_batch_memory_easy_positive_finetuner_miner_by_hand():
    """TripletEasyHardMiner("easy", "hard"): each anchor's only other positive and its
    closest negative by cosine. With the own copy mined first every triplet was dropped."""
    d = functools.partial(_unit_distance, SMALL)
    triplets = [(0, 1, 3), (1, 0, 2), (2, 3, 1), (3, 2, 0)]
    # (1.4633 - 0.9890 + 0.2 + 1.4633 - 0.1102 + 0.2 + 1.9685 - 0.1102 + 0.2 + 1.9685
    #  - 0.9890 + 0.2) / 4 = 1.3663: every triplet is active.
    hand = sum(max(0.0, d(a, p) - d(a, n) + 0.2) for a, p, n in triplets) / 4
    assert hand == pytest.approx(1.36627, abs=1e-5)
    miner = miners.TripletEasyHardMiner(pos_strategy="easy")
    assert sorted(zip(*(t.tolist() for t in miner(SMALL, SMALL_LABELS)), strict=True)) == triplets
    xbm = losses.CrossBatchMemory(losses.TripletMarginLoss(margin=0.2), 2, 8, miner=miner)
    assert float(xbm(SMALL, SMALL_LABELS)) == pytest.approx(hand, abs=1e-6)


FIRST_BATCH_MINERS = [
    miners.BatchEasyHardMiner(),
    miners.BatchEasyHardMiner(pos_strategy="easy", neg_strategy="hard", distance="cosine"),
    miners.TripletEasyHardMiner(pos_strategy="easy"),
    miners.SiameseEasyHardMiner(pos_strategy="easy", neg_strategy="easy"),
    miners.BatchHardMiner(),
    miners.MultiSimilarityMiner(),
    miners.TripletMarginMiner(margin=0.5),
    miners.PairMarginMiner(),
]


@pytest.mark.parametrize("loss_cls", [losses.ContrastiveLoss, losses.TripletMarginLoss])
@pytest.mark.parametrize("miner", FIRST_BATCH_MINERS, ids=lambda m: type(m).__name__)
def test_cross_batch_memory_first_batch_equals_the_miner_without_memory(miner, loss_cls):
    """With memory holding only this batch (shuffled labels, four per class), excluding each
    anchor's own slot makes mining over the memory the same as mining the batch itself."""
    embeddings = random_embeddings(16, 8, seed=30, dtype=torch.float32)
    labels = LABELS[torch.randperm(16, generator=torch.Generator().manual_seed(1))]
    expected = loss_cls()(embeddings, labels, miner(embeddings, labels))
    xbm = losses.CrossBatchMemory(loss_cls(), 8, memory_size=32, miner=miner)
    torch.testing.assert_close(xbm(embeddings, labels), expected)


SECOND = torch.tensor([[-0.57, 0.37], [-0.89, -1.51], [0.37, 1.46], [0.94, 0.77]])
SECOND_LABELS = torch.tensor([0, 1, 0, 1])


def _easy_semihard_by_loops(batch, labels, memory, memory_labels, own_slots, margin=0.2):
    """BatchEasyHardMiner() + TripletMarginLoss written out: per anchor the closest positive
    other than its own slot, then the closest negative strictly beyond it; the mean of the
    non-zero ``d(a, p) - d(a, n) + margin``. Returns the triplets and the value."""
    unit_batch, unit_memory = F.normalize(batch, dim=1), F.normalize(memory, dim=1)
    triplets, terms = [], []
    for a in range(len(batch)):
        d = [float(torch.dist(unit_batch[a], unit_memory[j])) for j in range(len(memory))]
        positives = [j for j in range(len(memory))
                     if memory_labels[j] == labels[a] and j != own_slots[a]]
        negatives = [j for j in range(len(memory)) if memory_labels[j] != labels[a]]
        if not positives:
            continue
        p = min(positives, key=d.__getitem__)
        beyond = [j for j in negatives if d[j] > d[p]]
        if not beyond:
            continue
        n = min(beyond, key=d.__getitem__)
        triplets.append((a, p, n))
        terms.append(max(0.0, d[p] - d[n] + margin))
    active = [t for t in terms if t > 0]
    return triplets, (sum(active) / len(active) if active else 0.0)


def test_cross_batch_memory_second_batch_mines_the_earlier_batch():
    """Slots 0-3 hold the first batch, 4-7 the second: positives and negatives come from
    both batches, never the anchor's own slot."""
    xbm = losses.CrossBatchMemory(losses.TripletMarginLoss(margin=0.2), 2, 8,
                                  miner=miners.BatchEasyHardMiner())
    xbm(SMALL, SMALL_LABELS)
    value = xbm(SECOND, SECOND_LABELS)
    memory = torch.cat([SMALL, SECOND])
    memory_labels = torch.cat([SMALL_LABELS, SECOND_LABELS])
    triplets, expected = _easy_semihard_by_loops(SECOND, SECOND_LABELS, memory, memory_labels,
                                                 own_slots=[4, 5, 6, 7])
    # (anchor, memory slot of the positive, of the negative): anchor 0 takes its positive
    # from the second batch and its negative from the first; anchor 1 both from the first.
    assert triplets == [(0, 6, 3), (1, 2, 1), (2, 0, 5), (3, 3, 6)]
    assert expected == pytest.approx((0.14101 + 0.09496 + 0.12973) / 3, abs=1e-5)
    assert float(value) == pytest.approx(expected, abs=1e-6)
    pml = pml_losses.CrossBatchMemory(pml_losses.TripletMarginLoss(margin=0.2), 2, 8,
                                      miner=pml_miners.BatchEasyHardMiner())
    pml(SMALL, SMALL_LABELS)
    assert float(pml(SECOND, SECOND_LABELS)) == 0.0


def test_cross_batch_memory_drops_self_pairs_of_a_foreign_miner_after_mining():
    """A miner that is not a BaseMiner cannot take ref_self_index: its self-pairs are dropped
    afterwards, as in PML (so PML's own BatchEasyHardMiner still gives PML's 0)."""
    seen = []

    def every_positive_pair(embeddings, labels, ref_emb, ref_labels):
        seen.append(len(ref_emb))
        a, p = torch.where(labels[:, None] == ref_labels[None, :])
        empty = a.new_empty(0)
        return a, p, empty, empty.clone()

    xbm = losses.CrossBatchMemory(losses.ContrastiveLoss(), 2, 8, miner=every_positive_pair)
    value = xbm(SMALL, SMALL_LABELS)
    # Left: (0, 1), (1, 0), (2, 3), (3, 2); ContrastiveLoss's positive term is d(a, p).
    d = functools.partial(_unit_distance, SMALL)
    hand = (2 * d(0, 1) + 2 * d(2, 3)) / 4
    assert seen == [4] and float(value) == pytest.approx(hand, abs=1e-6)
    xbm = losses.CrossBatchMemory(losses.TripletMarginLoss(margin=0.2), 2, 8,
                                  miner=pml_miners.BatchEasyHardMiner())
    assert float(xbm(SMALL, SMALL_LABELS)) == 0.0


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
