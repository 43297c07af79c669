"""Test retrieval quality and training throughput: the recipe against a plain PyTorch + PML loop.

    python -m benchmarks.train_quality                       # FMNIST 5 epochs, digits 10, seed 0
    python -m benchmarks.train_quality --seeds 0 1 2         # mean +- std over three seeds
    python -m benchmarks.train_quality --datasets digits --losses arcface triplet \\
        --epochs-digits 1 --seeds 0                          # a smoke run (1-2 minutes)
    python -m benchmarks.train_quality --datasets fmnist --subset 5000   # a quick FMNIST run

For each data set (Fashion-MNIST, scikit-learn's digits), loss (ArcFace, CosFace,
Triplet) and seed, it runs, one after the other so the machine's noise falls on both:

- **recipe**: the real ``python -m recipes.train loss=<loss> data=<data>
  trainer.max_epochs=<E> seed=<S> logger=none trainer.accelerator=cpu
  trainer.enable_progress_bar=false [data.download=false] [data.subset=N]`` in a
  subprocess, every other setting at its default (encoder, embedding size, batch
  size, sampler, optimizers, validation split, best-checkpoint testing), and reads
  ``test/precision_at_1``, ``test/mean_average_precision_at_r`` and
  ``train/samples_per_second`` from the run's ``metrics.json``;
- **plain**: the loop a PML user writes: a two-conv CNN to 128 dimensions, PML's
  ``ArcFaceLoss`` / ``CosFaceLoss`` / ``TripletMarginLoss`` with their defaults
  (Triplet on ``MPerClassSampler(m=16)`` batches), Adam at 1e-3 for the encoder and
  the loss's weights, batch 128, every training item, the same epochs and seed,
  evaluated after the last epoch.

Both are scored by the same ruler, :func:`lightning_metric.evaluation.retrieval_metrics`
(cosine, ``k="max_bin_count"``), on the same test set retrieving from itself (the
official 10k FMNIST test images; the digits' fixed stratified 20%). Samples per
second count training items over training wall time only (no evaluation); both
sides use ``--threads`` CPU threads (the recipe through ``OMP_NUM_THREADS``).

How to read the table: the quality columns say whether the recipe's defaults
train at least as good an embedding as the textbook PML loop on the same budget
(the last lines answer it per row); the throughput ratio recipe/plain is the
price (< 1) or gain (> 1) of Lightning, callbacks and the recipe's own model.
Two caveats: the recipe holds out 5% of the training items for validation and
tests its best validation checkpoint, while the plain loop trains on everything
and tests its last epoch; the recipe's ``train/samples_per_second`` is that of
its last epoch, the plain loop's is over all epochs (the per-run lines also give
the plain loop's last epoch).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pytorch_metric_learning import losses, samplers
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_metric.data import DigitsDataModule, FashionMNISTDataModule
from lightning_metric.evaluation import retrieval_metrics

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LIGHTNING_METRIC_DATA", REPO.parent / "shared" / "data"))
DATASETS = ("fmnist", "digits")
LOSSES = ("arcface", "cosface", "triplet")
QUALITY = ("precision_at_1", "mean_average_precision_at_r")


@dataclass
class Run:
    precision_at_1: float
    mean_average_precision_at_r: float
    samples_per_second: float
    seconds: float


# -- the recipe ----------------------------------------------------------------------------------


def recipe_run(data: str, loss: str, epochs: int, seed: int, subset: int | None,
               threads: int) -> Run:
    overrides = [f"loss={loss}", f"data={data}", f"trainer.max_epochs={epochs}", f"seed={seed}",
                 "logger=none", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
                 # no UMAP worker compiling beside the training: the picture changes no metric
                 "callbacks.embedding_plot.on_test=false"]
    if data == "fmnist":
        overrides.append("data.download=false")
    if subset is not None:
        overrides.append(f"data.subset={subset}")
    env = {**os.environ, "LIGHTNING_METRIC_DATA": str(DATA), "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "WANDB_SILENT": "true"}
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "recipes.train", f"hydra.run.dir={run_dir}", *overrides],
            cwd=REPO, env=env, capture_output=True, text=True, check=False,
        )
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"recipes.train {' '.join(overrides)} failed:\n"
                               f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    missing = [key for key in ("test/precision_at_1", "test/mean_average_precision_at_r",
                               "train/samples_per_second") if key not in metrics]
    if missing:
        print(f"  warning: metrics.json of the recipe lacks {missing}", flush=True)
    return Run(metrics.get("test/precision_at_1", math.nan),
               metrics.get("test/mean_average_precision_at_r", math.nan),
               metrics.get("train/samples_per_second", math.nan), seconds)


# -- the plain loop ------------------------------------------------------------------------------


def load_data(data: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The full train split and the test split, as the recipe's DataModules read them."""
    if data == "fmnist":
        return FashionMNISTDataModule(DATA / "fashion-mnist", download=False).load_splits()
    return DigitsDataModule().load_splits()


