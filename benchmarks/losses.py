"""Forward+backward time and peak memory of our losses against PML's on the same tensors.

    python -m benchmarks.losses                      # every loss, B in 128 512 1024
    python -m benchmarks.losses --losses NTXentLoss TripletMarginLoss --batch-sizes 512
    python -m benchmarks.losses --losses ArcFaceLoss --batch-sizes 512 --num-classes 1000 100000

Each (loss, library, batch size) runs in a fresh process with 2 threads (CPU) so
peak memory is measured per case. Embeddings are (B, 128); pair- and
triplet-based losses get 4 items per class, losses with learnable class
weights get labels drawn uniformly from ``--num-classes`` classes (default 1000).
Prints a markdown table of medians and ratios ours/PML (below 1 is better).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from benchmarks._measure import cap_memory, measure, run_isolated

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
}
LEARNABLE = ["ArcFaceLoss", "CosFaceLoss", "SubCenterArcFaceLoss", "SphereFaceLoss",
             "LargeMarginSoftmaxLoss", "NormalizedSoftmaxLoss", "ProxyNCALoss", "ProxyAnchorLoss",
             "SoftTripleLoss"]
CASES.update({name: ({}, {}) for name in LEARNABLE})


def make_loss(library: str, name: str, num_classes: int):
    ours_kwargs, pml_kwargs = CASES[name]
    if name in LEARNABLE:
        size = {"num_classes": num_classes, "embedding_size": DIM}
        ours_kwargs, pml_kwargs = {**ours_kwargs, **size}, {**pml_kwargs, **size}
    if library == "ours":
        from lightning_metric import losses
        return getattr(losses, name)(**ours_kwargs)
    from pytorch_metric_learning import losses
    return getattr(losses, name)(**pml_kwargs)


def worker(name: str, library: str, batch_size: int, device: str, num_classes: int) -> dict:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    if device == "cpu":
        cap_memory(MEMORY_CAP_GB)
    loss_fn = make_loss(library, name, num_classes).to(device)
    embeddings = torch.randn(batch_size, DIM, device=device, requires_grad=True)
    if name in LEARNABLE:
        labels = torch.randint(num_classes, (batch_size,), device=device)
    else:
        labels = torch.arange(batch_size // 4, device=device).repeat_interleave(4)

    def step():
        loss_fn(embeddings, labels).backward()
        embeddings.grad = None

    seconds, peak_mb = measure(step, device)
    return {"seconds": seconds, "peak_mb": peak_mb}


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
    parser.add_argument("--worker", nargs=3, metavar=("LOSS", "LIBRARY", "BATCH"))
    args = parser.parse_args()
    if args.worker:
        name, library, batch = args.worker
        print(json.dumps(worker(name, library, int(batch), args.device, args.num_classes[0])))
        return
    print("| loss | B | classes | ours ms | PML ms | time ratio | ours MB | PML MB "
          "| memory ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.losses:
        for batch, classes in [(b, c) for b in args.batch_sizes for c in args.num_classes]:
            if name not in LEARNABLE and classes != args.num_classes[0]:
                continue
            row = {}
            for library in ("ours", "pml"):
                row[library] = run_isolated(
                    "benchmarks.losses",
                    ["--worker", name, library, str(batch), "--device", args.device,
                     "--num-classes", str(classes)],
                    args.timeout,
                )
            batch = f"{batch} | {classes if name in LEARNABLE else '-'}"
            ours, pml = row["ours"], row["pml"]
            if "error" in ours:
                print(f"| {name} | {batch} | error: {ours['error']} | | | | | |")
                continue
            if "error" in pml:
                print(f"| {name} | {batch} | {ours['seconds'] * 1e3:.1f} | PML: {pml['error']} "
                      f"| | {ours['peak_mb']:.0f} | | |")
                continue
            print(
                f"| {name} | {batch} | {ours['seconds'] * 1e3:.1f} | {pml['seconds'] * 1e3:.1f} "
                f"| {ratio(ours['seconds'], pml['seconds'])} | {ours['peak_mb']:.0f} "
                f"| {pml['peak_mb']:.0f} | {ratio(ours['peak_mb'], pml['peak_mb'], floor=1.0)} |"
            )
            sys.stdout.flush()


if __name__ == "__main__":
    main()
