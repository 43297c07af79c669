"""Forward+backward time and peak memory of our losses against PML's on the same tensors.

    python -m benchmarks.losses                      # every loss, B in 128 512 1024
    python -m benchmarks.losses --losses NTXentLoss TripletMarginLoss --batch-sizes 512
    python -m benchmarks.losses --losses ArcFaceLoss --batch-sizes 512 --num-classes 1000 100000
    python -m benchmarks.losses --losses HDCMiner DistanceWeightedMiner --batch-sizes 512

Each (loss, library, batch size) runs in a fresh process with 2 threads (CPU) so
peak memory is measured per case. Embeddings are (B, 128), drawn from a seeded
generator, so both libraries get the same; pair- and triplet-based losses get 4 items
per class, losses with learnable class weights get labels drawn uniformly from
``--num-classes`` classes (default 1000). The two-view losses (VICReg, SelfSupervised
around a ContrastiveLoss) get two (B, 128) views, ManifoldLoss (K=50 proxies) the same
meta-classes on both sides. Miners: the time and memory of mining one batch of 4 items
per class (no backward); the sampling miners draw from ``seed=0`` (ours) and from
torch's global generator seeded 0 (PML's).
Times: both libraries alternate in one process (median of at least 5 runs each),
so machine noise falls on both alike; memory: each library alone in a fresh process, with
glibc's mmap threshold fixed (``_measure.FIXED_MMAP_THRESHOLD``) so that the peak resident
set follows the live tensors rather than the allocator's history.
Prints a markdown table of medians and ratios ours/PML (below 1 is better).
"""

from __future__ import annotations

import argparse
import importlib
import json

import torch

from benchmarks._measure import (
    FIXED_MMAP_THRESHOLD,
    cap_memory,
    interleaved_medians,
    measure,
    run_isolated,
)

DIM = 128
MEMORY_CAP_GB = 16  # PML's NTXentLoss needs about 27 GB at B=1024

# name: (our constructor kwargs, PML constructor kwargs); both classes share the name.
CASES: dict[str, tuple[dict, dict]] = {
    "AngularLoss": ({}, {}),
    "CircleLoss": ({}, {}),
    "ContrastiveLoss": ({}, {}),
    "FastAPLoss": ({}, {}),
    "GeneralizedLiftedStructureLoss": ({}, {}),
    "IntraPairVarianceLoss": ({}, {}),
    "LiftedStructureLoss": ({}, {}),
    "MarginLoss": ({}, {}),
    "MultiSimilarityLoss": ({}, {}),
    "NCALoss": ({}, {}),
    "NPairsLoss": ({}, {}),
    "NTXentLoss": ({}, {}),
    "SignalToNoiseRatioContrastiveLoss": ({}, {}),
    "SupConLoss": ({}, {}),
    "TripletMarginLoss": ({}, {}),
    "TupletMarginLoss": ({}, {}),
    # the rest of PML 2.9
    "DynamicSoftMarginLoss": ({}, {}),
    "HistogramLoss": ({}, {}),
    "InstanceLoss": ({}, {}),
    "PNPLoss": ({}, {}),
    "RankedListLoss": ({"margin": 0.4, "Tn": 5}, {"margin": 0.4, "Tn": 5}),
    "ThresholdConsistentMarginLoss": ({}, {}),
}
LEARNABLE = ["ArcFaceLoss", "CosFaceLoss", "SubCenterArcFaceLoss", "SphereFaceLoss",
             "LargeMarginSoftmaxLoss", "NormalizedSoftmaxLoss", "ProxyNCALoss", "ProxyAnchorLoss",
             "SoftTripleLoss", "P2SGradLoss"]
CASES.update({name: ({}, {}) for name in LEARNABLE})
SIZE_ARGUMENT = {"P2SGradLoss": "descriptors_dim"}  # else "embedding_size"
# Two views of the batch: loss_fn(embeddings, ref_emb=ref_emb); no labels.
TWO_VIEWS = ["VICRegLoss", "SelfSupervisedLoss"]
WRAPPED = {"SelfSupervisedLoss": "ContrastiveLoss"}  # the same inner loss on both sides
CASES.update({name: ({}, {}) for name in TWO_VIEWS})
# Proxies learnt by the loss, batch items assigned to them: loss_fn(embeddings, indices_tuple=meta).
MANIFOLD_PROXIES = 50
CASES["ManifoldLoss"] = ({"l": DIM, "K": MANIFOLD_PROXIES}, {"l": DIM, "K": MANIFOLD_PROXIES})
# Miners: one batch mined, no backward.
MINERS: dict[str, tuple[dict, dict]] = {
    "AngularMiner": ({}, {}),
    "HDCMiner": ({}, {}),
    "DistanceWeightedMiner": ({"seed": 0}, {}),  # PML's draws from torch's seeded generator
    "UniformHistogramMiner": ({"seed": 0}, {}),
}
CASES.update(MINERS)
# PML's loss keeps this attribute's autograd graph from one call to the next, so its second
# backward fails; the benchmark detaches it before each of PML's calls.
PML_STATE_WITH_GRAPH = {"DynamicSoftMarginLoss": "hist_"}


def make_loss(library: str, name: str, num_classes: int):
    """One library's loss (or miner) ``name``, built with that library's kwargs."""
    ours_kwargs, pml_kwargs = CASES[name]
    kwargs = dict(ours_kwargs if library == "ours" else pml_kwargs)
    if name in LEARNABLE:
        kwargs.update({"num_classes": num_classes, SIZE_ARGUMENT.get(name, "embedding_size"): DIM})
    kind = "miners" if name in MINERS else "losses"
    if library == "ours":
        module = importlib.import_module(f"lightning_metric.{kind}")
    else:
        module = importlib.import_module(f"pytorch_metric_learning.{kind}")
    if name in WRAPPED:
        kwargs["loss"] = getattr(module, WRAPPED[name])()
    return getattr(module, name)(**kwargs)


