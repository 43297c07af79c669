"""Query-document and image-text losses against their reference libraries, in float64.

Oracles: sentence-transformers 6.2 (MNRL, its symmetric variant, CosineSimilarityLoss,
MarginMSELoss: their ``compute_loss_from_embeddings`` on our embeddings), open_clip 3.3
(``ClipLoss`` on the normalised features and ``logit_scale.exp()``) and torch.nn
(CosineEmbeddingLoss, MarginRankingLoss). Gathering across ranks is checked in one process:
threads stand in for the ranks, exchanging their tensors as the collectives would.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from open_clip.loss import ClipLoss
from sentence_transformers.sentence_transformer import losses as st_losses
from sentence_transformers.util import cos_sim, dot_score, pairwise_cos_sim, pairwise_dot_score
from torch import nn

from lightning_metric import builders, losses
from lightning_metric.distributed import Gathered
from lightning_metric.losses import (
    CLIPLoss,
    CosineEmbeddingLoss,
    CosineSimilarityLoss,
    MarginMSELoss,
    MarginRankingLoss,
    MNRLoss,
    MultipleNegativesRankingLoss,
    _paired,
)
from lightning_metric.losses.registry import PAIR_LOSSES, get_entry

TOL = {"rtol": 1e-6, "atol": 1e-9}
SHAPES = [(8, 16, 0), (5, 3, 1)]  # (batch, dim, seed)


def fields(count: int, batch: int = 8, dim: int = 16, seed: int = 0) -> list[torch.Tensor]:
    """``count`` float64 ``(batch, dim)`` leaves that require grad."""
    generator = torch.Generator().manual_seed(seed)
    data = torch.randn(count, batch, dim, generator=generator, dtype=torch.float64)
    return [x.clone().requires_grad_(True) for x in data]


def value_and_grads(fn, tensors: list[torch.Tensor], *extra) -> tuple[torch.Tensor, list]:
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    value = fn(*leaves, *extra)
    value.backward()
    return value.detach(), [leaf.grad for leaf in leaves]


def assert_parity(ours, theirs, tensors, *extra):
    value, grads = value_and_grads(ours, tensors, *extra)
    expected, expected_grads = value_and_grads(theirs, tensors, *extra)
    torch.testing.assert_close(value, expected, **TOL)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, **TOL)


# -- MultipleNegativesRankingLoss --------------------------------------------------------


ST_SIMILARITY = {"cosine": (cos_sim, 20.0), "dot": (dot_score, 0.5)}


@pytest.mark.filterwarnings("ignore:The MultipleNegativesSymmetricRankingLoss is deprecated")
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("num_negatives", [0, 1, 3])
@pytest.mark.parametrize(("batch", "dim", "seed"), SHAPES)
def test_mnrl_matches_sentence_transformers(similarity, symmetric, num_negatives, batch, dim,
                                            seed):
    similarity_fct, scale = ST_SIMILARITY[similarity]
    oracle_class = (st_losses.MultipleNegativesSymmetricRankingLoss if symmetric
                    else st_losses.MultipleNegativesRankingLoss)
    oracle = oracle_class(None, scale=scale, similarity_fct=similarity_fct)
    ours = MultipleNegativesRankingLoss(scale=scale, similarity=similarity, symmetric=symmetric)
    assert_parity(
        ours,
        lambda *embeddings: oracle.compute_loss_from_embeddings(list(embeddings), None),
        fields(2 + num_negatives, batch, dim, seed),
    )


def test_mnrl_by_hand():
    # Orthonormal queries and documents: s(q_i, d_j) = [i == j] (cosine).
    query = torch.eye(2, dtype=torch.float64)
    doc = torch.eye(2, dtype=torch.float64)
    swapped = doc.flip(0)  # hard negatives: each query's is the other document
    loss = MultipleNegativesRankingLoss(scale=1.0)
    torch.testing.assert_close(loss(query, doc).item(), math.log(1 + math.exp(-1)))
    # Row 0 candidates: d0 (1), d1 (0), n0 (0), n1 (1): -log(e / (2e + 2)).
    torch.testing.assert_close(loss(query, doc, swapped).item(), math.log(2 + 2 * math.exp(-1)))
    # Scale 2, documents at 60 degrees from their queries: cos = 1/2 to the own query.
    doc = torch.tensor([[0.5, math.sqrt(3) / 2], [math.sqrt(3) / 2, 0.5]], dtype=torch.float64)
    loss = MultipleNegativesRankingLoss(scale=2.0, symmetric=True)
    # Every row and column: own 0.5, other sqrt(3)/2, both directions alike.
    expected = -math.log(math.exp(1) / (math.exp(1) + math.exp(math.sqrt(3))))
    torch.testing.assert_close(loss(query, doc).item(), expected)


def test_mnrl_alias_and_exports():
    assert MNRLoss is MultipleNegativesRankingLoss
    assert losses.MNRLoss is losses.MultipleNegativesRankingLoss
    assert "scale=20.0" in repr(MNRLoss())


# -- CosineSimilarityLoss, MarginMSELoss --------------------------------------------------


class TargetInInputDtype(nn.Module):
    """The oracle casts its scores to float32; mixed dtypes break HuberLoss's backward."""

    def __init__(self, loss_fct: nn.Module):
        super().__init__()
        self.loss_fct = loss_fct

    def forward(self, prediction, target):
        return self.loss_fct(prediction, target.to(prediction.dtype))


