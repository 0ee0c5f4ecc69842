"""Reading run records (the format: normbench.record) and pooling them into cells of seeds. ``scan`` reads
every ``summary.json`` and nothing else (the other files on demand, for the few runs that need them);
records in progress, malformed or duplicated are ``Skipped`` with a reason."""

from __future__ import annotations

import math
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property, partialmethod
from typing import Any

from normbench.identity import NOT_IDENTITY, SEED, covered, override_key
from normbench.record import (
    CONFIG,
    FILTERS,
    METRICS,
    PROBES,
    REJECTED,
    SEEDLESS_IDENTITY,
    STEPS,
    SUMMARY,
    MalformedRecord,
    Status,
    load_json,
    read_config,
    read_jsonl,
    run_dirs,
    validate_summary,
)
from normbench.report.stats import Stat, mean_ci

# config.yaml paths of the numeric settings when summary["choices"] does not carry them
CONFIG_PATHS = {"dropout": ("model", "dropout"), "lr": ("optimizer", "lr"), "batch_size": ("batch_size",),
                "trainer.max_steps_per_epoch": ("trainer", "max_steps_per_epoch"),
                "trainer.max_steps": ("trainer", "max_steps")}
BUDGET = ("train/steps", "train/images")  # what a run trained on: optimizer steps, training images
_UNSET = object()
TRIAL_DIR = re.compile(r"trial-(\d+)")  # an Optuna job's dir name starts with it (identity.job_dirname)


@dataclass
class Skipped:
    path: str
    kind: str  # "in progress" | "malformed" | "duplicate" | "rejected" (failed its config check)
    reason: str


def num(value: Any) -> float:
    """A JSON value as float (nan for anything but a number)."""
    return math.nan if isinstance(value, bool) or not isinstance(value, (int, float)) else float(value)


def group_by(items: Iterable[Any], key: Any) -> dict[Any, list]:
    """key(item) -> the items with that key, in the order first seen."""
    out: dict[Any, list] = {}
    for item in items:
        out.setdefault(key(item), []).append(item)
    return out


def _summary_field(key: str) -> property:
    return property(lambda self: self.summary[key], doc=f'summary.json\'s "{key}"')


@dataclass
class RunRecord:
    path: str
    summary: dict[str, Any]
    files: frozenset[str]
    malformed: dict[str, str] = field(default_factory=dict, repr=False)  # file read -> what was left out

    # --- summary fields (validate_summary checked their types) --------------------------------
    status = _summary_field("status")  # str
    identity = _summary_field("identity")  # str
    experiment = _summary_field("experiment")  # str
    choices = _summary_field("choices")  # dict[str, Any]
    overrides = _summary_field("overrides")  # list[str]
    metrics = _summary_field("metrics")  # dict[str, Any]

    @property
    def seed(self) -> Any:
        return self.choices.get(SEED)

    @property
    def trial(self) -> int | None:
        """The Optuna trial number of a search job (from its directory name); None outside a search."""
        m = TRIAL_DIR.match(os.path.basename(self.path))
        return int(m.group(1)) if m else None

    @property
    def num_classes(self) -> int | None:
        data = self.config.get("data")
        n = data.get("num_classes") if isinstance(data, dict) else None
        return n if isinstance(n, int) and not isinstance(n, bool) and n >= 2 else None

    def metric(self, key: str) -> float | None:
        """A metric as float; None when absent, null or not finite. ``test/err`` = 1 - test/acc."""
        if key == "test/err":
            acc = self.metric("test/acc")
            return None if acc is None else 1.0 - acc
        if key in BUDGET:
            return self.budget[BUDGET.index(key)]
        value = num(self.summary.get(key) if key == "objective" else self.metrics.get(key))
        return value if math.isfinite(value) else None

    @cached_property
    def budget(self) -> tuple[float | None, float | None]:
        """Optimizer steps and training images as recorded, else the last epoch's step in metrics.jsonl and
        steps x batch_size (an upper bound: an epoch's last batch may be smaller)."""
        found = [self.summary.get(k, self.metrics.get(k)) for k in BUDGET]
        steps, images = (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
                         for v in found)
        if steps is None:
            ends = [row.get("step") for row in self.epochs]
            steps = next((float(e) for e in reversed(ends) if isinstance(e, int)), None)
        batch = self.setting("batch_size")
        if images is None and steps is not None and isinstance(batch, int):
            images = steps * batch
        return steps, images

    def setting(self, key: str) -> Any:
        """A settings value: from summary choices, else (dropout, lr, batch_size) from config.yaml."""
        if key in self.choices:
            return self.choices[key]
        path = CONFIG_PATHS.get(key)
        if path is None:
            return None
        node: Any = self.config
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        return node

    @cached_property
    def config(self) -> dict:
        """The run's config.yaml (the resolved config), read once; {} without a readable one."""
        if CONFIG not in self.files:
            return {}
        try:
            return read_config(self.path)
        except (OSError, ValueError) as err:
            self.malformed[CONFIG] = f"cannot be read ({getattr(err, 'strerror', None) or err})"
            return {}

    # per-run files, read on demand
    def _rows(self, name: str) -> list[dict]:
        rows, bad = read_jsonl(os.path.join(self.path, name)) if name in self.files else ([], 0)
        if bad:
            self.malformed[name] = f"has {bad} malformed line(s)"
        return rows

    steps = partialmethod(_rows, STEPS)
    probes = partialmethod(_rows, PROBES)

    @cached_property
    def epochs(self) -> list[dict]:  # read once: the budget, the speed column and figures need them
        return self._rows(METRICS)

    def val_curve(self) -> list[tuple[float, float]]:
        """(steps, validation accuracy) at each epoch end of metrics.jsonl."""
        return sorted((float(s), float(acc)) for row in self.epochs if isinstance(s := row.get("step"), int)
                      and isinstance(acc := row.get("val/acc"), (int, float)) and math.isfinite(acc))

    @property
    def filters_png(self) -> str | None:
        return os.path.join(self.path, FILTERS) if FILTERS in self.files else None


