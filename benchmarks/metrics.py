"""Time and peak memory of our retrieval metrics against PML's AccuracyCalculator.

    python -m benchmarks.metrics                                   # N in 5000 20000 100000
    python -m benchmarks.metrics --sizes 20000 --pml-max-n 20000   # try PML further (capped)

Self-retrieval of the same random clustered embeddings (128-D, about 100 items a class,
Gaussian clusters), every metric of both libraries (NMI and AMI included), ours with
``distance="euclidean"`` so that both rank by the same L2 distance and must give the same
numbers (the last column: largest difference over PML's metrics). Each (library, N, k)
case runs in a fresh process with 2 torch and 2 FAISS threads, so peak memory (growth of
the peak RSS) is measured per case. With its default ``k=None`` PML needs ~1.6 GB at
N=5000 and more than 8 GB at 20000, so it runs only up to ``--pml-max-n``, under
``--memory-cap-gb``; ``k=None`` (rank the whole set) runs only up to ``--full-max-n``.
Prints a markdown table of medians and ratios ours/PML (below 1 is better).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from benchmarks._measure import cap_memory, measure, run_isolated

DIM = 128
ITEMS_PER_CLASS = 100
NOISE = 1.5


def clustered_embeddings(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    num_classes = max(2, n // ITEMS_PER_CLASS)
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    centres = torch.randn(num_classes, DIM, generator=generator)
    return centres[labels] + NOISE * torch.randn(n, DIM, generator=generator), labels


def worker(library: str, n: int, k: str, memory_cap_gb: float) -> dict:
    import faiss

    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)
    cap_memory(memory_cap_gb)
    k_value = None if k == "None" else k
    embeddings, labels = clustered_embeddings(n)
    if library == "ours":
        from lightning_metric.evaluation import retrieval_metrics

        def evaluate():
            return retrieval_metrics(embeddings, labels, distance="euclidean", k=k_value)
    else:
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        calculator = AccuracyCalculator(k=k_value, device=torch.device("cpu"))

        def evaluate():
            return calculator.get_accuracy(embeddings, labels)

    results = {}
    seconds, peak_mb = measure(lambda: results.update(evaluate()), "cpu", min_runs=5, budget_s=20)
    return {"seconds": seconds, "peak_mb": peak_mb, "metrics": results}


def ratio(ours: float, theirs: float, floor: float = 0.0) -> str:
    return f"{max(ours, floor) / max(theirs, floor):.2f}" if max(theirs, floor) > 0 else "-"


def largest_difference(ours: dict, theirs: dict) -> str:
    shared = [name for name in theirs if name in ours and not math.isnan(theirs[name])]
    return f"{max(abs(ours[name] - theirs[name]) for name in shared):.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", type=int, default=[5000, 20000, 100000])
    parser.add_argument("--ks", nargs="*", default=["None", "max_bin_count"])
    parser.add_argument("--pml-max-n", type=int, default=5000)
    parser.add_argument("--full-max-n", type=int, default=20000)
    parser.add_argument("--memory-cap-gb", type=float, default=8)
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--worker", nargs=3, metavar=("LIBRARY", "N", "K"))
    args = parser.parse_args()
    if args.worker:
        library, n, k = args.worker
        print(json.dumps(worker(library, int(n), k, args.memory_cap_gb)))
        return
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("| N | k | ours s | PML s | time ratio | ours MB | PML MB | memory ratio | max diff |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        for k in args.ks:
            if k == "None" and n > args.full_max_n:
                continue
            row = {}
            for library in ("ours", "pml"):
                if library == "pml" and n > args.pml_max_n:
                    row[library] = {"error": "not run"}
                    continue
                row[library] = run_isolated(
                    "benchmarks.metrics",
                    ["--worker", library, str(n), k, "--memory-cap-gb", str(args.memory_cap_gb)],
                    args.timeout,
                )
            ours, pml = row["ours"], row["pml"]
            if "error" in ours:
                print(f"| {n} | {k} | error: {ours['error']} | | | | | | |")
            elif "error" in pml:
                print(f"| {n} | {k} | {ours['seconds']:.2f} | PML: {pml['error']} | "
                      f"| {ours['peak_mb']:.0f} | | | |")
            else:
                print(
                    f"| {n} | {k} | {ours['seconds']:.2f} | {pml['seconds']:.2f} "
                    f"| {ratio(ours['seconds'], pml['seconds'])} | {ours['peak_mb']:.0f} "
                    f"| {pml['peak_mb']:.0f} | {ratio(ours['peak_mb'], pml['peak_mb'], floor=1.0)} "
                    f"| {largest_difference(ours['metrics'], pml['metrics'])} |"
                )
            sys.stdout.flush()
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