@pytest.mark.parametrize("loss_fct", ["mse", "l1", "smooth_l1", "huber", nn.HuberLoss(delta=0.1)])
@pytest.mark.parametrize(("batch", "dim", "seed"), SHAPES)
def test_cosine_similarity_matches_sentence_transformers(loss_fct, batch, dim, seed):
    # Scores exactly representable in float32: the oracle casts its labels to float32.
    scores = torch.rand(batch, generator=torch.Generator().manual_seed(seed)).double()
    module = loss_fct if isinstance(loss_fct, nn.Module) else {
        "mse": nn.MSELoss(), "l1": nn.L1Loss(), "smooth_l1": nn.SmoothL1Loss(),
        "huber": nn.HuberLoss()}[loss_fct]
    oracle = st_losses.CosineSimilarityLoss(None, loss_fct=TargetInInputDtype(module))
    assert_parity(
        CosineSimilarityLoss(loss_fct),
        lambda a, b, s: oracle.compute_loss_from_embeddings([a, b], s),
        fields(2, batch, dim, seed), scores,
    )


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize(("batch", "dim", "seed"), SHAPES)
def test_margin_mse_matches_sentence_transformers(similarity, batch, dim, seed):
    margin = torch.randn(batch, generator=torch.Generator().manual_seed(seed + 7),
                         dtype=torch.float64)
    oracle = st_losses.MarginMSELoss(
        None, similarity_fct=pairwise_dot_score if similarity == "dot" else pairwise_cos_sim
    )
    assert_parity(
        MarginMSELoss(similarity),
        lambda q, p, n, m: oracle.compute_loss_from_embeddings([q, p, n], m),
        fields(3, batch, dim, seed), margin,
    )


def test_margin_mse_defaults_to_the_dot_product_like_sentence_transformers():
    import inspect

    default = inspect.signature(st_losses.MarginMSELoss).parameters["similarity_fct"].default
    assert default is pairwise_dot_score
    assert MarginMSELoss().similarity == "dot"


# -- torch.nn's pair losses ---------------------------------------------------------------


@pytest.mark.parametrize("margin", [0.0, 0.3, -0.2])
@pytest.mark.parametrize(("batch", "dim", "seed"), SHAPES)
def test_cosine_embedding_matches_torch(margin, batch, dim, seed):
    target = torch.tensor([1, -1]).repeat(batch)[:batch]
    assert_parity(CosineEmbeddingLoss(margin), nn.CosineEmbeddingLoss(margin),
                  fields(2, batch, dim, seed), target)


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
@pytest.mark.parametrize("margin", [0.0, 0.5])
@pytest.mark.parametrize(("batch", "dim", "seed"), SHAPES)
def test_margin_ranking_matches_torch(similarity, margin, batch, dim, seed):
    def theirs(q, p, n):
        sim = F.cosine_similarity if similarity == "cosine" else lambda x, y: (x * y).sum(1)
        return nn.MarginRankingLoss(margin)(sim(q, p), sim(q, n), torch.ones(len(q)))

    assert_parity(MarginRankingLoss(margin, similarity), theirs, fields(3, batch, dim, seed))


# -- CLIPLoss ------------------------------------------------------------------------------


def open_clip_value(image, text, logit_scale):
    return ClipLoss()(F.normalize(image, dim=1), F.normalize(text, dim=1), logit_scale.exp())


