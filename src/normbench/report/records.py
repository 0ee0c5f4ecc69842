"""Reading run records (the format: normbench.record) and pooling them into cells of seeds.

Only files are read, never live objects. ``scan`` walks the given directories with ``os.scandir``,
reads every ``summary.json`` and nothing else; the jsonl files and ``config.yaml`` are read on
demand (``RunRecord.epochs()``, ``.steps()``, ``.probes()``, ``.setting()``, ``.num_classes``) for the
few runs that need them. Records in progress, malformed or duplicated are returned as ``Skipped`` with a
reason.

A ``Cell`` pools the runs that compute the same thing but for their seed: the same experiment and the
same seedless identity (normbench.identity: the config without the seed and the keys that do not
change the numbers).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
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
    read_jsonl,
    run_dirs,
    validate_summary,
)
from normbench.report.stats import Stat, mean_ci

# config.yaml paths of the numeric settings when summary["choices"] does not carry them
CONFIG_PATHS = {"dropout": ("model", "dropout"), "lr": ("optimizer", "lr"), "batch_size": ("batch_size",)}
_UNSET = object()


@dataclass
class Skipped:
    path: str
    kind: str  # "in progress" | "malformed" | "duplicate" | "rejected" (failed its config check)
    reason: str


@dataclass
class RunRecord:
    path: str
    summary: dict[str, Any]
    files: frozenset[str]
    malformed: dict[str, int] = field(default_factory=dict, repr=False)  # jsonl file read -> lines ignored

    # --- summary fields -------------------------------------------------------------------
    @property
    def status(self) -> str:
        return self.summary["status"]

    @property
    def identity(self) -> str:
        return self.summary["identity"]

    @property
    def experiment(self) -> str:
        return self.summary["experiment"]

    @property
    def choices(self) -> dict[str, Any]:
        return self.summary["choices"]

    @property
    def overrides(self) -> list[str]:
        return self.summary["overrides"]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.summary["metrics"]

    @property
    def seed(self) -> Any:
        return self.choices.get(SEED)

    @property
    def num_classes(self) -> int | None:
        """data.num_classes of the run's config.yaml (the resolved config: every run writes it); None
        without one."""
        data = self.config.get("data")
        n = data.get("num_classes") if isinstance(data, dict) else None
        return n if isinstance(n, int) and not isinstance(n, bool) and n >= 2 else None

    def metric(self, key: str) -> float | None:
        """A metric as float; None when absent, null or not finite. ``test/err`` = 1 - test/acc."""
        if key == "test/err":
            acc = self.metric("test/acc")
            return None if acc is None else 1.0 - acc
        value = self.metrics.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        value = float(value)
        return value if math.isfinite(value) else None

    # --- settings -------------------------------------------------------------------------
    def setting(self, key: str) -> Any:
        """A settings value: from summary choices, else (dropout, lr, batch_size) from config.yaml."""
        if key in self.choices:
            return self.choices[key]
        path = CONFIG_PATHS.get(key)
        if path is None:
            return None
        node: Any = self.config
        for part in path:
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    @cached_property
    def config(self) -> dict:
        """The run's config.yaml (the resolved config), read once; {} without a readable one."""
        if CONFIG not in self.files:
            return {}
        import yaml

        try:
            with open(os.path.join(self.path, CONFIG), encoding="utf-8") as f:
                data = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        except (OSError, yaml.YAMLError):
            return {}
        return data if isinstance(data, dict) else {}

    # --- per-run files (read on demand) ---------------------------------------------------
    def _jsonl(self, name: str) -> tuple[list[dict], int]:
        if name not in self.files:
            return [], 0
        return read_jsonl(os.path.join(self.path, name))

    def _rows(self, name: str) -> list[dict]:
        rows, bad = self._jsonl(name)
        if bad:
            self.malformed[name] = bad
        return rows

    def epochs(self) -> list[dict]:
        return self._rows(METRICS)

    def steps(self) -> list[dict]:
        return self._rows(STEPS)

    def probes(self) -> list[dict]:
        return self._rows(PROBES)

    @property
    def filters_png(self) -> str | None:
        return os.path.join(self.path, FILTERS) if FILTERS in self.files else None


