"""DataModules and encoders: splits, protocols, file checks and clear errors."""

import shutil

import pytest
import torch
from conftest import SHARED_DATA

from lightning_metric.data import DigitsDataModule, FashionMNISTDataModule
from lightning_metric.data.fmnist import FILES
from lightning_metric.encoders import MLP, SmallCNN

FMNIST = SHARED_DATA / "fashion-mnist"


def test_fmnist_reads_the_official_files_with_the_right_shapes_and_labels():
    data = FashionMNISTDataModule(FMNIST, download=False, subset=2000)
    data.setup()
    images, labels = data.train_set.tensors
    assert images.shape[1:] == (1, 28, 28) and 0 <= images.min() and images.max() <= 1
    assert len(data.train_set) + len(data.val_set) == 2000
    assert torch.bincount(labels, minlength=10).min() >= 170  # stratified subset
    assert len(data.test_set) == 10_000
    assert data.class_names[9] == "Ankle boot"


def test_class_disjoint_protocol_trains_on_half_and_evaluates_on_the_other_half():
    data = FashionMNISTDataModule(FMNIST, download=False, subset=3000, protocol="class_disjoint")
    data.setup()
    assert data.num_classes == 5
    assert set(data.train_set.tensors[1].tolist()) == {0, 1, 2, 3, 4}
    assert set(data.val_set.tensors[1].tolist()) == {5, 6, 7, 8, 9}
    assert set(data.test_set.tensors[1].tolist()) == {5, 6, 7, 8, 9}


def test_missing_files_offline_name_data_dir_and_the_files(tmp_path):
    data = FashionMNISTDataModule(tmp_path / "empty", download=False)
    with pytest.raises(FileNotFoundError, match=r"data_dir=.*empty.*train-images-idx3-ubyte\.gz"):
        data.prepare_data()


def test_a_corrupt_file_fails_its_md5_check(tmp_path):
    for name in FILES:
        shutil.copy(FMNIST / name, tmp_path / name)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not the official file")
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz has md5"):
        FashionMNISTDataModule(tmp_path, download=False).prepare_data()


def test_digits_splits_are_disjoint_and_cover_every_class():
    data = DigitsDataModule(sampler="random")
    data.setup()
    sizes = [len(data.train_set), len(data.val_set), len(data.test_set)]
    assert sum(sizes) == 1797
    assert set(data.test_set.tensors[1].tolist()) == set(range(10))


def _epoch_batches(data):
    data.setup()
    return list(data.train_dataloader())


def test_a_random_sampler_epoch_sees_every_training_item_once_with_its_last_short_batch():
    data = DigitsDataModule(sampler="random", batch_size=128)
    batches = _epoch_batches(data)
    n = len(data.train_set)
    assert n % 128, "the test needs a training set that is not a multiple of the batch size"
    assert [len(labels) for _, labels in batches] == [128] * (n // 128) + [n % 128]
    seen = torch.cat([images.flatten(1) for images, _ in batches])
    assert torch.equal(seen.unique(dim=0), data.train_set.tensors[0].flatten(1).unique(dim=0))


def test_drop_last_drops_the_short_batch_and_class_balanced_batches_are_always_full():
    data = DigitsDataModule(sampler="random", batch_size=128, drop_last=True)
    batches = _epoch_batches(data)
    assert [len(labels) for _, labels in batches] == [128] * (len(data.train_set) // 128)
    for drop_last in (False, True):
        balanced = _epoch_batches(DigitsDataModule(sampler="class", batch_size=128,
                                                   m_per_class=16, drop_last=drop_last))
        assert {len(labels) for _, labels in balanced} == {128}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sampler": "balanced"}, "data.sampler"),
        ({"protocol": "open_set"}, "data.protocol"),
        ({"val_fraction": 1.5}, "data.val_fraction"),
        ({"batch_size": 30, "m_per_class": 8}, r"data.batch_size \(30\).*data.m_per_class \(8\)"),
        ({"num_classes": 7}, "data.num_classes=7"),
        ({"image_size": 28}, "data.image_size=28, but DigitsDataModule holds images of side 8"),
        ({"subset": 0}, "data.subset"),
    ],
)
def test_bad_data_settings_name_the_setting(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DigitsDataModule(**kwargs)


def test_small_cnn_batch_norm_runs_on_the_pooled_map_and_equals_conv_bn_relu_pool():
    torch.manual_seed(0)
    encoder = SmallCNN(16, image_size=28, batch_norm=True)
    norms = [m for m in encoder.features if isinstance(m, torch.nn.BatchNorm2d)]
    seen = []
    for norm in norms:
        norm.register_forward_hook(lambda _, inputs, __: seen.append(tuple(inputs[0].shape)))
    images = torch.rand(5, 1, 28, 28)
    encoder(images)
    assert seen == [(5, 32, 14, 14), (5, 64, 7, 7)]
    # The usual block order (conv - BN - ReLU - pool) computes the same function for
    # a positive BN scale: check it with random statistics in eval mode.
    encoder.eval()
    for norm in norms:
        norm.weight.data.uniform_(0.5, 2)
        norm.bias.data.normal_()
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2)
    convs = [m for m in encoder.features if isinstance(m, torch.nn.Conv2d)]
    usual = images
    for conv, norm in zip(convs, norms, strict=True):
        usual = torch.nn.functional.max_pool2d(torch.relu(norm(conv(usual))), 2)
    torch.testing.assert_close(encoder(images), encoder.head(usual.flatten(1)))


def test_encoders_give_embeddings_of_the_configured_size():
    assert SmallCNN(16)(torch.randn(3, 1, 28, 28)).shape == (3, 16)
    assert SmallCNN(16, image_size=8, batch_norm=True)(torch.randn(3, 1, 8, 8)).shape == (3, 16)
    normalized = SmallCNN(8, image_size=8, normalize=True)(torch.randn(4, 64))
    torch.testing.assert_close(normalized.norm(dim=1), torch.ones(4))
    with pytest.raises(ValueError, match=r"SmallCNN\(image_size=28\) expects \(B, 1, 28, 28\)"):
        SmallCNN(16)(torch.randn(3, 1, 8, 8))
    with pytest.raises(ValueError, match="image_size must be a positive multiple of 4, got 30"):
        SmallCNN(16, image_size=30)
    assert MLP(64, 8)(torch.randn(2, 1, 8, 8)).shape == (2, 8)
    with pytest.raises(ValueError, match="in_features=64"):
        MLP(64, 8)(torch.randn(2, 1, 28, 28))
    with pytest.raises(ValueError, match="embedding_size must be positive"):
        MLP(64, 0)
