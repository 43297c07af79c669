"""Fail a sweep before its first job trains: every job's config must compose and build.

A sweep such as ``loss=triplet loss.scale=16,64`` or ``loss.margn=20,40`` would
otherwise fail job after job (or, with ``loss=arcface,triplet``, only after the
ArcFace jobs have trained). :func:`check_sweep` composes the config of every job
the sweep will run (for Optuna's ``interval(...)`` ranges: both ends), then builds
the loss, the miner, the data module and the model of each (constructors only: no
data is read, nothing trains). A key the config lacks is reported with the settings
its config group does have and the parameters its class takes; a value a
constructor rejects (a negative scale, an ArcFace margin of 180 degrees or more) with
the constructor's message. Trainer settings are left to the jobs themselves.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Mapping

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep
from omegaconf import DictConfig, OmegaConf

from .. import builders

# Past this many jobs, each swept value is checked once per choice of config groups.
MAX_COMBINATIONS = 12


class SweepConfigError(ValueError):
    """A sweep that cannot run as configured; raised before any job starts."""


def values_per_key(overrides: list[str]) -> dict[str, list[str]]:
    """``{key: [override, ...]}``: each override's candidates as single overrides.

    ``loss.margin=20,40`` gives ``["loss.margin=20", "loss.margin=40"]``,
    ``loss.margin=interval(10, 60)`` its two ends, a plain override itself.
    A later override of the same key replaces an earlier one (as Hydra does).
    """
    candidates: dict[str, list[str]] = {}
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.get_key_element()
        if not override.is_sweep_override():
            candidates[key] = [override.input_line]
        elif override.is_discrete_sweep():
            candidates[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        elif isinstance(interval := override.value(), IntervalSweep):
            candidates[key] = [f"{key}={interval.start}", f"{key}={interval.end}"]
    return candidates


def jobs_to_check(task_overrides: list[str], sweeper_params: Mapping | None) -> list[list[str]]:
    """The override lists to compose: every job of a sweep of up to ``MAX_COMBINATIONS`` jobs.

    A larger sweep (or Optuna's ranges, whose two ends make ``2**n`` corners) is checked
    for every combination of its config-group choices (``loss=arcface,cosface``), each
    with every other swept value once: a value that only one group rejects (an ArcFace
    margin of 200 degrees) is still tried with that group.
    ``sweeper_params``: ``hydra.sweeper.params`` (Optuna's search space), or None.
    """
    searched = [f"{key}={value}" for key, value in (sweeper_params or {}).items()]
    candidates = values_per_key(searched + list(task_overrides))
    if math.prod(len(values) for values in candidates.values()) <= MAX_COMBINATIONS:
        return [list(job) for job in itertools.product(*candidates.values())]
    groups = [values for key, values in candidates.items() if "." not in key]
    settings = [values for key, values in candidates.items() if "." in key]
    jobs: list[list[str]] = []
    for choice in itertools.product(*groups):
        jobs += [list(choice) + setting for setting in _one_at_a_time(settings)]
    return jobs


def _one_at_a_time(candidates: list[list[str]]) -> list[list[str]]:
    """Every value once, the others at their first value."""
    first = [values[0] for values in candidates]
    jobs = [first]
    for position, values in enumerate(candidates):
        jobs += [first[:position] + [value] + first[position + 1:] for value in values[1:]]
    return jobs


def check_sweep(config: DictConfig) -> int:
    """Compose and build every job of the multirun whose config is ``config``.

    Returns the number of job configs checked.

    Raises:
        SweepConfigError: one message per distinct problem, with the jobs it concerns.
    """
    params = OmegaConf.select(config, "hydra.sweeper.params")
    params = OmegaConf.to_container(params) if params is not None else None
    jobs = jobs_to_check(list(config.hydra.overrides.task), params)
    problems: dict[str, list[str]] = {}
    for job in jobs:
        problem = _problem_of(config, job)
        if problem:
            problems.setdefault(problem, []).append(" ".join(job))
    if problems:
        lines = [f"The sweep stops before any job trains: its {len(jobs)} job configs have "
                 f"{len(problems)} problem{'s' if len(problems) > 1 else ''}:"]
        for problem, where in problems.items():
            shown = "; ".join(where[:3]) + (f"; and {len(where) - 3} more" if len(where) > 3
                                            else "")
            lines.append(f"- {problem}\n  (in: {shown})")
        raise SweepConfigError("\n".join(lines))
    return len(jobs)


def _compose(config: DictConfig, overrides: list[str]) -> DictConfig:
    return GlobalHydra.instance().config_loader().load_sweep_config(config, list(overrides))


def _problem_of(config: DictConfig, job: list[str]) -> str | None:
    try:
        job_config = _compose(config, job)
    except Exception as error:  # noqa: BLE001 - Hydra raises several kinds; all are reported
        return _composition_problem(config, job, error)
    try:
        encoder = builders.build_encoder(job_config)
        loss = builders.build_loss(job_config, encoder)
        builders.build_datamodule(job_config, loss, encoder)
        builders.build_module(job_config, loss, encoder)
    except Exception as error:  # noqa: BLE001 - any constructor's complaint is the message
        return _first_lines(_root_cause(error))
    return None


def _root_cause(error: BaseException) -> BaseException:
    """The constructor's own error inside Hydra's ``InstantiationException`` wrapping."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def _first_lines(error: BaseException, count: int = 3) -> str:
    text = str(error).strip() or type(error).__name__
    return " ".join(line.strip() for line in text.splitlines()[:count])


def _composition_problem(config: DictConfig, job: list[str], error: Exception) -> str:
    """Name the override that breaks composition and what its config node does offer."""
    groups = [o for o in job if "." not in o.partition("=")[0]]
    for override in job:
        if override in groups:
            continue
        try:
            _compose(config, groups + [override])
        except Exception:  # noqa: BLE001
            return _unknown_key_message(config, groups, override, error)
    return f"the config does not compose: {_first_lines(error)}"


def _unknown_key_message(config: DictConfig, groups: list[str], override: str,
                         error: Exception) -> str:
    key = override.partition("=")[0].lstrip("+~")
    node_name, _, setting = key.rpartition(".")
    try:
        base = _compose(config, groups)
    except Exception:  # noqa: BLE001 - the group choice itself is what fails
        return f"{override}: {_first_lines(error)}"
    node = OmegaConf.select(base, node_name)
    if not isinstance(node, DictConfig) or setting in node:
        return f"{override}: {_first_lines(error)}"
    settings = [name for name in node if not str(name).startswith("_")]
    group = node_name.split(".")[0]
    choice = base.hydra.runtime.choices.get(group)
    where = f"{group}={choice}" if choice else node_name
    target = node.get("_target_")
    message = (f"{key}: {where} has no setting '{setting}'. "
               f"Its settings ({node_name}.*): {', '.join(settings) or 'none'}")
    extra = [name for name in _parameters_of(target) if name not in node]
    if extra:
        message += (f"; {target.rsplit('.', 1)[-1]} also takes: {', '.join(extra)} "
                    f"(set those with +{node_name}.<name>=...)")
    return message


def _parameters_of(target: str | None) -> list[str]:
    """The named parameters of the class or function ``target`` (none if it will not load)."""
    if not target:
        return []
    try:
        signature = inspect.signature(hydra.utils.get_object(target))
    except (ImportError, ValueError, TypeError):
        return []
    plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [name for name, p in signature.parameters.items() if p.kind in plain]
