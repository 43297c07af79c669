"""AngularMiner, HDCMiner (same tuples as PML 2.9); DistanceWeightedMiner and
UniformHistogramMiner (same distribution as PML 2.9, drawn from their own generator)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import hydra
import pytest
import torch
import torch.nn.functional as F
from helpers import label_patterns, random_embeddings
from omegaconf import OmegaConf
from pytorch_metric_learning import miners as pml_miners

from lightning_metric import miners, sampling_miners
from lightning_metric.miners import (
    AngularMiner,
    DistanceWeightedMiner,
    HDCMiner,
    UniformHistogramMiner,
)

PATTERNS = label_patterns()
REF_LABELS = torch.tensor([0, 1, 2, 3, 0, 1, 5, 6, 0, 0, 2, 7])
CONF = Path(__file__).resolve().parents[1] / "conf" / "miner"


def as_sets(indices_tuple):
    lists = [t.tolist() for t in indices_tuple]
    if len(lists) == 3:
        return {"triplets": sorted(zip(*lists, strict=True))}
    return {
        "pos": sorted(zip(lists[0], lists[1], strict=True)),
        "neg": sorted(zip(lists[2], lists[3], strict=True)),
    }


# ------------------------------------------------------------------ deterministic: same tuples

DETERMINISTIC = [
    pytest.param(lambda: AngularMiner(), lambda: pml_miners.AngularMiner(), id="angular-default"),
    pytest.param(lambda: AngularMiner(angle=40), lambda: pml_miners.AngularMiner(angle=40),
                 id="angular-40"),
    pytest.param(lambda: HDCMiner(), lambda: pml_miners.HDCMiner(), id="hdc-default"),
    pytest.param(lambda: HDCMiner(filter_percentage=0.2),
                 lambda: pml_miners.HDCMiner(filter_percentage=0.2), id="hdc-0.2"),
    pytest.param(lambda: HDCMiner(filter_percentage=0.7, distance="cosine"),
                 lambda: pml_miners.HDCMiner(
                     filter_percentage=0.7,
                     distance=__import__("pytorch_metric_learning.distances",
                                         fromlist=["x"]).CosineSimilarity()),
                 id="hdc-0.7-cosine"),
]


@pytest.mark.parametrize("use_ref", [False, True], ids=["batch", "ref"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("ours,theirs", DETERMINISTIC)
def test_same_tuples_as_pml(ours, theirs, pattern, use_ref):
    labels = PATTERNS[pattern]
    x = random_embeddings(len(labels), seed=1) * 2  # not unit norm: PML's angles use raw norms
    kwargs = {}
    if use_ref:
        kwargs = {"ref_emb": random_embeddings(len(REF_LABELS), seed=2), "ref_labels": REF_LABELS}
    mined = ours()(x, labels, **kwargs)
    assert all(t.dtype == torch.long for t in mined)
    assert as_sets(mined) == as_sets(theirs()(x, labels, **kwargs))


@pytest.mark.parametrize("angle", [29.0, 31.0])
def test_angle_is_in_degrees(angle):
    """A triplet with a known 30 degree angle: anchor and positive opposite on an axis, the
    centre at 0, the negative at distance 1 / tan(30 deg): atan(|a-p| / (2 |n-c|)) = 30."""
    r = 1 / math.tan(math.radians(30))
    x = torch.tensor([[1.0, 0, 0], [-1.0, 0, 0], [0, r, 0]], dtype=torch.float64)
    mined = AngularMiner(angle=angle)(x, torch.tensor([0, 0, 1]))
    assert as_sets(mined)["triplets"] == ([(0, 1, 2), (1, 0, 2)] if angle < 30 else [])
    # 0.5 *radians* read as degrees keeps every triplet: the unit is the degree.
    assert len(AngularMiner(angle=0.5)(x, torch.tensor([0, 0, 1]))[0]) == 2


def test_angular_normalize_embeddings_is_the_paper_angle():
    labels = PATTERNS["four_per_class"]
    x = random_embeddings(len(labels), seed=3)
    scaled = x * torch.linspace(0.5, 3, len(labels), dtype=x.dtype).unsqueeze(1)
    on_sphere = AngularMiner(angle=25)(F.normalize(x, dim=1), labels)
    assert as_sets(AngularMiner(angle=25, normalize_embeddings=True)(scaled, labels)) == as_sets(
        on_sphere)


# ------------------------------------------------------------------ DistanceWeightedMiner

def _distance_weights(x, labels, cutoff=0.5, nonzero_loss_cutoff=1.4):
    """The paper's weights, by hand: 1 / q(d) for negatives closer than the cutoff."""
    unit = F.normalize(x, dim=1)
    d = torch.cdist(unit, unit).clamp(min=cutoff)
    dim = x.shape[1]
    q = d ** (dim - 2) * (1 - d**2 / 4) ** ((dim - 3) / 2)
    weights = torch.where((labels[:, None] != labels[None, :]) & (d < nonzero_loss_cutoff),
                          1 / q, torch.zeros_like(d))
    return weights / weights.sum(dim=1, keepdim=True)


