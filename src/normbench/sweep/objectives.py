"""What a sweep job returns to its sweeper: one value per objective, read from the run's summary.

By default a job returns its validation error (`val/error` = 1 - val/best_acc), which every sweeper
minimizes. An Optuna search may name other objectives, and several of them, in `hydra.sweeper.objectives`
(the study's metric names too); the job then returns those metrics of its summary.json, in that order:

    python bench/train.py -m search=optuna_tpe 'hydra.sweeper.objectives=[val/error,time/total_s]' \
        'hydra.sweeper.direction=[minimize,minimize]'

Each objective has a natural direction and, where the metric has one, the bound that is the worst
possible value (what a failed trial is told; see docs/optuna.md). Test metrics are not objectives:
the test set never guides a search.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from normbench.errors import ConfigError
from normbench.record import Status

DEFAULT = "val/error"
KEY = "hydra.sweeper.objectives"


@dataclass(frozen=True)
class Objective:
    name: str
    direction: str                      # minimize | maximize
    worst: float | None                 # the worst possible value, when the metric is bounded that way
    read: Callable[[dict], float | None]  # its value from summary.json's metrics


def _metric(name: str) -> Callable[[dict], float | None]:
    return lambda metrics: metrics.get(name)


def _val_error(metrics: dict) -> float | None:
    best = metrics.get("val/best_acc")
    return None if best is None else 1.0 - float(best)


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("val/error", "minimize", 1.0, _val_error),
    Objective("val/best_acc", "maximize", 0.0, _metric("val/best_acc")),
    Objective("time/total_s", "minimize", None, _metric("time/total_s")),
    Objective("model/params", "minimize", None, _metric("model/params")),
    Objective("memory/peak_mb", "minimize", None, _metric("memory/peak_mb")),
    Objective("throughput/img_s", "maximize", 0.0, _metric("throughput/img_s")),
    Objective("convergence/epoch", "minimize", None, _metric("convergence/epoch")),
)}


def check_objectives(names: Sequence[str] | None) -> list[str]:
    """The objective names, checked: normbench's own metrics only (one line naming the fix otherwise)."""
    names = [DEFAULT] if names is None else [str(n) for n in names]
    if not names:
        raise ConfigError(KEY, names, f"name at least one objective, e.g. {KEY}=[{DEFAULT}]")
    for name in names:
        if name not in OBJECTIVES:
            hint = " (the test set never guides a search; use val/...)" if name.startswith("test/") else ""
            raise ConfigError(KEY, list(names), f"{name!r} is not an objective{hint}; choose from "
                              f"{', '.join(OBJECTIVES)}")
    if len(set(names)) != len(names):
        raise ConfigError(KEY, list(names), "name each objective once")
    return names


def objective_values(names: Sequence[str], metrics: dict) -> list[float | None]:
    """The objectives' values in a run's summary metrics (None where a metric is missing or not finite)."""
    values = []
    for name in names:
        value = OBJECTIVES[name].read(metrics or {})
        values.append(float(value) if value is not None and math.isfinite(float(value)) else None)
    return values


def worst_values(names: Sequence[str], failed_default: float) -> list[float]:
    """What a job whose run failed or diverged returns: each objective's worst bound; `failed_default`
    for the validation error (normbench's WORST_OBJECTIVE) and +-inf for unbounded ones."""
    out = []
    for name in names:
        objective = OBJECTIVES[name]
        if name == DEFAULT:
            out.append(float(failed_default))
        elif objective.worst is not None:
            out.append(objective.worst)
        else:
            out.append(math.inf if objective.direction == "minimize" else -math.inf)
    return out


def job_objectives() -> list[str] | None:
    """The objectives this Hydra job returns when its sweeper names them (hydra.sweeper.objectives);
    None for the default (the validation error alone)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    names = (HydraConfig.get().get("sweeper") or {}).get("objectives")
    if names is None:
        return None
    names = check_objectives(list(names))
    return None if names == [DEFAULT] else names


def job_return(names: Sequence[str] | None, summary: dict, objective: float):
    """What the job returns: its objective (the validation error) by default; with named objectives
    their values in its summary, a tuple for several (each objective's worst for a diverged or failed
    run: the Optuna sweeper tells those by their status anyway)."""
    if names is None:
        return objective
    if summary.get("status") in (Status.DIVERGED, Status.FAILED):
        values = worst_values(names, objective)
    else:
        values = objective_values(names, summary.get("metrics") or {})
    return values[0] if len(values) == 1 else tuple(values)
