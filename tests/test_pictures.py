"""Worst-query pictures: real PNGs with the right frames, the worst queries first."""

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_metric import losses
from lightning_metric.callbacks import RetrievalMetrics, RetrievalPictures
from lightning_metric.data import DigitsDataModule, IndexedDataset
from lightning_metric.encoders import MLP
from lightning_metric.module import MetricLearningModule
from lightning_metric.pictures import (
    MISSED,
    RIGHT,
    WRONG,
    QueryRow,
    draw_worst_queries,
    worst_queries,
    worst_queries_markdown,
)


def _has_colour(pixels: np.ndarray, colour: str, tolerance: int = 12) -> bool:
    rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    return bool((np.abs(pixels[..., :3].astype(int) - rgb).max(-1) <= tolerance).any())


def test_worst_queries_lowest_first_ties_in_order_nan_never():
    ap = torch.tensor([0.5, float("nan"), 0.1, 0.1, 0.9, 0.0])
    assert worst_queries(ap, 3).tolist() == [5, 2, 3]
    assert worst_queries(ap, 10).tolist() == [5, 2, 3, 0, 4]
    with pytest.raises(ValueError, match=">= 1"):
        worst_queries(ap, 0)


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 16, 16), (64,)])
def test_grid_is_a_real_picture_with_green_red_and_blue_frames(tmp_path, shape):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(20, *shape, generator=generator)
    rows = [QueryRow(0, 1, 0.1, (1, 2, 3), (True, False, False), (4, 5)),
            QueryRow(6, 2, 0.4, (7, 8, 9), (False, True, True))]
    path = draw_worst_queries(rows, lambda i: images[i], tmp_path / "worst.png",
                              class_names=["a", "b", "c"])
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.shape[0] > 150 and pixels.shape[1] > 400
    assert pixels.std() > 20   # not blank
    assert all(_has_colour(pixels, colour) for colour in (RIGHT, WRONG, MISSED))


def test_captions_among_images_are_written_into_their_tiles(tmp_path):
    image = torch.zeros(3, 16, 16)          # black: any dark pixel in a text tile is its text
    captions = {1: "a dog on a red sofa", 2: "", 3: "word " * 200}
    rows = [QueryRow(0, 1, 0.5, (1, 2, 3), (True, False, False))]
    path = draw_worst_queries(rows, lambda i: captions.get(i, image), tmp_path / "mixed.png",
                              tile=96)
    pixels = np.asarray(Image.open(path).convert("L")).astype(int)
    cell, top = 96 + 8, 12 + 8
    inside = [pixels[top + 4 + 12 + 6: top + 4 + 12 + 96 - 6, c * cell + 4 + 6: c * cell + 96 - 2]
              for c in range(4)]
    assert inside[0].max() == 0                   # the query image, black
    assert (inside[1] < 128).any() and (inside[1] > 200).mean() > 0.5   # text on white
    assert (inside[2] > 200).all()                # an empty caption: a white tile
    assert (inside[3] < 128).mean() < 0.5         # a long text cut to the tile


def test_grid_without_rows_fails(tmp_path):
    with pytest.raises(ValueError, match="no query"):
        draw_worst_queries([], lambda i: torch.zeros(1, 4, 4), tmp_path / "x.png")


def test_markdown_marks_right_and_wrong_and_escapes_pipes():
    rows = [QueryRow(0, 1, 0.25, (1, 2), (False, True), (3,))]
    texts = ["a | query", "wrong one", "right one", "missed one"]
    table = worst_queries_markdown(rows, texts.__getitem__, class_names=["x", "cats"])
    line = table.splitlines()[2]
    assert line == "| a \\| query | cats | 0.25 | ✗ wrong one<br>✓ right one | missed one |"


# -- the callback, through a real Trainer -------------------------------------------------------


class _HandMade(pl.LightningDataModule):
    """2x2 one-channel images whose flattened pixels are the embeddings: label 0 near the
    first axis, label 1 near the second, and item 3 (label 0) among the label-1 items."""

    def setup(self, stage=None):
        pixels = torch.tensor([
            [1.0, 0.0, 0.0, 0.0], [1.0, 0.1, 0.0, 0.0], [1.0, 0.0, 0.1, 0.0],
            [0.05, 1.0, 0.0, 0.0],
            [0.0, 1.0, 0.1, 0.0], [0.0, 1.0, 0.0, 0.2], [0.1, 1.0, 0.0, 0.0],
        ])
        self.val_set = self.test_set = TensorDataset(
            pixels.reshape(-1, 1, 2, 2), torch.tensor([0, 0, 0, 0, 1, 1, 1]))
        self.class_names = ("zero", "one")

    def val_dataloader(self):
        return DataLoader(IndexedDataset(self.val_set), batch_size=3)

    def test_dataloader(self):
        return self.val_dataloader()


@pytest.mark.parametrize("background", [False, True])
def test_the_query_whose_neighbours_are_all_wrong_is_drawn_first(tmp_path, background):
    pictures = RetrievalPictures(num_queries=2, top_k=3, background=background)
    module = MetricLearningModule(nn.Flatten(), losses.ContrastiveLoss())
    trainer = pl.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[pictures, RetrievalMetrics(k=None, top_k=5)])
    trainer.test(module, datamodule=_HandMade(), verbose=False)
    first = pictures.drawn["test"][0]
    assert first.query == 3 and first.label == 0
    assert first.retrieved == (6, 4, 5) and first.relevant == (False, False, False)
    assert first.missed == (0, 1, 2)
    assert [p.name for p in pictures.written] == ["test.png"]
    pixels = np.asarray(Image.open(pictures.written[0]).convert("RGB"))
    assert pixels.shape[0] > 150 and pixels.std() > 20
    assert _has_colour(pixels, WRONG) and _has_colour(pixels, MISSED)


def test_digits_training_writes_a_picture_every_validation_and_at_test(tmp_path):
    datamodule = DigitsDataModule(batch_size=64, m_per_class=8, eval_batch_size=200)
    pictures = RetrievalPictures(every_n_epochs=1)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, default_root_dir=tmp_path,
                         enable_checkpointing=False, enable_progress_bar=False,
                         limit_train_batches=3, callbacks=[RetrievalMetrics(), pictures])
    module = MetricLearningModule(MLP(64, 8), losses.TripletMarginLoss())
    trainer.fit(module, datamodule=datamodule)
    trainer.test(module, datamodule=datamodule, verbose=False)
    assert [p.name for p in pictures.written] == ["val_epoch_000.png", "val_epoch_001.png",
                                                   "test.png"]
    assert all(p.parent == tmp_path / "pictures" for p in pictures.written)
    rows = pictures.drawn["test"]
    assert len(rows) == 8
    ap = [row.average_precision for row in rows]
    assert ap == sorted(ap)


def test_pictures_need_the_metrics_callback_and_sane_counts(tmp_path):
    with pytest.raises(ValueError, match="top_k"):
        RetrievalPictures(top_k=0)
    trainer = pl.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, callbacks=[RetrievalPictures()])
    with pytest.raises(ValueError, match="RetrievalMetrics"):
        trainer.test(MetricLearningModule(nn.Flatten(), losses.ContrastiveLoss()),
                     datamodule=_HandMade(), verbose=False)