@pytest.mark.parametrize("init", [1 / 0.07, 1.0, 60.0])
@pytest.mark.parametrize(("batch", "dim", "seed"), SHAPES)
def test_clip_matches_open_clip_with_the_logit_scale_gradient(init, batch, dim, seed):
    ours = CLIPLoss(logit_scale_init=init).double()
    # The same value: the parameter was created in float32.
    theirs_scale = ours.logit_scale.detach().clone().requires_grad_(True)
    assert_parity(ours, lambda i, t: open_clip_value(i, t, theirs_scale),
                  fields(2, batch, dim, seed))
    torch.testing.assert_close(ours.logit_scale.grad, theirs_scale.grad, **TOL)


def test_clip_by_hand():
    image = torch.eye(2, dtype=torch.float64)
    text = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)  # cosines 1, 1/r2, 0, 1/r2
    s, c = 3.0, 1 / math.sqrt(2)
    per_image = [math.log(1 + math.exp(s * c - s)), math.log(1 + math.exp(-s * c))]
    per_text = [math.log(1 + math.exp(-s)), math.log(2)]
    expected = (sum(per_image) / 2 + sum(per_text) / 2) / 2
    value = CLIPLoss(logit_scale_init=s).double()(image, text)
    torch.testing.assert_close(value.item(), expected)


def test_clip_logit_scale_learns_and_is_clamped_at_the_maximum():
    image, text = fields(2)
    loss = CLIPLoss()
    assert [name for name, _ in loss.named_parameters()] == ["logit_scale"]
    assert loss.scale == pytest.approx(1 / 0.07, rel=1e-6)
    optimizer = torch.optim.SGD(loss.parameters(), lr=1.0)
    before = loss.logit_scale.item()
    loss(image, text).backward()
    assert loss.logit_scale.grad is not None and loss.logit_scale.grad.item() != 0
    optimizer.step()
    assert loss.logit_scale.item() != before
    # Pushed past log(100): the next forward clamps the parameter, as open_clip does after a
    # step, and uses the scale 100.
    with torch.no_grad():
        loss.logit_scale.fill_(math.log(500.0))
    assert loss.scale == pytest.approx(100.0)
    value = loss.double()(image, text)
    assert loss.logit_scale.item() == pytest.approx(math.log(100.0))
    expected = open_clip_value(image, text, torch.tensor(math.log(100.0), dtype=torch.float64))
    torch.testing.assert_close(value, expected, **TOL)
    with torch.no_grad():  # and at the bottom, scale 1
        loss.logit_scale.fill_(-2.0)
    loss(image, text)
    assert loss.logit_scale.item() == 0.0


def test_clip_fixed_scale_is_a_buffer_without_gradient():
    loss = CLIPLoss(logit_scale_init=10.0, learnable=False)
    assert list(loss.parameters()) == [] and "logit_scale" in dict(loss.named_buffers())
    image, text = fields(2)
    loss(image, text).backward()
    assert image.grad is not None and loss.scale == pytest.approx(10.0)
    assert CLIPLoss(logit_scale_init=500.0, max_logit_scale=None).scale == pytest.approx(500.0)


# -- half precision, empty batches ---------------------------------------------------------


def call_each():
    """(name, loss, inputs builder) for every paired loss."""
    return {
        "mnrl": (MultipleNegativesRankingLoss(), lambda x: (x[0], x[1], x[2])),
        "mnrl_symmetric": (MultipleNegativesRankingLoss(symmetric=True), lambda x: x[:2]),
        "cosine_similarity": (CosineSimilarityLoss(),
                              lambda x: (x[0], x[1], torch.linspace(0, 1, len(x[0])))),
        "cosine_embedding": (CosineEmbeddingLoss(),
                             lambda x: (x[0], x[1], torch.ones(len(x[0])))),
        "margin_ranking": (MarginRankingLoss(0.2), lambda x: x[:3]),
        "margin_mse": (MarginMSELoss(), lambda x: (*x[:3], torch.ones(len(x[0])))),
        "clip": (CLIPLoss(), lambda x: x[:2]),
    }