def make_step(name: str, library: str, batch_size: int, device: str, num_classes: int):
    """A forward+backward of one library's loss (a miner: one mining) on fixed (seeded) tensors."""
    torch.manual_seed(0)
    loss_fn = make_loss(library, name, num_classes).to(device)
    inputs = torch.Generator().manual_seed(0)  # the same tensors whatever the loss's init drew
    embeddings = torch.randn(batch_size, DIM, generator=inputs).to(device).requires_grad_()
    if name in LEARNABLE:
        labels = torch.randint(num_classes, (batch_size,), generator=inputs).to(device)
    else:
        labels = torch.arange(batch_size // 4, device=device).repeat_interleave(4)
    leaves = [embeddings]
    if name in MINERS:
        def call():
            loss_fn(embeddings, labels)
            return None
    elif name in TWO_VIEWS:
        ref_emb = torch.randn(batch_size, DIM, generator=inputs).to(device).requires_grad_()
        leaves.append(ref_emb)
        def call():
            return loss_fn(embeddings, ref_emb=ref_emb)
    elif name == "ManifoldLoss":
        drawn = torch.randint(MANIFOLD_PROXIES, (batch_size - MANIFOLD_PROXIES,), generator=inputs)
        meta = torch.cat((torch.arange(MANIFOLD_PROXIES), drawn))
        meta = meta[torch.randperm(batch_size, generator=inputs)].to(device)
        def call():
            return loss_fn(embeddings, indices_tuple=meta)
    else:
        def call():
            return loss_fn(embeddings, labels)
    state = PML_STATE_WITH_GRAPH.get(name) if library == "pml" else None

    def step():
        if state is not None:
            setattr(loss_fn, state, getattr(loss_fn, state).detach())
        loss = call()
        if loss is not None:
            loss.backward()
        for leaf in leaves:
            leaf.grad = None
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def memory_worker(name: str, library: str, batch_size: int, device: str, num_classes: int):
    """Peak memory of one library's step, alone in this process."""
    torch.set_num_threads(2)
    if device == "cpu":
        cap_memory(MEMORY_CAP_GB)
    step = make_step(name, library, batch_size, device, num_classes)
    _, peak_mb = measure(step, device, min_runs=1, budget_s=0)
    return {"peak_mb": peak_mb}


def time_worker(name: str, libraries: list[str], batch_size: int, device: str, num_classes: int):
    """Median times of the libraries' steps, interleaved in this process."""
    torch.set_num_threads(2)
    if device == "cpu":
        cap_memory(MEMORY_CAP_GB)
    steps = {lib: make_step(name, lib, batch_size, device, num_classes) for lib in libraries}
    return interleaved_medians(steps)


def ratio(ours: float, theirs: float, floor: float = 0.0) -> str:
    return f"{max(ours, floor) / max(theirs, floor):.2f}" if max(theirs, floor) > 0 else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--losses", nargs="*", default=list(CASES))
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=[128, 512, 1024])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--num-classes", nargs="*", type=int, default=[1000],
                        help="classes of the learnable-weight losses")
    parser.add_argument("--worker", nargs=3, metavar=("MODE", "LOSS", "BATCH"),
                        help="internal: MODE is memory-ours, memory-pml, time-both or time-ours")
    args = parser.parse_args()
    if args.worker:
        mode, name, batch = args.worker
        kind, which = mode.split("-")
        if kind == "memory":
            result = memory_worker(name, which, int(batch), args.device, args.num_classes[0])
        else:
            libraries = ["ours", "pml"] if which == "both" else ["ours"]
            result = time_worker(name, libraries, int(batch), args.device, args.num_classes[0])
        print(json.dumps(result))
        return
    print("| loss | B | classes | ours ms | PML ms | time ratio | ours MB | PML MB "
          "| memory ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.losses:
        for batch, classes in [(b, c) for b in args.batch_sizes for c in args.num_classes]:
            if name not in LEARNABLE and classes != args.num_classes[0]:
                continue
            print(benchmark_row(name, batch, classes, args), flush=True)


def benchmark_row(name: str, batch: int, classes: int, args) -> str:
    def run(mode: str) -> dict:
        return run_isolated(
            "benchmarks.losses",
            ["--worker", mode, name, str(batch), "--device", args.device,
             "--num-classes", str(classes)],
            args.timeout,
            env=FIXED_MMAP_THRESHOLD if mode.startswith("memory") else None,
        )

    memory = {lib: run(f"memory-{lib}") for lib in ("ours", "pml")}
    pml_failed = memory["pml"].get("error")
    times = run("time-ours" if pml_failed else "time-both")
    label = f"{name} | {batch} | {classes if name in LEARNABLE else '-'}"
    if "error" in times or "error" in memory["ours"]:
        return f"| {label} | error: {times.get('error') or memory['ours']['error']} |||||||"
    ours_ms, ours_mb = times["ours"] * 1e3, memory["ours"]["peak_mb"]
    if pml_failed:
        return f"| {label} | {ours_ms:.1f} | PML: {pml_failed} | | {ours_mb:.0f} | | |"
    pml_ms, pml_mb = times["pml"] * 1e3, memory["pml"]["peak_mb"]
    return (f"| {label} | {ours_ms:.1f} | {pml_ms:.1f} | {ratio(ours_ms, pml_ms)} "
            f"| {ours_mb:.0f} | {pml_mb:.0f} | {ratio(ours_mb, pml_mb, floor=1.0)} |")


if __name__ == "__main__":
    main()