def malformed_warnings(runs: Iterable[RunRecord]) -> list[str]:
    """One warning per jsonl file the report read that had malformed lines (they were left out)."""
    return [f"{run.path}: {name} has {bad} malformed line(s), ignored"
            for run in runs for name, bad in run.malformed.items()]


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
        status = Counter(r.status for r in self.runs)
        kinds = Counter(s.kind for s in self.skipped)
        parts = ", ".join(f"{n} {k}" for k, n in sorted(status.items())) or "no finished runs"
        skipped = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"
        return (f"read {self.n_records} run records in {self.seconds:.2f}s: {parts}; "
                f"skipped {len(self.skipped)} ({skipped})")


def load_run(path: str, files: frozenset[str]) -> RunRecord | Skipped:
    if SUMMARY not in files and REJECTED in files:  # a sweep job that failed before its run started
        try:
            with open(os.path.join(path, REJECTED), "rb") as f:
                reason = str(json.loads(f.read()).get("error") or "no reason recorded")
        except (OSError, ValueError, AttributeError):
            reason = f"{REJECTED} unreadable"
        return Skipped(path, "rejected", reason)
    if SUMMARY not in files:
        return Skipped(path, "in progress", f"no {SUMMARY}")
    try:
        with open(os.path.join(path, SUMMARY), "rb") as f:
            raw = f.read()
    except OSError as e:
        return Skipped(path, "malformed", f"{SUMMARY} unreadable: {e.strerror or e}")
    try:
        summary = json.loads(raw)
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
    runs: list[RunRecord] = []
    skipped: list[Skipped] = []
    seen_dirs: set[str] = set()
    by_identity: dict[str, RunRecord] = {}
    real_roots = []
    for root in roots:
        root = os.path.realpath(os.fspath(root))
        real_roots.append(root)
        for path, files in run_dirs(root):
            if path in seen_dirs:
                continue
            seen_dirs.add(path)
            item = load_run(path, files)
            if isinstance(item, Skipped):
                skipped.append(item)
                continue
            first = by_identity.get(item.identity)
            if first is not None:
                reason = f"identity {item.identity} already read from {first.path}"
                skipped.append(Skipped(path, "duplicate", reason))
                continue
            by_identity[item.identity] = item
            runs.append(item)
    return ScanResult(runs, skipped, real_roots, time.perf_counter() - t0)


# --- cells: runs that differ only in their seed --------------------------------------------------

def pool_key(run: RunRecord) -> tuple[str, str]:
    """Runs with the same key differ at most in their seed and in keys that do not change the numbers
    (normbench.identity.NOT_IDENTITY): the experiment and the seedless identity, which every run
    writes into its summary.json (a record made by hand without one is a cell of its own)."""
    return (run.experiment, run.summary.get(SEEDLESS_IDENTITY) or run.identity)


def value_overrides(run: RunRecord) -> tuple[str, ...]:
    """The run's overrides of values, for display only: not the seed nor keys that do not change the
    numbers (NOT_IDENTITY), nor what the choices and the experiment show already (group overrides such
    as norm=bn, optimizer.lr when the choices carry lr, +experiment=...)."""
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

    def setting(self, key: str) -> Any:
        if key in self.choices:
            return self.choices[key]
        if key not in self._settings:
            value = None
            for run in self.all_runs:
                value = run.setting(key)
                if value is not None:
                    break
            self._settings[key] = value
        return self._settings[key]

    def values(self, metric: str) -> list[float]:
        out = []
        for run in self.runs:
            v = run.metric(metric)
            if v is not None:
                out.append(v)
        return out

    def stat(self, metric: str) -> Stat:
        return mean_ci(self.values(metric))


def cells_of(runs: Iterable[RunRecord]) -> list[Cell]:
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(pool_key(run), []).append(run)
    return [_cell(key, group) for key, group in groups.items()]


def _cell(key: tuple[str, str], runs: list[RunRecord]) -> Cell:
    runs = sorted(runs, key=lambda r: (str(r.seed), r.path))
    first = runs[0]
    choices = {k: v for k, v in sorted(first.choices.items())
               if k != SEED and all(r.choices.get(k, _UNSET) == v for r in runs[1:])}
    overrides = tuple(sorted({o for r in runs for o in value_overrides(r)}))
    cell = Cell(key, first.experiment, [], [], [], choices, overrides)
    for run in runs:
        if run.status == Status.COMPLETED:
            cell.runs.append(run)
        elif run.status == Status.DIVERGED:
            cell.diverged.append(run)
        else:
            cell.other.append(run)
    return cell
