"""Worst-query pictures: real PNGs with the right frames, the worst queries first."""

import numpy as np
import pytest
import torch
from PIL import Image

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


def test_grid_without_rows_fails(tmp_path):
    with pytest.raises(ValueError, match="no query"):
        draw_worst_queries([], lambda i: torch.zeros(1, 4, 4), tmp_path / "x.png")


def test_markdown_marks_right_and_wrong_and_escapes_pipes():
    rows = [QueryRow(0, 1, 0.25, (1, 2), (False, True), (3,))]
    texts = ["a | query", "wrong one", "right one", "missed one"]
    table = worst_queries_markdown(rows, texts.__getitem__, class_names=["x", "cats"])
    line = table.splitlines()[2]
    assert line.startswith("| a \\| query | cats | 0.25 | ✗ wrong one<br>✓ right one | missed one |")