def _negative_frequencies(draws, batch):
    counts = torch.zeros(batch, batch, dtype=torch.float64)
    for a, _, n in draws:
        counts.index_put_((a, n), torch.ones(len(a), dtype=torch.float64), accumulate=True)
    return counts / counts.sum(dim=1, keepdim=True).clamp(min=1)


def _distance_histogram(draws, dist, edges):
    """Shares of the mined negative pairs' distances in the bins of ``edges``."""
    a = torch.cat([t[0] for t in draws])
    n = torch.cat([t[2] for t in draws])
    counts = torch.histogram(dist[a, n], edges).hist
    return counts / counts.sum()


@pytest.fixture
def one_thread():
    """Hundreds of calls on tiny tensors: intra-op threads only add overhead (milliseconds a
    ``torch.log`` on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_distance_weighted_draws_negatives_like_pml(one_thread):
    labels = PATTERNS["four_per_class"]
    # float32 draws (PML's and ours); the hand-written weights are computed in float64.
    x = random_embeddings(len(labels), seed=4, dtype=torch.float32)
    expected = _distance_weights(x.double(), labels)
    miner = DistanceWeightedMiner(seed=0)
    ours = [miner(x, labels) for _ in range(400)]
    torch.manual_seed(0)
    theirs = [pml_miners.DistanceWeightedMiner()(x, labels) for _ in range(100)]
    # Deterministic parts: the triplets per anchor, and which negatives can be drawn.
    for mined in (ours[0], theirs[0]):
        assert Counter(mined[0].tolist()) == {a: 4 for a in range(len(labels))}
    assert torch.equal(_negative_frequencies(ours, len(labels)) > 0, expected > 0)
    # Each (anchor, negative)'s empirical frequency against the hand-written weights.
    assert (_negative_frequencies(ours, len(labels)) - expected).abs().max() < 0.06
    # The histogram of the mined negatives' distances: ours, PML's and the weights' agree.
    unit = F.normalize(x.double(), dim=1)
    dist = torch.cdist(unit, unit)
    edges = torch.linspace(0, 1.4, 8, dtype=torch.float64)
    a, n = torch.where(expected > 0)
    weighted = torch.histogram(dist[a, n], edges, weight=expected[a, n]).hist
    weighted = weighted / weighted.sum()
    assert (_distance_histogram(ours, dist, edges) - weighted).abs().max() < 0.015
    assert (_distance_histogram(theirs, dist, edges) - weighted).abs().max() < 0.025
    # Positives: uniform over the anchor's other positives.
    a, p, _ = (torch.cat(t) for t in zip(*ours, strict=True))
    assert bool((labels[a] == labels[p]).all()) and bool((a != p).all())
    counts = torch.bincount(a * len(labels) + p, minlength=len(labels) ** 2).double()
    counts = counts.view(len(labels), -1)[labels[:, None] == labels[None, :]]
    counts = counts[counts > 0]
    assert len(counts) == 16 * 3 and (counts / counts.mean() - 1).abs().max() < 0.2


def test_distance_weighted_pattern_counts_match_pml():
    """Triplets per anchor: its class's size (PML's count); anchors without a positive,
    a negative, or a negative closer than nonzero_loss_cutoff get none."""
    for name, labels in PATTERNS.items():
        x = random_embeddings(len(labels), seed=5)
        ours = DistanceWeightedMiner(seed=1)(x, labels)
        theirs = pml_miners.DistanceWeightedMiner()(x, labels)
        assert Counter(ours[0].tolist()) == Counter(theirs[0].tolist()), name
        assert bool((labels[ours[0]] == labels[ours[1]]).all())
        assert bool((labels[ours[0]] != labels[ours[2]]).all())


def test_distance_weighted_with_a_memory_never_draws_the_own_copy():
    labels = PATTERNS["four_per_class"]
    x = random_embeddings(len(labels), seed=6)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    a, p, n = DistanceWeightedMiner(seed=2)(x, labels, x[perm], labels[perm],
                                            ref_self_index=perm.argsort())
    assert not bool((perm[p] == a).any())
    assert Counter(a.tolist()) == {i: 4 for i in range(len(labels))}


# ------------------------------------------------------------------ UniformHistogramMiner

def _bin_of(values, lo, hi, num_bins):
    edges = torch.linspace(lo, hi, num_bins + 1, dtype=values.dtype)
    return torch.clamp(torch.searchsorted(edges, values, right=True) - 1, max=num_bins - 1)


@pytest.mark.parametrize("distance", [None, "cosine"])
def test_uniform_histogram_per_bin_counts_match_pml(distance):
    """How many pairs each bin gives is deterministic (per_bin for every non-empty bin):
    equal to PML's, bin by bin."""
    from pytorch_metric_learning import distances as pml_distances

    labels = PATTERNS["two_views"]
    x = random_embeddings(len(labels), seed=7)
    kwargs = {"num_bins": 12, "pos_per_bin": 3, "neg_per_bin": 5}
    ours = UniformHistogramMiner(distance=distance, seed=0, **kwargs)
    theirs = pml_miners.UniformHistogramMiner(
        **kwargs, **({} if distance is None else {"distance": pml_distances.CosineSimilarity()}))
    mat = ours.distance(x)
    mined, expected = ours(x, labels), theirs(x, labels)
    for rows, cols in ((0, 1), (2, 3)):
        pos = rows == 0
        mask = (labels[:, None] == labels[None, :]) if pos else (labels[:, None] != labels[None, :])
        if pos:
            mask.fill_diagonal_(False)
        lo, hi = mat[mask].min(), mat[mask].max()

        def histogram(t, rows=rows, cols=cols, lo=lo, hi=hi):
            return torch.bincount(_bin_of(mat[t[rows], t[cols]], lo, hi, 12), minlength=12)

        assert torch.equal(histogram(mined), histogram(expected))
        assert bool(mask[mined[rows], mined[cols]].all())


