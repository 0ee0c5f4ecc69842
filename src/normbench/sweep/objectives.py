"""What a sweep job returns to its sweeper: one value per objective (docs/optuna.md), by default its
validation error. Test metrics are not objectives: the test set never guides a search."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from normbench.errors import ConfigError
from normbench.record import Status

DEFAULT = "val/error"
KEY = "hydra.sweeper.objectives"


@dataclass(frozen=True)
class Objective:
    direction: str          # minimize | maximize
    worst: float | None     # the worst possible value, when the metric is bounded that way


# Each a metric of summary.json, but val/error: 1 - val/best_acc.
OBJECTIVES: dict[str, Objective] = {
    "val/error": Objective("minimize", 1.0), "val/best_acc": Objective("maximize", 0.0),
    "time/total_s": Objective("minimize", None), "model/params": Objective("minimize", None),
    "memory/peak_mb": Objective("minimize", None), "throughput/img_s": Objective("maximize", 0.0),
    "convergence/epoch": Objective("minimize", None),
}


def check_objectives(names: Sequence[str] | None) -> list[str]:
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
    """None where a metric is missing or not finite."""
    metrics = dict(metrics or {})
    best = metrics.get("val/best_acc")
    metrics[DEFAULT] = None if best is None else 1.0 - float(best)
    values = [metrics.get(name) for name in names]
    return [float(v) if v is not None and math.isfinite(float(v)) else None for v in values]


def worst_value(name: str | None, direction: str) -> float:
    """Its bound where it has one that way (val/error 1.0, val/best_acc 0.0), else +-inf."""
    known = OBJECTIVES.get(name)
    if known is not None and known.worst is not None and known.direction == direction:
        return float(known.worst)
    return math.inf if direction == "minimize" else -math.inf


def job_objectives() -> list[str] | None:
    """hydra.sweeper.objectives of this job's sweeper; None for the default (the validation error)."""
    from hydra.core.hydra_config import HydraConfig

    names = (HydraConfig.get().get("sweeper") or {}).get("objectives") if HydraConfig.initialized() else None
    if names is None:
        return None
    names = check_objectives(list(names))
    return None if names == [DEFAULT] else names


def job_return(names: Sequence[str] | None, summary: dict, objective: float):
    """The validation error by default; with named objectives their values, a tuple for several (the
    worst for a diverged or failed run: the Optuna sweeper tells those by their status anyway)."""
    if names is None:
        return objective
    if summary.get("status") in (Status.DIVERGED, Status.FAILED):
        values = [float(objective) if name == DEFAULT else worst_value(name, OBJECTIVES[name].direction)
                  for name in names]
    else:
        values = objective_values(names, summary.get("metrics") or {})
    return values[0] if len(values) == 1 else tuple(values)
