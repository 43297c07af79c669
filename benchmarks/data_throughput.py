"""Images per second of training on an image folder: ``data=image_folder`` against a plain loop.

    python -m benchmarks.data_throughput [--images 2000] [--image-size 64] [--workers 2]
        [--epochs 2] [--repeats 3] [--model test_resnet]
    python -m benchmarks.data_throughput --plain-decode torchvision --keep-dir /tmp/fmnist_tree

Writes ``--images`` Fashion-MNIST test images (upscaled to ``--image-size``, RGB JPEG or
PNG) into a class-per-folder tree, once, outside the timing: ``train/`` holds them, and
``val/`` and ``test/`` 4 other images per class, so the recipe trains on every image of
``train/`` as the plain loop does. Then runs each side ``--repeats`` times, alternating
which goes first (recipe, plain; plain, recipe; ...):

- recipe: the real ``python -m recipes.train data=image_folder transform=default
  model=timm loss=triplet sampler=random`` in a subprocess (Lightning, the data module's
  ``torchvision.io.decode_image`` reads, no validation or test, the UMAP plot worker
  off); its ``train/samples_per_second`` (``ThroughputMonitor``, last epoch) is read
  from the run's ``metrics.json``.
- plain: ``torchvision.datasets.ImageFolder`` over ``train/`` (its PIL loader, or
  with ``--plain-decode torchvision`` the recipe's decode), the same train transform
  (``build_transforms`` of ``conf/transform/default.yaml`` on the same ``TimmEncoder``),
  ``DataLoader(shuffle=True, persistent_workers=True)``, the same loss and Adam, timed
  as ``ThroughputMonitor`` times: from the last epoch's first batch to its last step.

Both sides: batch 128, ``--workers`` loader workers, ``--epochs`` epochs, embedding 128.
Per-run lines come first, then a Markdown table of the settings, the median images per
second of each side and their ratio (recipe / plain): near 1 means the data module,
its decode path and Lightning cost nothing over torchvision's ``ImageFolder`` loop; the
target is 0.9 or more. On a shared machine the per-run lines show the noise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from lightning_metric.backbones import TimmEncoder
from lightning_metric.data.fmnist import _images, _labels
from lightning_metric.data.items import read_rgb
from lightning_metric.losses import TripletMarginLoss
from lightning_metric.transforms import build_transforms

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LIGHTNING_METRIC_DATA", REPO.parent / "shared" / "data"))
BATCH = 128
EMBEDDING = 128
HELD_OUT = 4  # images per class in val/ and in test/ (the recipe checks them, never reads them)
MARGIN = 0.05  # conf/loss/triplet.yaml
LR = 1e-3  # conf/optimizer/adam.yaml


# -- the image tree ----------------------------------------------------------------------
def _class_rows(labels: torch.Tensor, images: int) -> list[list[int]]:
    """Per class, the rows for train/ (``images`` in all, spread evenly), then val/, test/."""
    classes = int(labels.max()) + 1
    per_class = [images // classes + (c < images % classes) for c in range(classes)]
    return [torch.where(labels == c)[0][: n + 2 * HELD_OUT].tolist()
            for c, n in enumerate(per_class)]


def _save(pixels: torch.Tensor, path: Path, size: int) -> None:
    """A ``(1, 28, 28)`` float image in [0, 1] as an RGB file of side ``size``."""
    gray = Image.fromarray((pixels[0] * 255).round().byte().numpy())  # uint8 (H, W): L
    gray.resize((size, size), Image.BILINEAR).convert("RGB").save(path)


def write_tree(root: Path, images: int, size: int, suffix: str) -> None:
    """``root/{train,val,test}/class_<c>/<row>.<suffix>`` from the Fashion-MNIST test set."""
    folder = DATA / "fashion-mnist"
    pixels = _images(folder / "t10k-images-idx3-ubyte.gz")
    labels = _labels(folder / "t10k-labels-idx1-ubyte.gz")
    if images > len(labels) - 2 * HELD_OUT * (int(labels.max()) + 1):
        raise ValueError(f"--images {images}: the Fashion-MNIST test set has too few")
    for label, rows in enumerate(_class_rows(labels, images)):
        n_train = len(rows) - 2 * HELD_OUT
        splits = {"train": rows[:n_train], "val": rows[n_train:n_train + HELD_OUT],
                  "test": rows[n_train + HELD_OUT:]}
        for split, split_rows in splits.items():
            target = root / split / f"class_{label}"
            target.mkdir(parents=True, exist_ok=True)
            for row in split_rows:
                _save(pixels[row], target / f"{row:05d}.{suffix}", size)


def prepared_tree(keep_dir: str | None, images: int, size: int, suffix: str,
                  scratch: Path) -> Path:
    """The tree's root: ``keep_dir`` (reused when it holds a tree of these settings), else
    a folder in ``scratch``."""
    settings = {"images": images, "image_size": size, "format": suffix}
    root = Path(keep_dir) if keep_dir else scratch / "tree"
    stamp = root / "settings.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return root
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"--keep-dir {root} holds something else: give an empty folder")
    write_tree(root, images, size, suffix)
    stamp.write_text(json.dumps(settings) + "\n")  # outside train/: ImageFolder never sees it
    return root


# -- the two sides -------------------------------------------------------------------------
def recipe_command(root: Path, run_dir: str, args: argparse.Namespace) -> list[str]:
    return [
        sys.executable, "-m", "recipes.train", f"hydra.run.dir={run_dir}",
        "data=image_folder", f"data.root={root}", f"data.num_workers={args.workers}",
        f"data.batch_size={BATCH}", "sampler=random", "loss=triplet",
        "model=timm", f"model.name={args.model}", "model.pretrained=false",
        f"model.embedding_size={EMBEDDING}",
        "transform=default", f"transform.image_size={args.image_size}",
        f"trainer.max_epochs={args.epochs}", "trainer.accelerator=cpu",
        "trainer.limit_val_batches=0", "test=false", "logger=none",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        # no picture is drawn: keep the plot worker (and its UMAP compilation) off the cores
        "callbacks.embedding_plot.on_test=false", "callbacks.retrieval_pictures.background=false",
    ]


def recipe_throughput(root: Path, args: argparse.Namespace) -> float:
    """``train/samples_per_second`` of the recipe's last epoch."""
    with tempfile.TemporaryDirectory() as run_dir:
        done = subprocess.run(recipe_command(root, run_dir, args), cwd=REPO,
                              env={**os.environ, "LIGHTNING_METRIC_DATA": str(DATA)},
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"recipes.train failed:\n{done.stderr[-3000:]}")
        metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    return metrics["train/samples_per_second"]