@pytest.mark.parametrize("sort_chunk", [None, 7])
def test_uniform_histogram_draws_uniformly_within_a_bin(sort_chunk, monkeypatch):
    """Also with the bins put in order 7 at a time (a member's chunk found from the
    per-chunk counts)."""
    if sort_chunk is not None:
        monkeypatch.setattr(sampling_miners, "SORT_CHUNK", sort_chunk)
    labels = PATTERNS["four_per_class"]
    x = random_embeddings(len(labels), seed=8)
    miner = UniformHistogramMiner(num_bins=3, pos_per_bin=50, neg_per_bin=50, seed=3)
    mat = miner.distance(x)
    neg = labels[:, None] != labels[None, :]
    a2, n = torch.where(neg)
    bins = _bin_of(mat[a2, n], mat[neg].min(), mat[neg].max(), 3)
    counts = Counter()
    for _ in range(40):
        _, _, ma2, mn = miner(x, labels)
        counts.update(zip(ma2.tolist(), mn.tolist(), strict=True))
    for b in range(3):
        members = [(i, j) for i, j, k in zip(a2.tolist(), n.tolist(), bins.tolist(),
                                             strict=True) if k == b]
        observed = torch.tensor([counts[m] for m in members], dtype=torch.float64)
        assert observed.sum() == 50 * 40  # every draw of the bin lands in it
        expected = 50 * 40 / len(members)
        # Chi-square with len(members) - 1 degrees of freedom, far below a 1e-4 tail.
        chi2 = ((observed - expected) ** 2 / expected).sum()
        assert chi2 < len(members) + 6 * math.sqrt(2 * len(members)), (b, float(chi2))


