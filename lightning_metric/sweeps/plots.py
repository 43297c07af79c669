"""A sweep's pictures: the monitored metric over what was swept, and Optuna's history.

``sweep_heatmap.png`` shows the best value of the monitored metric of every job:

- two numeric parameters on a full grid: a heatmap, one annotated cell a job
  (grey: failed or unfinished); off a grid (Optuna's trials): a scatter coloured
  by the value;
- one numeric parameter: a line (one line per value of a second, categorical one);
- one categorical parameter: bars;
- three or more: no picture (the table says it all).

For Optuna searches, ``optuna_history.png`` (each trial's value and the best so far)
and ``optuna_importance.png`` (Optuna's mean-decrease-impurity importance of each
searched parameter, from a random forest over the finished trials).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from .records import COMPLETED, JobRecord
from .summary import SEARCH_GROUP, Objective

HEATMAP_FILE = "sweep_heatmap.png"
HISTORY_FILE, IMPORTANCE_FILE = "optuna_history.png", "optuna_importance.png"


def swept_parameters(jobs: list[JobRecord]) -> list[str]:
    """Override keys whose value differs between jobs, in override order."""
    keys: dict[str, set[str]] = {}
    for job in jobs:
        for key, value in job.overrides.items():
            keys.setdefault(key, set()).add(value)
    return [key for key, values in keys.items()
            if len(values) > 1 and key.lstrip("+~") != SEARCH_GROUP]


def is_numeric(jobs: list[JobRecord], key: str) -> bool:
    try:
        [float(job.overrides[key]) for job in jobs if key in job.overrides]
    except ValueError:
        return False
    return True


def plot_sweep(jobs: list[JobRecord], objective: Objective, path: Path) -> str | None:
    """Draw the sweep into ``path``; returns what was drawn, or None (no picture)."""
    swept = swept_parameters(jobs)
    numeric = [key for key in swept if is_numeric(jobs, key)]
    categorical = [key for key in swept if key not in numeric]
    figure = Figure(figsize=(7, 5.5), layout="constrained")
    axes = figure.subplots()
    if len(swept) == 2 and len(numeric) == 2:
        kind = _grid_or_scatter(axes, jobs, objective, numeric[0], numeric[1])
    elif len(numeric) == 1 and len(categorical) <= 1:
        kind = _lines(axes, jobs, objective, numeric[0], categorical[0] if categorical else None)
    elif len(swept) == 1:
        kind = _bars(axes, jobs, objective, categorical[0])
    else:
        return None
    failed = sum(job.status != COMPLETED for job in jobs)
    axes.set_title(f"{objective.best_column} ({len(jobs)} jobs"
                   + (f", {failed} without a value)" if failed else ")"))
    figure.savefig(path, dpi=110)
    return kind


def _grid_or_scatter(axes, jobs: list[JobRecord], objective: Objective, x_key: str,
                     y_key: str) -> str:
    points = [(float(j.overrides[x_key]), float(j.overrides[y_key]), objective.best_value(j))
              for j in jobs if x_key in j.overrides and y_key in j.overrides]
    xs, ys = sorted({p[0] for p in points}), sorted({p[1] for p in points})
    on_grid = len({(x, y) for x, y, _ in points}) == len(points) == len(xs) * len(ys)
    axes.set_xlabel(x_key)
    axes.set_ylabel(y_key)
    if not on_grid:
        finite = [p for p in points if not math.isnan(p[2])]
        shown = axes.scatter([p[0] for p in finite], [p[1] for p in finite],
                             c=[p[2] for p in finite], cmap="viridis", s=80)
        axes.figure.colorbar(shown, ax=axes, label=objective.monitor)
        return "scatter"
    grid = np.full((len(ys), len(xs)), np.nan)
    for x, y, value in points:
        grid[ys.index(y), xs.index(x)] = value
    colours = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")   # no value
    image = axes.imshow(np.ma.masked_invalid(grid), origin="lower", cmap=colours, aspect="auto")
    axes.figure.colorbar(image, ax=axes, label=objective.monitor)
    axes.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
    axes.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
    for row, column in np.ndindex(grid.shape):
        value = grid[row, column]
        bright = math.isnan(value) or image.norm(value) > 0.6   # viridis turns yellow
        axes.text(column, row, "no value" if math.isnan(value) else f"{value:.4f}",
                  ha="center", va="center", color="black" if bright else "white")
    return "heatmap"


def _lines(axes, jobs: list[JobRecord], objective: Objective, x_key: str,
           group_key: str | None) -> str:
    groups: dict[str, list[tuple[float, float]]] = {}
    for job in jobs:
        if x_key in job.overrides:
            group = job.overrides.get(group_key, "") if group_key else ""
            groups.setdefault(group, []).append(
                (float(job.overrides[x_key]), objective.best_value(job)))
    for group, points in sorted(groups.items()):
        points.sort()
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                  label=f"{group_key}={group}" if group_key else None)
    if group_key:
        axes.legend()
    axes.set_xlabel(x_key)
    axes.set_ylabel(objective.monitor)
    axes.grid(alpha=0.3)
    return "line"


def _bars(axes, jobs: list[JobRecord], objective: Objective, key: str) -> str:
    labelled = [(job.overrides.get(key, ""), objective.best_value(job)) for job in jobs]
    axes.bar([label for label, _ in labelled],
             [0.0 if math.isnan(value) else value for _, value in labelled])
    axes.set_xlabel(key)
    axes.set_ylabel(objective.monitor)
    return "bars"


def plot_optuna(jobs: list[JobRecord], objective: Objective, folder: Path) -> list[Path]:
    """``optuna_history.png`` and ``optuna_importance.png`` in ``folder`` (the pictures
    written: none with fewer than two finished trials, no importance without a parameter
    that varies)."""
    finished = [j for j in jobs
                if j.status == COMPLETED and not math.isnan(objective.best_value(j))]
    if len(finished) < 2:
        return []
    written = [folder / HISTORY_FILE]
    _history(finished, objective, written[0])
    searched = swept_parameters(finished)
    if searched:
        written.append(folder / IMPORTANCE_FILE)
        _importance(finished, objective, searched, written[1])
    return written


def _history(jobs: list[JobRecord], objective: Objective, path: Path) -> None:
    numbers = [job.number for job in jobs]
    values = [objective.best_value(job) for job in jobs]
    best = np.maximum.accumulate(values) if objective.mode == "max" else np.minimum.accumulate(
        values)
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.subplots()
    axes.plot(numbers, values, "o", label="trial")
    axes.step(numbers, best, where="post", color="tab:red", label="best so far")
    axes.set_xlabel("trial (job number)")
    axes.set_ylabel(objective.monitor)
    axes.set_title("Optuna optimisation history")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.savefig(path, dpi=110)


def _importance(jobs: list[JobRecord], objective: Objective, searched: list[str],
                path: Path) -> None:
    importances = parameter_importances(jobs, objective, searched)
    names = sorted(importances, key=importances.get)
    figure = Figure(figsize=(7, 1.5 + 0.5 * len(names)), layout="constrained")
    axes = figure.subplots()
    axes.barh(names, [importances[name] for name in names])
    axes.set_xlabel("importance (mean decrease in impurity, Optuna)")
    axes.set_title(f"What moved {objective.monitor}")
    figure.savefig(path, dpi=110)


def parameter_importances(jobs: list[JobRecord], objective: Objective,
                          searched: list[str]) -> dict[str, float]:
    """Optuna's importance of each searched parameter over the finished ``jobs``.

    The trials are rebuilt from the jobs' overrides (numeric parameters as floats over
    the range the trials covered, others as categories), then Optuna's
    ``MeanDecreaseImpurityImportanceEvaluator`` (seed 0) ranks them; the fANOVA default
    is avoided because it breaks on NumPy 2 in the Optuna 2.x that Hydra's sweeper pins.
    """
    import optuna
    from optuna.importance import MeanDecreaseImpurityImportanceEvaluator

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    float_distribution = (getattr(optuna.distributions, "FloatDistribution", None)   # 3.x
                          or optuna.distributions.UniformDistribution)             # 2.x
    numeric = {key: is_numeric(jobs, key) for key in searched}
    distributions = {}
    for key in searched:
        values = [job.overrides[key] for job in jobs if key in job.overrides]
        if numeric[key]:
            numbers = [float(v) for v in values]
            distributions[key] = float_distribution(min(numbers), max(numbers))
        else:
            distributions[key] = optuna.distributions.CategoricalDistribution(sorted(set(values)))
    study = optuna.create_study(direction="maximize" if objective.mode == "max" else "minimize")
    with warnings.catch_warnings():  # create_trial and add_trial are "experimental" in 2.x
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for job in jobs:
            if all(key in job.overrides for key in searched):
                params = {key: float(job.overrides[key]) if numeric[key]
                          else job.overrides[key] for key in searched}
                study.add_trial(optuna.trial.create_trial(
                    params=params, distributions=distributions, value=objective.best_value(job)))
    return optuna.importance.get_param_importances(
        study, evaluator=MeanDecreaseImpurityImportanceEvaluator(seed=0))