@dataclass
class ScanResult:
    runs: list[RunRecord]
    skipped: list[Skipped]
    roots: list[str]
    seconds: float

    @property
    def n_records(self) -> int:
        return len(self.runs) + len(self.skipped)

    def summary_line(self) -> str:
        runs, skipped = (", ".join(f"{n} {k}" for k, n in sorted(Counter(values).items()))
                         for values in ([r.status for r in self.runs], [s.kind for s in self.skipped]))
        return (f"read {self.n_records} run records in {self.seconds:.2f}s: {runs or 'no finished runs'}; "
                f"skipped {len(self.skipped)} ({skipped or 'none'})")


def load_run(path: str, files: frozenset[str]) -> RunRecord | Skipped:
    if SUMMARY not in files and REJECTED in files:  # a sweep job that failed before its run started
        try:
            reason = str(load_json(os.path.join(path, REJECTED)).get("error") or "no reason recorded")
        except (OSError, ValueError, AttributeError):
            reason = f"{REJECTED} unreadable"
        return Skipped(path, "rejected", reason)
    if SUMMARY not in files:
        return Skipped(path, "in progress", f"no {SUMMARY}")
    try:
        summary = load_json(os.path.join(path, SUMMARY))
    except OSError as e:
        return Skipped(path, "malformed", f"{SUMMARY} unreadable: {e.strerror or e}")
    except ValueError as e:
        return Skipped(path, "malformed", f"{SUMMARY} is not valid JSON ({e})")
    try:
        validate_summary(summary)
    except MalformedRecord as e:
        return Skipped(path, "malformed", str(e))
    if summary["status"] in (Status.RUNNING, Status.INTERRUPTED):  # a re-run continues an interrupted run
        return Skipped(path, "in progress", f"status {summary['status']}")
    return RunRecord(path, summary, files)


def scan(roots: Sequence[str | os.PathLike]) -> ScanResult:
    """Every run record under the given directories (a run dir itself is accepted too)."""
    t0 = time.perf_counter()
    skipped, real_roots, seen_dirs = [], [os.path.realpath(os.fspath(root)) for root in roots], set()
    by_identity: dict[str, RunRecord] = {}  # the runs read, first of each identity
    for root in real_roots:
        for path, files in run_dirs(root):
            if path in seen_dirs:
                continue
            seen_dirs.add(path)
            item = load_run(path, files)
            if isinstance(item, Skipped):
                skipped.append(item)
            elif (first := by_identity.setdefault(item.identity, item)) is not item:
                reason = f"identity {item.identity} already read from {first.path}"
                skipped.append(Skipped(path, "duplicate", reason))
    return ScanResult(list(by_identity.values()), skipped, real_roots, time.perf_counter() - t0)


