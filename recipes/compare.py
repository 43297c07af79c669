"""Compare losses on Fashion-MNIST: ``python -m recipes.compare [losses=[...]] [seeds=[...]]``.

For every setup (seen classes, unseen classes, few examples per class, many classes of
few examples) and loss of ``conf/compare.yaml``: ``recipes.train`` multiruns try the
loss's candidate settings at the first seed, keep the best on validation, and train it
at the other seeds. Writes into ``output_dir``: ``results.md`` (one table a setup, test
P@1, R-precision and MAP@R as mean ± std over seeds, and the seconds a run),
``results.csv`` (every run), ``umap.png`` (the figure's losses side by side) and, per
cell, ``<setup>/<loss>/search`` and ``seeds`` (the multiruns' own folders). Each
multirun's command is printed; rerunning into the same ``output_dir`` skips those done.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lightning_metric.comparison import (
    ComparisonPlan,
    run_cell,
    run_rows,
    umap_figure,
    write_csv,
    write_markdown,
)
from lightning_metric.data.fmnist import CLASS_NAMES


def plan_of(cfg: DictConfig) -> ComparisonPlan:
    settings = OmegaConf.to_container(cfg, resolve=True)
    return ComparisonPlan(
        losses=tuple(settings["losses"]), seeds=tuple(int(s) for s in settings["seeds"]),
        setups=tuple(settings["setups"]),
        setup_overrides={k: tuple(v) for k, v in settings["setup_overrides"].items()},
        train_overrides=tuple(settings["train_overrides"]),
        candidates={k: tuple(v) for k, v in (settings["candidates"] or {}).items()},
        optimized_metric=settings["optimized_metric"],
    )


def commit() -> str:
    """The commit the numbers come from (``+ changes`` when the tree differs from it)."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--", "lightning_metric", "recipes", "conf")
    return head + (" + uncommitted changes" if changed else "")


def compare(cfg: DictConfig) -> Path:
    plan = plan_of(cfg)
    figure = cfg.figure
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    started, results, source = time.perf_counter(), [], commit()  # the code the runs use
    for number, cell in enumerate(plan.cells, start=1):
        print(f"[{number}/{len(plan.cells)}] {cell.name}", flush=True)
        export = cell.setup == figure.setup and cell.loss in figure.losses
        results.append(run_cell(plan, cell, output_dir, export=export,
                                log=lambda line: print(f"  {line}", flush=True)))
        # after every cell, so that a comparison stopped half-way keeps what it finished
        minutes = (time.perf_counter() - started) / 60
        header = (f"# Loss comparison\n\nCommit {source}; {len(plan.seeds)} seeds "
                  f"{list(plan.seeds)}; every run: `{' '.join(plan.train_overrides)}`; "
                  f"settings chosen on {plan.optimized_metric}; {number} of "
                  f"{len(plan.cells)} cells, {minutes:.0f} minutes.")
        write_csv(run_rows(results, plan.optimized_metric), output_dir / "results.csv")
        table = write_markdown(results, plan.setups, plan.optimized_metric, header,
                               output_dir / "results.md")
    print(table)
    if figure.setup in plan.setups and all(loss in plan.losses for loss in figure.losses):
        fmnist = "data=fmnist" in plan.setup_overrides[figure.setup]  # its labels are classes
        path = umap_figure(results, figure.setup, figure.losses, output_dir / "umap.png",
                           CLASS_NAMES if fmnist else None, max_points=figure.max_points)
        print(f"Figure: {path}")
    print(f"Results: {output_dir / 'results.md'}")
    return output_dir


@hydra.main(version_base="1.3", config_path="../conf", config_name="compare")
def main(cfg: DictConfig) -> None:
    compare(cfg)


if __name__ == "__main__":
    main()
