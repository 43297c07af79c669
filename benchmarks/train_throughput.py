"""Samples per second of one Fashion-MNIST epoch with ArcFace + its loss optimizer.

    python -m benchmarks.train_throughput [--subset 60000] [--repeats 3]

Runs the real ``python -m recipes.train loss=arcface data=fmnist`` (Lightning,
manual optimization, two optimizers) and a plain PyTorch loop with the same
encoder, loss, optimizers, batch size and data on the same machine, alternating
them, and prints the median throughput of each and their ratio.
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

from lightning_metric.data import FashionMNISTDataModule
from lightning_metric.encoders import SmallCNN
from lightning_metric.losses import ArcFaceLoss

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LIGHTNING_METRIC_DATA", REPO.parent / "shared" / "data"))
BATCH = 128


def recipe_throughput(subset: int) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        subprocess.run(
            [sys.executable, "-m", "recipes.train", f"hydra.run.dir={run_dir}", "loss=arcface",
             "data=fmnist", f"data.subset={subset}", "data.download=false",
             f"data.batch_size={BATCH}", "trainer.max_epochs=1", "trainer.accelerator=cpu",
             "trainer.limit_val_batches=0", "test=false", "logger=none",
             "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"],
            cwd=REPO, env={**os.environ, "LIGHTNING_METRIC_DATA": str(DATA)}, check=True,
            capture_output=True,
        )
        metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    return metrics["train/samples_per_second"]


def plain_loop_throughput(subset: int) -> float:
    torch.manual_seed(0)
    data = FashionMNISTDataModule(DATA / "fashion-mnist", download=False, subset=subset,
                                  batch_size=BATCH, sampler="random")
    data.setup()
    loader = DataLoader(data.train_set, batch_size=BATCH, shuffle=True, drop_last=True)
    encoder, loss_fn = SmallCNN(128), ArcFaceLoss(10, 128)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    loss_optimizer = torch.optim.Adam(loss_fn.parameters(), lr=1e-3)
    samples, start = 0, None
    for inputs, labels in loader:
        start = start or time.perf_counter()
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
    parser.add_argument("--subset", type=int, default=60000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    recipe, plain = [], []
    for _ in range(args.repeats):
        recipe.append(recipe_throughput(args.subset))
        plain.append(plain_loop_throughput(args.subset))
    r, p = statistics.median(recipe), statistics.median(plain)
    print("| run | samples/s (median) |\n|---|---:|")
    print(f"| recipes.train (Lightning, 2 optimizers) | {r:.0f} |")
    print(f"| plain PyTorch loop | {p:.0f} |")
    print(f"| ratio recipe / plain | {r / p:.2f} |")


if __name__ == "__main__":
    main()
