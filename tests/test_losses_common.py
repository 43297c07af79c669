"""Properties every loss of the registry shares: configs, half precision, bad input, zero loss."""

import pytest
import torch
from conftest import REPO
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from pytorch_metric_learning import losses as pml_losses
from torch import nn

from lightning_metric import builders, losses
from lightning_metric.losses.registry import LOSSES, get_entry, resolve_sampler

NAMES = sorted(LOSSES)
LABELLED = [n for n in NAMES if LOSSES[n].inputs == "labelled"]
CLASSES, DIM = 4, 8

# Losses whose constructor is not (num_classes, embedding_size) nor () (PML's signatures).
MAKERS = {
    "manifold": lambda: losses.ManifoldLoss(l=DIM, K=CLASSES),
    "p2sgrad": lambda: losses.P2SGradLoss(descriptors_dim=DIM, num_classes=CLASSES),
    "ranked_list": lambda: losses.RankedListLoss(margin=0.4, Tn=5),
    "self_supervised": lambda: losses.SelfSupervisedLoss(losses.NTXentLoss()),
}
PML_MAKERS = {"ranked_list": lambda: pml_losses.RankedListLoss(margin=0.4, Tn=5)}


def make(name: str) -> nn.Module:
    entry = LOSSES[name]
    if name in MAKERS:
        return MAKERS[name]()
    if entry.learnable:
        return entry.loss_class(num_classes=CLASSES, embedding_size=DIM)
    return entry.loss_class()


def batch(dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(16, DIM, generator=generator).to(dtype).requires_grad_(True)
    return embeddings, torch.arange(CLASSES).repeat_interleave(4)


def call(name: str, loss_fn: nn.Module, embeddings, labels):
    """The loss on a batch, called the way its registry entry says (two views: the halves)."""
    inputs = LOSSES[name].inputs
    if inputs == "two_views":
        return loss_fn(embeddings[: len(embeddings) // 2], embeddings[len(embeddings) // 2 :])
    if inputs == "embeddings":
        return loss_fn(embeddings)
    return loss_fn(embeddings, labels)


@pytest.mark.parametrize("name", NAMES)
def test_every_loss_config_instantiates_its_class(name):
    builders.register_resolvers()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"loss={name}"])
    loss = instantiate(cfg.loss)
    assert type(loss) is LOSSES[name].loss_class
    if name == "manifold":
        assert loss.l == cfg.model.embedding_size
    elif LOSSES[name].learnable:
        assert loss.num_classes == 10 and loss.embedding_size == cfg.model.embedding_size


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_half_precision_gives_finite_values_and_gradients(name, dtype):
    loss_fn = make(name)
    embeddings, labels = batch(dtype)
    value = call(name, loss_fn, embeddings, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(embeddings.grad).all()
    assert all(p.dtype == torch.float32 for p in loss_fn.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_autocast_bf16_with_an_encoder_gives_finite_gradients(name):
    encoder, loss_fn = nn.Linear(DIM, DIM), make(name)
    inputs, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = call(name, loss_fn, encoder(inputs.detach()), labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(encoder.weight.grad).all()
    for param in loss_fn.parameters():
        assert param.dtype == torch.float32
        assert param.grad is None or torch.isfinite(param.grad).all()


@pytest.mark.parametrize("name", [n for n in NAMES if LOSSES[n].contrastive])
def test_a_batch_without_positive_pairs_matches_pml_and_backpropagates(name):
    embeddings, _ = batch(torch.float64)
    labels = torch.arange(16)
    value = make(name)(embeddings, labels)
    value.backward()
    make_pml = PML_MAKERS.get(name, getattr(pml_losses, LOSSES[name].loss_class.__name__))
    expected = make_pml()(embeddings.detach(), labels)
    if torch.isnan(expected):  # PML's NCALoss divides 0 by 0 here; ours has nothing to learn
        expected = torch.zeros_like(expected)
    torch.testing.assert_close(value, expected.to(value.dtype))
    assert embeddings.grad is not None and torch.isfinite(embeddings.grad).all()
    if expected == 0:
        assert torch.equal(embeddings.grad, torch.zeros_like(embeddings))


# NCA and FastAP use an indices tuple as per-item weights, where an empty one means "all";
# InstanceLoss, PNPLoss and RankedListLoss refuse any indices tuple, as PML's do.
@pytest.mark.parametrize(
    "name",
    [n for n in NAMES if LOSSES[n].contrastive
     and n not in ("nca", "fast_ap", "instance", "pnp", "ranked_list")],
)
def test_empty_indices_tuple_gives_a_zero_that_backpropagates(name):
    embeddings, labels = batch()
    empty = torch.empty(0, dtype=torch.long)
    value = make(name)(embeddings, labels, (empty, empty, empty))
    value.backward()
    assert value.item() == 0
    assert torch.equal(embeddings.grad, torch.zeros_like(embeddings))


@pytest.mark.parametrize("name", LABELLED)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((torch.randn(16), torch.zeros(16, dtype=torch.long)), "2-D"),
        ((torch.randn(16, DIM), torch.zeros(15, dtype=torch.long)), "same length"),
    ],
)
def test_bad_input_is_a_clear_value_error(name, args, message):
    with pytest.raises(ValueError, match=message):
        make(name)(*args)


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("self_supervised", (torch.randn(16), torch.randn(16)), "2-D"),
        ("self_supervised", (torch.randn(16, DIM), torch.randn(15, DIM)), "same length"),
        ("vicreg", (torch.randn(16), torch.randn(16)), "2-D"),
        ("vicreg", (torch.randn(16, DIM), torch.randn(15, DIM)), "same length"),
        ("manifold", (torch.randn(16),), "2-D"),
        ("manifold", (torch.randn(16, DIM + 1),), f"l={DIM}"),
        ("manifold", (torch.randn(16, DIM), torch.zeros(16, dtype=torch.long)), "no labels"),
    ],
)
def test_bad_input_of_losses_without_labels_is_a_clear_value_error(name, args, message):
    with pytest.raises(ValueError, match=message):
        make(name)(*args)


def test_sampler_rule_follows_the_spec():
    assert resolve_sampler("auto", "arcface") == "random"
    assert resolve_sampler("class", "arcface") == "class"
    assert resolve_sampler("auto", "triplet") == "class"
    assert resolve_sampler("random", "triplet") == "class"  # contrastive: always class
    with pytest.raises(ValueError, match="unknown sampler 'balanced'"):
        resolve_sampler("balanced", "triplet")
    with pytest.raises(ValueError, match="unknown loss 'arc'"):
        get_entry("arc")


def test_registry_knows_which_losses_are_learnable():
    for name in NAMES:
        has_parameters = any(True for _ in make(name).parameters())
        assert has_parameters == LOSSES[name].learnable, name