@pytest.mark.parametrize("name", list(call_each()))
def test_half_precision_and_autocast_give_finite_float32_losses(name):
    loss_fn, build = call_each()[name]
    for dtype in (torch.float16, torch.bfloat16):
        inputs = [x.detach().to(dtype).requires_grad_(True) for x in fields(3)]
        value = loss_fn(*build(inputs))
        value.backward()
        assert value.dtype == torch.float32 and torch.isfinite(value)
        assert all(x.grad is None or torch.isfinite(x.grad).all() for x in inputs)
    encoder = nn.Linear(16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss_fn(*build([encoder(x.detach().float()) for x in fields(3)]))
    value.backward()
    assert torch.isfinite(encoder.weight.grad).all()
    assert all(p.dtype == torch.float32 for p in loss_fn.parameters())


@pytest.mark.parametrize("name", list(call_each()))
def test_an_empty_batch_gives_a_connected_zero(name):
    loss_fn, build = call_each()[name]
    inputs = fields(3, batch=0)
    value = loss_fn(*build(inputs))
    value.backward()
    assert value.item() == 0 and inputs[0].grad is not None


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_call", "error", "message"),
    [
        (lambda: MNRLoss()(torch.randn(8, 4), torch.randn(7, 4)),
         ValueError, r"doc has shape \(7, 4\) but query has shape \(8, 4\)"),
        (lambda: MNRLoss()(torch.randn(8, 4), torch.randn(8, 4), torch.randn(8, 5)),
         ValueError, r"hard_negatives\[0\] has shape \(8, 5\) but query has shape \(8, 4\)"),
        (lambda: MNRLoss()(torch.randn(8), torch.randn(8)), ValueError, "2-D"),
        (lambda: MNRLoss()(torch.ones(8, 4, dtype=torch.long), torch.randn(8, 4)),
         ValueError, "floating-point"),
        (lambda: MNRLoss(scale=0), ValueError, "scale must be > 0, got 0"),
        (lambda: MNRLoss(similarity="euclidean"), ValueError,
         r"unknown similarity 'euclidean': expected one of \['cosine', 'dot'\]"),
        (lambda: CosineSimilarityLoss()(torch.randn(4, 3), torch.randn(4, 3),
                                        torch.tensor([0.0, 0.5, 5.0, 1.0])),
         ValueError, r"scores must lie in \[0, 1\], got 5.0 at row 2"),
        (lambda: CosineSimilarityLoss()(torch.randn(4, 3), torch.randn(4, 3), torch.rand(4, 1)),
         ValueError, r"scores must have shape \(4,\), one value per pair, got shape \(4, 1\)"),
        (lambda: CosineSimilarityLoss("cross_entropy"), ValueError,
         r"unknown loss_fct 'cross_entropy': expected one of \['huber', 'l1', 'mse', "
         r"'smooth_l1'\]"),
        (lambda: CosineEmbeddingLoss()(torch.randn(3, 2), torch.randn(3, 2),
                                       torch.tensor([1, 0, -1])),
         ValueError, r"target must be 1 \(similar\) or -1 \(dissimilar\), got 0.0 at row 1"),
        (lambda: MarginRankingLoss()(torch.randn(3, 2), torch.randn(3, 2), torch.randn(2, 2)),
         ValueError, r"neg has shape \(2, 2\) but query has shape \(3, 2\)"),
        (lambda: MarginMSELoss()(*torch.randn(3, 4, 2), torch.randn(4, 2)),
         ValueError, r"teacher_margin must have shape \(4,\)"),
        (lambda: CLIPLoss()(torch.randn(4, 8), torch.randn(4, 6)),
         ValueError, r"text has shape \(4, 6\) but image has shape \(4, 8\)"),
        (lambda: CLIPLoss(logit_scale_init=200.0), ValueError,
         r"logit_scale_init must be in \[1, max_logit_scale=100.0\], got 200.0"),
        (lambda: CLIPLoss(logit_scale_init=0.5), ValueError, "logit_scale_init"),
        (lambda: MNRLoss(gather_distributed=True)(torch.randn(4, 2), torch.randn(4, 2)),
         RuntimeError, "process group"),
        (lambda: CLIPLoss(gather_distributed=True)(torch.randn(4, 2), torch.randn(4, 2)),
         RuntimeError, "process group"),
    ],
)
def test_bad_input_is_a_clear_error(make_call, error, message):
    with pytest.raises(error, match=message):
        make_call()


def test_gather_none_in_one_process_is_the_plain_loss():
    query, doc = fields(2)
    torch.testing.assert_close(MNRLoss(gather_distributed=None)(query, doc), MNRLoss()(query, doc))
    torch.testing.assert_close(CLIPLoss(gather_distributed=None)(query, doc),
                               CLIPLoss()(query, doc))


# -- gathering across ranks (threads as ranks) ---------------------------------------------