@pytest.mark.parametrize("flat", [False, True], ids=["whole_matrix", "pair_list"])
def test_uniform_histogram_picks_the_same_pairs_whatever_the_sort_chunk(flat, monkeypatch):
    """Sorting the bins chunk by chunk picks, draw for draw, the member a single sort of
    all bins picks (the offset-th of its bin in row-major order)."""
    labels = torch.arange(30).repeat_interleave(2) if flat else torch.arange(60) % 3
    x = random_embeddings(len(labels), seed=9)
    picks = []
    for sort_chunk in (10**9, 11, 1):
        monkeypatch.setattr(sampling_miners, "SORT_CHUNK", sort_chunk)
        picks.append(UniformHistogramMiner(num_bins=9, seed=4)(x, labels))
    for chunked in picks[1:]:
        for got, expected in zip(chunked, picks[0], strict=True):
            assert torch.equal(got, expected)


# ------------------------------------------------------------------ generator contract

SAMPLING = [
    lambda **kw: DistanceWeightedMiner(**kw),
    lambda **kw: UniformHistogramMiner(num_bins=8, pos_per_bin=3, neg_per_bin=3, **kw),
]


@pytest.mark.parametrize("make", SAMPLING, ids=["distance_weighted", "uniform_histogram"])
def test_generator_is_honoured_and_the_global_rng_untouched(make):
    labels = PATTERNS["four_per_class"]
    x = random_embeddings(len(labels), seed=9)
    state = torch.get_rng_state()
    first = make(generator=torch.Generator().manual_seed(5))(x, labels)
    again = make(generator=torch.Generator().manual_seed(5))(x, labels)
    other = make(generator=torch.Generator().manual_seed(6))(x, labels)
    by_seed = make(seed=5)(x, labels)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(u, v) for u, v in zip(first, again, strict=True))
    assert all(torch.equal(u, v) for u, v in zip(first, by_seed, strict=True))
    assert not all(torch.equal(u, v) for u, v in zip(first, other, strict=True))
    # Without generator or seed: seeded from torch.initial_seed(), still no global draw.
    torch.manual_seed(11)
    state = torch.get_rng_state()
    default = make()(x, labels)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(u, v)
               for u, v in zip(default, make(seed=11)(x, labels), strict=True))
    with pytest.raises(ValueError, match="either a generator or a seed"):
        make(generator=torch.Generator(), seed=1)


# ------------------------------------------------------------------ contract, errors, config

ALL_NEW = [AngularMiner, HDCMiner, DistanceWeightedMiner, UniformHistogramMiner]


@pytest.mark.parametrize("miner_cls", ALL_NEW)
def test_half_precision_and_tiny_batches(miner_cls):
    labels = PATTERNS["four_per_class"]
    x = random_embeddings(len(labels), seed=10, dtype=torch.bfloat16)
    mined = miner_cls()(x, labels)
    assert all(t.dtype == torch.long and not t.requires_grad for t in mined)
    for n in (0, 1):
        empty = miner_cls()(torch.randn(n, 4), torch.zeros(n, dtype=torch.long))
        assert all(len(t) == 0 and t.dtype == torch.long for t in empty)
    assert miner_cls is getattr(miners, miner_cls.__name__)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: AngularMiner(angle=100), "degrees"),
        (lambda: AngularMiner(angle=-1), "degrees"),
        (lambda: HDCMiner(filter_percentage=1.5), "filter_percentage"),
        (lambda: DistanceWeightedMiner(cutoff=-1), "cutoff"),
        (lambda: UniformHistogramMiner(num_bins=0), "num_bins"),
        (lambda: UniformHistogramMiner(pos_per_bin=2.5), "pos_per_bin"),
    ],
)
def test_bad_parameters_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    "name,cls",
    [("angular", AngularMiner), ("hdc", HDCMiner), ("distance_weighted", DistanceWeightedMiner),
     ("uniform_histogram", UniformHistogramMiner)],
)
def test_config_files_instantiate(name, cls):
    miner = hydra.utils.instantiate(OmegaConf.load(CONF / f"{name}.yaml"))
    assert type(miner) is cls
