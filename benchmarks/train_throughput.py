"""Samples per second of training with ArcFace + its loss optimizer: recipe against plain loop.

    python -m benchmarks.train_throughput [--data fmnist] [--subset 60000] [--repeats 3]
    python -m benchmarks.train_throughput --data digits --epochs 10 --repeats 5

Runs the real ``python -m recipes.train loss=arcface data=<data>`` (Lightning,
manual optimization, two optimizers, the default callbacks less validation) and a
plain PyTorch loop with the same encoder (the recipe's default ``SmallCNN``), loss,
optimizers, batch size and data on the same machine, alternating them, and prints
the median throughput of each (training items per second of the last epoch) and
their ratio: the price of Lightning and the recipe around the same computation.
(``benchmarks.train_quality`` compares with the textbook PML loop's own model.)
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
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from lightning_metric.data import DigitsDataModule, FashionMNISTDataModule
from lightning_metric.encoders import SmallCNN
from lightning_metric.losses import ArcFaceLoss

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LIGHTNING_METRIC_DATA", REPO.parent / "shared" / "data"))
BATCH = 128


def recipe_throughput(data: str, subset: int | None, epochs: int) -> float:
    options = [f"data.subset={subset}"] if subset else []
    if data == "fmnist":
        options.append("data.download=false")
    with tempfile.TemporaryDirectory() as run_dir:
        subprocess.run(
            [sys.executable, "-m", "recipes.train", f"hydra.run.dir={run_dir}", "loss=arcface",
             f"data={data}", *options, f"data.batch_size={BATCH}",
             f"trainer.max_epochs={epochs}", "trainer.accelerator=cpu",
             "trainer.limit_val_batches=0", "test=false", "logger=none",
             "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
             # no UMAP worker compiling beside the training (test=false draws nothing)
             "callbacks.embedding_plot.on_test=false"],
            cwd=REPO, env={**os.environ, "LIGHTNING_METRIC_DATA": str(DATA)}, check=True,
            capture_output=True,
        )
        metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    return metrics["train/samples_per_second"]


def plain_loop_throughput(data: str, subset: int | None, epochs: int) -> float:
    torch.manual_seed(0)
    if data == "fmnist":
        datamodule = FashionMNISTDataModule(DATA / "fashion-mnist", download=False,
                                            subset=subset, val_fraction=0.05)
    else:
        datamodule = DigitsDataModule(subset=subset, val_fraction=0.05)
    datamodule.setup()
    loader = DataLoader(datamodule.train_set, batch_size=BATCH, shuffle=True)
    encoder = SmallCNN(128, image_size=datamodule.image_size)
    loss_fn = ArcFaceLoss(datamodule.num_classes, 128)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    loss_optimizer = torch.optim.Adam(loss_fn.parameters(), lr=1e-3)
    for _ in range(epochs):  # the last epoch is timed, as the recipe's
        samples, start = 0, time.perf_counter()
        for inputs, labels in loader:
            loss = loss_fn(encoder(inputs), labels)
            optimizer.zero_grad()
            loss_optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_optimizer.step()
            samples += len(labels)
    return samples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=("fmnist", "digits"), default="fmnist")
    parser.add_argument("--subset", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    recipe, plain = [], []
    for _ in range(args.repeats):
        recipe.append(recipe_throughput(args.data, args.subset, args.epochs))
        plain.append(plain_loop_throughput(args.data, args.subset, args.epochs))
        print(f"  recipe {recipe[-1]:.0f}  plain {plain[-1]:.0f} samples/s", flush=True)
    r, p = statistics.median(recipe), statistics.median(plain)
    print("| run | samples/s (median) |\n|---|---:|")
    print(f"| recipes.train (Lightning, 2 optimizers) | {r:.0f} |")
    print(f"| plain PyTorch loop | {p:.0f} |")
    print(f"| ratio recipe / plain | {r / p:.2f} |")


if __name__ == "__main__":
    main()
