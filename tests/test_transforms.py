"""Image transforms: torchvision v2 pipelines sized by the backbone's pretrained config."""

import numpy
import pytest
import timm
import torch
from conftest import REPO
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from lightning_metric.backbones import TimmEncoder
from lightning_metric.encoders import SmallCNN
from lightning_metric.transforms import build_transforms, pretrained_data_config

GREY = {"image_size": 28, "mean": [0.5], "std": [0.25]}


@pytest.fixture(scope="module")
def resnet18() -> TimmEncoder:
    return TimmEncoder("resnet18")


def _photo(height: int = 60, width: int = 80, seed: int = 0) -> torch.Tensor:
    """A smooth uint8 (3, H, W) image, as torchvision.io.decode_image gives one."""
    coarse = torch.rand(1, 3, 6, 8, generator=torch.Generator().manual_seed(seed)) * 255
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")
    return smooth[0].round().clamp(0, 255).to(torch.uint8)


def _step(pipeline: v2.Compose, kind: type) -> v2.Transform:
    return next(t for t in pipeline.transforms if isinstance(t, kind))


def test_defaults_are_the_backbones_pretrained_config(resnet18):
    expected = timm.data.resolve_data_config({}, model=timm.create_model("resnet18"))
    train, evaluation = build_transforms({}, resnet18)
    for pipeline in (train, evaluation):
        normalize = _step(pipeline, v2.Normalize)
        assert tuple(normalize.mean) == expected["mean"]
        assert tuple(normalize.std) == expected["std"]
    crop = _step(train, v2.RandomResizedCrop)
    assert crop.size == expected["input_size"][1:]
    assert crop.interpolation == InterpolationMode(expected["interpolation"])
    assert _step(evaluation, v2.Resize).size == [int(224 / expected["crop_pct"])]
    assert tuple(_step(evaluation, v2.CenterCrop).size) == expected["input_size"][1:]


def test_the_eval_pipeline_matches_timms_own_on_the_same_picture(resnet18):
    _, ours = build_transforms({}, resnet18)
    theirs = timm.data.create_transform(**resnet18.data_config)  # PIL-based
    image = _photo(300, 400)
    expected = theirs(Image.fromarray(image.permute(1, 2, 0).numpy()))
    found = ours(image)
    assert found.shape == expected.shape == (3, 224, 224)
    # PIL and torch round bicubic resizing apart by at most two uint8 levels here and there
    two_levels = 2 / 255 / min(resnet18.data_config["std"])
    assert (found - expected).abs().max() <= two_levels + 1e-6
    assert (found - expected).abs().mean() < 1e-3


def test_shapes_and_dtype_of_both_pipelines_with_overrides(resnet18):
    train, evaluation = build_transforms({"image_size": 32}, resnet18)
    for pipeline in (train, evaluation):
        out = pipeline(_photo())
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
        assert type(out) is torch.Tensor
    rectangular = build_transforms({"image_size": [24, 40]}, resnet18)[1](_photo())
    assert rectangular.shape == (3, 24, 40)
    batch = torch.utils.data.default_collate([train(_photo(seed=i)) for i in range(3)])
    assert batch.shape == (3, 3, 32, 32)


def test_normalisation_values_on_a_hand_made_image():
    image = torch.zeros(3, 4, 4, dtype=torch.uint8)
    image[0], image[1], image[2, :, :2], image[2, :, 2:] = 255, 51, 0, 102
    settings = {"image_size": 4, "crop_fraction": 1.0, "augment": False,
                "mean": [0.5, 0.2, 0.1], "std": [0.5, 0.1, 0.2]}
    out = build_transforms(settings, None)[1](image)
    assert torch.allclose(out[0], torch.full((4, 4), 1.0))           # (1 - 0.5) / 0.5
    assert torch.allclose(out[1], torch.full((4, 4), 0.0), atol=1e-6)  # (0.2 - 0.2) / 0.1
    assert torch.allclose(out[2, :, :2], torch.full((4, 2), -0.5))   # (0 - 0.1) / 0.2
    assert torch.allclose(out[2, :, 2:], torch.full((4, 2), 1.5))    # (0.4 - 0.1) / 0.2


def test_eval_is_deterministic_and_train_is_random(resnet18):
    train, evaluation = build_transforms({"image_size": 32}, resnet18)
    image = _photo()
    assert torch.equal(evaluation(image), evaluation(image))
    torch.manual_seed(0)
    first = train(image)
    assert not torch.equal(first, train(image))
    torch.manual_seed(0)
    assert torch.equal(first, train(image))  # torch's global generator, as DataLoader seeds it