def plain_run(splits: tuple[Tensor, Tensor, Tensor, Tensor], loss: str, epochs: int, seed: int,
              subset: int | None) -> tuple[Run, float]:
    """``(run, last epoch's samples/s)`` of the textbook PML loop."""
    train_x, train_y, test_x, test_y = splits
    if subset is not None:
        keep = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed))[:subset]
        train_x, train_y = train_x[keep], train_y[keep]
    start = time.perf_counter()
    torch.manual_seed(seed)
    np.random.seed(seed)  # MPerClassSampler draws from numpy's global generator
    side = train_x.shape[-1]
    encoder = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * (side // 4) * (side // 4), 128),
    )
    dataset = TensorDataset(train_x, train_y)
    if loss == "triplet":
        loss_fn = losses.TripletMarginLoss()
        sampler = samplers.MPerClassSampler(train_y, m=16, length_before_new_iter=len(train_y))
        loader = DataLoader(dataset, batch_size=128, sampler=sampler)
    else:
        loss_class = losses.ArcFaceLoss if loss == "arcface" else losses.CosFaceLoss
        loss_fn = loss_class(num_classes=10, embedding_size=128)
        loader = DataLoader(dataset, batch_size=128, shuffle=True)
    optimizers = [torch.optim.Adam(encoder.parameters(), lr=1e-3)]
    if list(loss_fn.parameters()):
        optimizers.append(torch.optim.Adam(loss_fn.parameters(), lr=1e-3))
    samples, train_seconds, last_rate = 0, 0.0, math.nan
    for _ in range(epochs):
        encoder.train()
        epoch_samples, epoch_start = 0, time.perf_counter()
        for inputs, labels in loader:
            loss_value = loss_fn(encoder(inputs), labels)
            for optimizer in optimizers:
                optimizer.zero_grad()
            loss_value.backward()
            for optimizer in optimizers:
                optimizer.step()
            epoch_samples += len(labels)
        epoch_seconds = time.perf_counter() - epoch_start
        samples, train_seconds = samples + epoch_samples, train_seconds + epoch_seconds
        last_rate = epoch_samples / epoch_seconds
    encoder.eval()
    with torch.no_grad():
        embeddings = torch.cat([encoder(batch) for batch in test_x.split(1024)])
    metrics = retrieval_metrics(embeddings, test_y, distance="cosine", k="max_bin_count",
                                include=QUALITY)
    run = Run(metrics["precision_at_1"], metrics["mean_average_precision_at_r"],
              samples / train_seconds, time.perf_counter() - start)
    return run, last_rate


# -- the report ----------------------------------------------------------------------------------


def summary(values: list[float], digits: int) -> str:
    """The value for one seed, ``mean ± std`` for several."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def centre(values: list[float]) -> float:
    return values[0] if len(values) == 1 else statistics.mean(values)


def report(rows: list[tuple[str, str, int, list[int], list[Run], list[Run]]]) -> str:
    lines = [
        "| data | loss | epochs | seeds | recipe P@1 | plain P@1 | recipe MAP@R | plain MAP@R "
        "| recipe samples/s | plain samples/s | throughput ratio recipe/plain |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for data, loss, epochs, seeds, recipe, plain in rows:
        column = {
            side: {name: [getattr(run, name) for run in runs]
                   for name in (*QUALITY, "samples_per_second")}
            for side, runs in (("recipe", recipe), ("plain", plain))
        }
        ratios = [r.samples_per_second / p.samples_per_second
                  for r, p in zip(recipe, plain, strict=True)]
        lines.append(
            f"| {data} | {loss} | {epochs} | {' '.join(map(str, seeds))} "
            f"| {summary(column['recipe']['precision_at_1'], 3)} "
            f"| {summary(column['plain']['precision_at_1'], 3)} "
            f"| {summary(column['recipe']['mean_average_precision_at_r'], 3)} "
            f"| {summary(column['plain']['mean_average_precision_at_r'], 3)} "
            f"| {summary(column['recipe']['samples_per_second'], 0)} "
            f"| {summary(column['plain']['samples_per_second'], 0)} "
            f"| {summary(ratios, 2)} |"
        )
        answers = []
        for name, short in zip(QUALITY, ("P@1", "MAP@R"), strict=True):
            ours, theirs = centre(column["recipe"][name]), centre(column["plain"][name])
            answers.append(f"{short} {'yes' if ours >= theirs else 'NO'} "
                           f"({ours:.3f} vs {theirs:.3f})")
        verdicts.append(f"- {data} / {loss}: recipe at least as good as plain? "
                        + ", ".join(answers))
    return "\n".join(lines + ["", *verdicts])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs-fmnist", type=int, default=5)
    parser.add_argument("--epochs-digits", type=int, default=10)
    parser.add_argument("--subset", type=int, default=None,
                        help="training items (recipe: data.subset, 5%% of them for validation)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of both sides")
    args = parser.parse_args()
    if args.subset is not None and args.subset < 2:
        raise ValueError(f"--subset must be at least 2 training items, got {args.subset}")
    torch.set_num_threads(args.threads)
    epochs = {"fmnist": args.epochs_fmnist, "digits": args.epochs_digits}
    rows = []
    for data in args.datasets:
        splits = load_data(data)
        for loss in args.losses:
            recipe, plain = [], []
            for seed in args.seeds:
                recipe.append(recipe_run(data, loss, epochs[data], seed, args.subset,
                                         args.threads))
                r = recipe[-1]
                print(f"{data} {loss} seed={seed} recipe: P@1 {r.precision_at_1:.4f} "
                      f"MAP@R {r.mean_average_precision_at_r:.4f} "
                      f"{r.samples_per_second:.0f} samples/s (last epoch), "
                      f"{r.seconds:.0f} s in all", flush=True)
                run, last_rate = plain_run(splits, loss, epochs[data], seed, args.subset)
                plain.append(run)
                print(f"{data} {loss} seed={seed} plain:  P@1 {run.precision_at_1:.4f} "
                      f"MAP@R {run.mean_average_precision_at_r:.4f} "
                      f"{run.samples_per_second:.0f} samples/s ({last_rate:.0f} last epoch), "
                      f"{run.seconds:.0f} s in all", flush=True)
            rows.append((data, loss, epochs[data], args.seeds, recipe, plain))
    print()
    print(report(rows), flush=True)


if __name__ == "__main__":
    main()
