"""Train an embedding on scikit-learn's 8x8 digits with a lightning-metric loss in a plain loop.

    python -m recipes.plain_loop                       # TripletMarginLoss + hard-triplet miner
    python -m recipes.plain_loop --loss MultiSimilarityLoss --epochs 5

The shortest demonstration that the losses drop into any PyTorch loop: a small
MLP, class-balanced batches, and precision@1 of held-out digits retrieving
from the training digits, before and after training.
"""

from __future__ import annotations

import argparse
import json

import torch
from sklearn.datasets import load_digits
from torch import nn

from lightning_metric import losses, miners


def load_split(seed: int) -> tuple[torch.Tensor, ...]:
    """Digits as ``(train_x, train_y, test_x, test_y)``: 64 pixel features scaled to [0, 1]."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n_test = len(x) // 5
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def class_balanced_batches(labels: torch.Tensor, per_class: int, generator: torch.Generator):
    """Batches of ``per_class`` items from every class, covering each class about once."""
    by_class = [torch.where(labels == c)[0] for c in labels.unique()]
    n_batches = min(len(items) for items in by_class) // per_class
    shuffled = [items[torch.randperm(len(items), generator=generator)] for items in by_class]
    for b in range(n_batches):
        yield torch.cat([items[b * per_class:(b + 1) * per_class] for items in shuffled])


@torch.no_grad()
def precision_at_1(model: nn.Module, query_x, query_y, ref_x, ref_y) -> float:
    """Share of queries whose nearest reference (cosine) has the query's label."""
    query = nn.functional.normalize(model(query_x), dim=1)
    ref = nn.functional.normalize(model(ref_x), dim=1)
    nearest = (query @ ref.T).argmax(dim=1)
    return (ref_y[nearest] == query_y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", default="TripletMarginLoss")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--embedding-size", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not hasattr(losses, args.loss):
        parser.error(f"unknown --loss {args.loss!r}; choose from {sorted(losses.__all__)}")

    torch.manual_seed(args.seed)
    train_x, train_y, test_x, test_y = load_split(args.seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, args.embedding_size))
    miner = miners.TripletEasyHardMiner(pos_strategy="hard", neg_strategy="semihard")
    loss_fn = getattr(losses, args.loss)(miner=miner)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(args.seed)

    before = precision_at_1(model, test_x, test_y, train_x, train_y)
    for epoch in range(args.epochs):
        total, steps = 0.0, 0
        for batch in class_balanced_batches(train_y, args.per_class, generator):
            loss = loss_fn(model(train_x[batch]), train_y[batch])
            if not torch.isfinite(loss):
                raise RuntimeError(f"non-finite loss {loss.item()} at epoch {epoch}, step {steps}")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, steps = total + loss.item(), steps + 1
        print(f"epoch {epoch + 1}/{args.epochs}  loss {total / max(steps, 1):.4f}")
    after = precision_at_1(model, test_x, test_y, train_x, train_y)
    print(json.dumps({"loss": args.loss, "precision_at_1_before": before,
                      "precision_at_1_after": after}))


if __name__ == "__main__":
    main()