def recipe_transform(encoder: nn.Module, image_size: int) -> Callable:
    """The train transform ``transform=default transform.image_size=<size>`` builds."""
    settings = OmegaConf.load(REPO / "conf" / "transform" / "default.yaml")
    settings.image_size = image_size
    return build_transforms(OmegaConf.to_container(settings), encoder)[0]


def plain_loader(root: Path, transform: Callable, args: argparse.Namespace) -> DataLoader:
    # "torchvision": the recipe's decode (torchvision.io.decode_image, RGB uint8 tensors)
    loader = {"pil": {}, "torchvision": {"loader": read_rgb}}[args.plain_decode]
    dataset = ImageFolder(str(root / "train"), transform=transform, **loader)
    return DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=args.workers,
                      persistent_workers=args.workers > 0)


def _epoch(loader: DataLoader, encoder: nn.Module, loss_fn: nn.Module,
           optimizer: torch.optim.Optimizer) -> float:
    """Images per second of one epoch, from its first batch to its last step (as the
    recipe's ``ThroughputMonitor``)."""
    samples, start = 0, None
    for inputs, labels in loader:
        start = time.perf_counter() if start is None else start
        loss = loss_fn(encoder(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        samples += len(labels)
    return samples / (time.perf_counter() - start)


def plain_throughput(root: Path, args: argparse.Namespace) -> float:
    """Images per second of the plain loop's last epoch."""
    torch.manual_seed(0)
    encoder = TimmEncoder(args.model, pretrained=False, embedding_size=EMBEDDING).train()
    loader = plain_loader(root, recipe_transform(encoder, args.image_size), args)
    loss_fn = TripletMarginLoss(margin=MARGIN)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=LR)
    rates = [_epoch(loader, encoder, loss_fn, optimizer) for _ in range(args.epochs)]
    return rates[-1]


# -- the report -----------------------------------------------------------------------------
def table(args: argparse.Namespace, recipe: list[float], plain: list[float]) -> str:
    r, p = statistics.median(recipe), statistics.median(plain)
    return "\n".join([
        "| images | size | format | workers | epochs | model | plain decode "
        f"| recipe images/s (median of {len(recipe)}) | plain images/s (median) "
        "| ratio recipe / plain |",
        "|---:|---:|---|---:|---:|---|---|---:|---:|---:|",
        f"| {args.images} | {args.image_size} | {args.format} | {args.workers} | {args.epochs} "
        f"| {args.model} | {args.plain_decode} | {r:.0f} | {p:.0f} | {r / p:.2f} |",
    ])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="training images")
    parser.add_argument("--image-size", type=int, default=64, help="side of the files and "
                        "of the transforms' output")
    parser.add_argument("--format", choices=("jpg", "png"), default="jpg")
    parser.add_argument("--workers", type=int, default=2, help="loader workers, both sides")
    parser.add_argument("--epochs", type=int, default=2, help="the last one is timed")
    parser.add_argument("--model", default="test_resnet", help="a timm model name (the "
                        "default is tiny, so the data path weighs: resnet18 trains at ~20 "
                        "images/s on 2 CPU cores)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plain-decode", choices=("pil", "torchvision"), default="pil",
                        help="the plain side's reads: ImageFolder's PIL loader, or "
                        "torchvision.io.decode_image as the recipe")
    parser.add_argument("--keep-dir", default=None, help="write (or reuse) the image tree "
                        "here and keep it")
    args = parser.parse_args()
    if args.images < 1 or args.image_size < 8 or args.workers < 0 or args.epochs < 1:
        parser.error("--images and --epochs must be >= 1, --image-size >= 8, --workers >= 0")
    return args


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        root = prepared_tree(args.keep_dir, args.images, args.image_size, args.format,
                             Path(scratch))
        print(f"image tree {root} ({time.perf_counter() - start:.0f} s, not timed)", flush=True)
        recipe, plain = [], []
        for run in range(1, args.repeats + 1):
            sides = {"recipe": lambda: recipe_throughput(root, args),
                     "plain": lambda: plain_throughput(root, args)}
            order = list(sides) if run % 2 else list(sides)[::-1]  # ABBA: drift cancels
            rates = {name: sides[name]() for name in order}
            recipe.append(rates["recipe"])
            plain.append(rates["plain"])
            print(f"  run {run} ({order[0]} first): recipe {recipe[-1]:.0f}  plain "
                  f"{plain[-1]:.0f} images/s  ratio {recipe[-1] / plain[-1]:.2f}", flush=True)
    print(table(args, recipe, plain))


if __name__ == "__main__":
    main()