def test_an_encoder_without_a_pretrained_config_needs_size_mean_and_std():
    assert pretrained_data_config(SmallCNN()) is None
    train, evaluation = build_transforms(GREY, SmallCNN())
    grey = torch.randint(0, 256, (1, 32, 32), dtype=torch.uint8)
    assert train(grey).shape == evaluation(grey).shape == (1, 28, 28)
    as_floats = evaluation(grey.float() / 255)  # in-memory float images in [0, 1] work too
    torch.testing.assert_close(as_floats, evaluation(grey), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match=r"transform.image_size/mean/std must be set"):
        build_transforms({}, SmallCNN())
    with pytest.raises(ValueError, match=r"transform.std must be set"):
        build_transforms({"image_size": 28, "mean": [0.5]}, SmallCNN())


def test_images_become_the_encoders_channels(resnet18):
    fixed = {"image_size": 20, "crop_fraction": 1.0, "mean": [0.0], "std": [1.0]}
    photo = _photo(20, 20)
    # an RGB photo (image files are read as RGB) for the one-channel SmallCNN: its luma,
    # ITU-R 601-2 as torchvision and PIL compute it, to a uint8 level
    train, evaluation = build_transforms(fixed, SmallCNN())
    assert train(photo).shape == (1, 20, 20)
    luma = (torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1) * photo).sum(0) / 255
    torch.testing.assert_close(evaluation(photo), luma[None], atol=1 / 255 + 1e-4, rtol=0)
    # a grey image for an RGB backbone: the grey channel three times
    rgb = build_transforms(fixed, resnet18)[1](photo[:1])
    assert rgb.shape == (3, 20, 20) and torch.equal(rgb[0], rgb[1]) and torch.equal(rgb[1], rgb[2])
    # a timm backbone made for grey images (model.in_chans=1)
    gray_resnet = TimmEncoder("resnet18", in_chans=1)
    assert build_transforms(fixed, gray_resnet)[0](photo).shape == (1, 20, 20)
    # the setting wins over the encoder; without an encoder the image keeps its own
    assert build_transforms({**fixed, "channels": 3}, SmallCNN())[1](photo[:1]).shape[0] == 3
    assert build_transforms(fixed, None)[1](photo).shape[0] == 3


@pytest.mark.parametrize(("setting", "message"), [
    ({"imagesize": 32}, r"unknown transform setting\(s\) \['transform.imagesize'\]"),
    ({"interpolation": "cubic"}, "transform.interpolation must be one of"),
    ({"crop_fraction": 1.5}, r"transform.crop_fraction must be in \(0, 1\], got 1.5"),
    ({"image_size": [32]}, "transform.image_size must be a positive int or"),
    ({"scale": [0.5, 0.1]}, "transform.scale must be"),
    ({"color_jitter": [0.1, 0.2]}, "transform.color_jitter must be"),
    ({"mean": [0.5, 0.5], "std": [0.5]}, "differ in length"),
    ({"channels": 2}, r"transform.channels must be 1 \(grayscale\) or 3 \(RGB\), got 2"),
])
def test_bad_settings_name_themselves(setting, message):
    with pytest.raises(ValueError, match=message):
        build_transforms({**GREY, **setting}, SmallCNN())


def _transform_group(option: str, *overrides: str) -> dict:
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"transform={option}", *overrides])
    return OmegaConf.to_container(cfg.transform, resolve=True)


def test_the_default_group_augments_and_eval_only_does_not(resnet18):
    default = _transform_group("default", "transform.image_size=32")
    train, evaluation = build_transforms(default, resnet18)
    assert {type(t) for t in train.transforms} >= {
        v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.ColorJitter, v2.ToDtype, v2.Normalize}
    assert {type(t) for t in evaluation.transforms} >= {v2.Resize, v2.CenterCrop, v2.Normalize}
    plain = _transform_group("eval_only", "transform.mean=[0.1,0.2,0.3]")
    train, evaluation = build_transforms(plain, resnet18)
    assert train is evaluation
    assert list(_step(evaluation, v2.Normalize).mean) == [0.1, 0.2, 0.3]
    image = numpy.asarray(_photo().permute(1, 2, 0))
    assert train(Image.fromarray(image)).shape == (3, 224, 224)  # PIL images too