class FakeRanks:
    """``world`` threads in lock-step; the collectives exchange tensors through a barrier.

    The gather concatenates the ranks' tensors with autograd, so a backward pass over the
    sum of every rank's loss gives each rank's inputs the sum of the ranks' gradients, as
    the real gather's all-reduce does.
    """

    def __init__(self, world: int):
        self.world, self.local = world, threading.local()
        self.barrier = threading.Barrier(world, timeout=20)
        self.slots: list = [None] * world

    def _exchange(self, tensor):
        self.slots[self.local.rank] = tensor
        self.barrier.wait()
        everyone = list(self.slots)
        self.barrier.wait()
        return everyone

    def gather_with_grad(self, tensor):
        parts = self._exchange(tensor)
        return Gathered(torch.cat(parts), [len(p) for p in parts], self.local.rank)

    def all_reduce_sum(self, tensor):
        return sum(self._exchange(tensor.detach()))

    def run(self, monkeypatch, step):
        monkeypatch.setattr(_paired, "gather_with_grad", self.gather_with_grad)
        monkeypatch.setattr(_paired, "all_reduce_sum", self.all_reduce_sum)
        monkeypatch.setattr(_paired, "resolve_gather", lambda flag, owner: bool(flag))

        def as_rank(rank):
            self.local.rank = rank
            return step(rank)

        with ThreadPoolExecutor(self.world) as pool:
            return list(pool.map(as_rank, range(self.world)))


GATHER_CASES = {
    "mnrl": (lambda g: MNRLoss(gather_distributed=g), 2),
    "mnrl_hard_negatives": (lambda g: MNRLoss(gather_distributed=g), 4),
    "mnrl_symmetric_negative": (lambda g: MNRLoss(symmetric=True, gather_distributed=g), 3),
    "mnrl_dot": (lambda g: MNRLoss(scale=0.5, similarity="dot", gather_distributed=g), 3),
    "clip": (lambda g: CLIPLoss(gather_distributed=g).double(), 2),
}


@pytest.mark.parametrize("split", [(5, 5), (7, 3), (10, 0)])
@pytest.mark.parametrize("name", list(GATHER_CASES))
def test_gathering_ranks_equals_one_process_on_the_whole_batch(monkeypatch, name, split):
    make_loss, num_fields = GATHER_CASES[name]
    inputs = fields(num_fields, batch=sum(split))
    single = make_loss(False)
    expected, expected_grads = value_and_grads(single, inputs)

    world = len(split)
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    gathering = make_loss(True)
    starts = [sum(split[:r]) for r in range(world)]

    def step(rank):
        rows = slice(starts[rank], starts[rank] + split[rank])
        return gathering(*(leaf[rows] for leaf in leaves))

    values = FakeRanks(world).run(monkeypatch, step)
    for value in values:
        torch.testing.assert_close(value.detach(), expected, **TOL)
    # DDP averages the ranks' gradients: the sum of the ranks' backward passes over W.
    torch.stack(values).sum().backward()
    for leaf, expected_grad in zip(leaves, expected_grads, strict=True):
        torch.testing.assert_close(leaf.grad / world, expected_grad, **TOL)
    for param, expected_param in zip(gathering.parameters(), single.parameters(), strict=True):
        torch.testing.assert_close(param.grad / world, expected_param.grad, **TOL)


# -- registry and configs ------------------------------------------------------------------


def test_registry_lists_every_paired_loss_with_its_batch_shape():
    shapes = {name: entry.inputs for name, entry in PAIR_LOSSES.items()}
    assert shapes == {
        "mnrl": "pair", "cosine_similarity": "pair_score", "cosine_embedding": "pair_target",
        "margin_ranking": "triplet", "margin_mse": "triplet_margin", "clip": "image_text",
    }
    for name, entry in PAIR_LOSSES.items():
        assert get_entry(name) is entry
        has_parameters = any(True for _ in entry.loss_class().parameters())
        assert has_parameters == entry.learnable, name
        assert entry.default_sampler == "random"


def test_every_paired_loss_config_instantiates_its_class():
    builders.register_resolvers()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        configs = {name: compose("train", overrides=[f"loss={name}"]).loss
                   for name in PAIR_LOSSES}
    for name, config in configs.items():
        loss = instantiate(config)
        assert type(loss) is PAIR_LOSSES[name].loss_class, name
    assert instantiate(configs["clip"]).scale == pytest.approx(1 / 0.07, rel=1e-6)
    mnrl = instantiate(configs["mnrl"])   # the pairs data module resolves auto itself
    assert builders.sampler_for(mnrl, "auto") == "auto"
    assert builders.sampler_for(mnrl, "no_duplicates") == "no_duplicates"
    with pytest.raises(ValueError, match="sampler=class does not batch pairs"):
        builders.sampler_for(mnrl, "class")
