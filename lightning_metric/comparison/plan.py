"""What a loss comparison runs: its cells (a setup and a loss) and their commands.

A cell is trained by two ``recipes.train`` multiruns: the *search* tries the loss's
candidate settings at the first seed and the *seeds* run trains the setting that won on
validation at the other seeds. Both are plain commands a user can paste to rerun a cell.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..losses.registry import LOSSES
from ..sweeps.records import split_override

TRAIN_COMMAND = (sys.executable, "-m", "recipes.train")
"""The recipe each multirun runs, with this interpreter."""


@dataclass(frozen=True)
class Cell:
    """One loss under one setup (``standard/arcface``)."""

    setup: str
    loss: str

    @property
    def name(self) -> str:
        return f"{self.setup}/{self.loss}"

    def folder(self, output_dir: Path) -> Path:
        return output_dir / self.setup / self.loss


@dataclass(frozen=True)
class ComparisonPlan:
    """The settings of ``conf/compare.yaml``, checked.

    Args:
        losses: names of ``conf/loss/`` files, the losses compared.
        seeds: the seeds each cell is trained with; the first also runs the search.
        setups: names among ``setup_overrides``, the setups compared.
        setup_overrides: setup name -> ``recipes.train`` overrides (its data).
        train_overrides: overrides of every run (encoder, budget).
        candidates: loss name -> sweep overrides (``loss.margin=20,40``) tried on
            validation; a loss without an entry keeps its defaults.
        optimized_metric: the validation metric that picks the setting.

    Raises:
        ValueError: naming the setting: no losses or seeds, an unknown loss or setup,
            repeated seeds, candidates that are not ``key=values`` sweeps of ``loss.``
            settings.
    """

    losses: tuple[str, ...]
    seeds: tuple[int, ...]
    setups: tuple[str, ...]
    setup_overrides: Mapping[str, tuple[str, ...]]
    train_overrides: tuple[str, ...]
    candidates: Mapping[str, tuple[str, ...]]
    optimized_metric: str

    def __post_init__(self):
        _check_names("losses", self.losses, known=set(LOSSES))  # conf/loss/ file names
        _check_names("setups", self.setups, known=set(self.setup_overrides))
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be one or more different seeds, got {list(self.seeds)}")
        for loss, sweeps in self.candidates.items():
            for sweep in sweeps:
                key, values = split_override(sweep)
                if not key.startswith("loss.") or not values:
                    raise ValueError(
                        f"candidates.{loss}: {sweep!r} is not a sweep of a loss setting "
                        "(loss.<name>=<value>,<value>,...)")

    @property
    def cells(self) -> list[Cell]:
        return [Cell(setup, loss) for setup in self.setups for loss in self.losses]

    def search_command(self, cell: Cell, sweep_dir: Path, export: bool = False) -> list[str]:
        """The multirun of the cell's candidates at the first seed, each tested (the test
        metrics of the one that wins on validation are that seed's result)."""
        return self._multirun(cell, sweep_dir, [
            *self.candidates.get(cell.loss, ()), f"seed={self.seeds[0]}",
            f"export={str(export).lower()}"])

    def seeds_command(self, cell: Cell, chosen: Sequence[str], sweep_dir: Path) -> list[str]:
        """The multirun of the chosen setting (overrides) at the other seeds."""
        seeds = ",".join(str(seed) for seed in self.seeds[1:])
        return self._multirun(cell, sweep_dir, [*chosen, f"seed={seeds}"])

    def _multirun(self, cell: Cell, sweep_dir: Path, extra: list[str]) -> list[str]:
        return [*TRAIN_COMMAND, "-m", f"hydra.sweep.dir={sweep_dir}",
                *self.setup_overrides[cell.setup], *self.train_overrides, f"loss={cell.loss}",
                f"optimized_metric={self.optimized_metric}", "test=true", *extra]


def _check_names(setting: str, names: Sequence[str], known: set[str]) -> None:
    if not names:
        raise ValueError(f"{setting} is empty: name at least one")
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"{setting}: unknown {unknown}; known: {sorted(known)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{setting} names one twice: {list(names)}")