def pool_key(run: RunRecord) -> tuple[str, str]:
    """The experiment and the seedless identity: runs with the same key differ at most in their seed and
    in keys that do not change the numbers (a record made by hand without one is a cell of its own)."""
    return (run.experiment, run.summary.get(SEEDLESS_IDENTITY) or run.identity)


def value_overrides(run: RunRecord) -> tuple[str, ...]:
    """The run's overrides of values, for display only: not the seed, keys that do not change the numbers,
    nor what the choices and the experiment show already (norm=bn, optimizer.lr, +experiment=...)."""
    shown = set(run.choices) | {".".join(CONFIG_PATHS[k]) for k in run.choices if k in CONFIG_PATHS}
    shown.add("experiment")
    ignored = (*NOT_IDENTITY, SEED)
    return tuple(sorted(o for o in run.overrides
                        if "=" in o and (key := override_key(o)) not in shown and not covered(key, ignored)))


@dataclass
class Cell:
    key: tuple[str, str]  # pool_key: (experiment, seedless identity)
    experiment: str
    runs: list[RunRecord]  # completed runs (the statistics)
    diverged: list[RunRecord]
    other: list[RunRecord]  # failed / pruned
    choices: dict[str, Any] = field(default_factory=dict)  # the choices its runs share, seed left out
    value_overrides: tuple[str, ...] = ()  # its runs' value overrides (display only, see value_overrides())
    _settings: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def all_runs(self) -> list[RunRecord]:
        return self.runs + self.diverged + self.other

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def trials(self) -> str:
        return ", ".join(str(t) for t in sorted({r.trial for r in self.all_runs if r.trial is not None}))

    def setting(self, key: str) -> Any:
        if key in self.choices:
            return self.choices[key]
        if key not in self._settings:
            self._settings[key] = next((v for run in self.all_runs if (v := run.setting(key)) is not None),
                                       None)
        return self._settings[key]

    def values(self, metric: str) -> list[float]:
        return [v for run in self.runs if (v := run.metric(metric)) is not None]

    def stat(self, metric: str) -> Stat:
        return mean_ci(self.values(metric))


def used(cells: Sequence[Cell]) -> str:
    """The data and models the cells ran (for headings): "fashion_mnist, vgg_a_light"."""
    names = [sorted({str(c.choices.get(k)) for c in cells if c.choices.get(k) is not None})
             for k in ("data", "model")]
    return ", ".join(" / ".join(n) for n in names if n)


def budget_notes(cells: Sequence[Cell]) -> list[str]:
    """The caps on the runs' budgets (a preset's or the command line's): an 'epoch' of a capped run is
    that many steps, not a pass over the training data."""
    caps = {key: sorted({str(v) for c in cells if (v := c.setting(key)) is not None})
            for key in ("trainer.max_steps_per_epoch", "trainer.max_steps")}
    text = " ".join(f"{k}={'/'.join(v)}" for k, v in caps.items() if v)
    return [f"Budget: {text} caps the runs (steps and images: what each run trained on)."] * bool(text)


def cells_of(runs: Iterable[RunRecord]) -> list[Cell]:
    return [_cell(key, same) for key, same in group_by(runs, pool_key).items()]


def _cell(key: tuple[str, str], runs: list[RunRecord]) -> Cell:
    runs = sorted(runs, key=lambda r: (str(r.seed), r.path))
    first = runs[0]
    choices = {k: v for k, v in sorted(first.choices.items())
               if k != SEED and all(r.choices.get(k, _UNSET) == v for r in runs[1:])}
    overrides = tuple(sorted({o for r in runs for o in value_overrides(r)}))
    cell = Cell(key, first.experiment, [], [], [], choices, overrides)
    for run in runs:
        {Status.COMPLETED: cell.runs, Status.DIVERGED: cell.diverged}.get(run.status, cell.other).append(run)
    return cell
