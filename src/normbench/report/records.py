"""Reading run records (the format: normbench.record) and pooling them into cells of seeds.

Only files are read, never live objects. ``scan`` walks the given directories with ``os.scandir``,
reads every ``summary.json`` and nothing else; the jsonl files and ``config.yaml`` are read on
demand (``RunRecord.epochs()``, ``.steps()``, ``.probes()``, ``.setting()``) for the few runs that
need them, and ``config.yaml`` of records written before normbench 0.2, which lack the seedless
identity. Records in progress, malformed or duplicated are returned as ``Skipped`` with a reason.

A ``Cell`` pools the runs that compute the same thing but for their seed: the same experiment and the
same seedless identity (normbench.identity: the config without the seed and the keys that do not
change the numbers).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from normbench.identity import NOT_IDENTITY, SEED, covered, override_key, seedless_identity
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
    _config: dict | None = field(default=None, repr=False)
    _config_read: bool = field(default=False, repr=False)
    _seedless: Any = field(default=_UNSET, repr=False)

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
    def seedless_identity(self) -> str | None:
        """The identity without the seed: summary.json's; for a record written before normbench 0.2,
        computed from its config.yaml (the resolved config); None when it has neither."""
        value = self.summary.get(SEEDLESS_IDENTITY)
        if isinstance(value, str) and value:
            return value
        if self._seedless is _UNSET:
            config = self.config()
            self._seedless = seedless_identity(config) if config else None
        return self._seedless

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
        node: Any = self.config()
        for part in path:
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    def config(self) -> dict:
        if not self._config_read:
            self._config_read = True
            if CONFIG in self.files:
                import yaml

                loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
                try:
                    with open(os.path.join(self.path, CONFIG), encoding="utf-8") as f:
                        data = yaml.load(f, Loader=loader)  # safe loader
                    self._config = data if isinstance(data, dict) else None
                except (OSError, yaml.YAMLError):
                    self._config = None
        return self._config or {}

    # --- per-run files (read on demand) ---------------------------------------------------
    def _jsonl(self, name: str) -> tuple[list[dict], int]:
        if name not in self.files:
            return [], 0
        return read_jsonl(os.path.join(self.path, name))

    def epochs(self) -> tuple[list[dict], int]:
        return self._jsonl(METRICS)

    def steps(self) -> tuple[list[dict], int]:
        return self._jsonl(STEPS)

    def probes(self) -> tuple[list[dict], int]:
        return self._jsonl(PROBES)

    @property
    def filters_png(self) -> str | None:
        return os.path.join(self.path, FILTERS) if FILTERS in self.files else None


@dataclass
class ScanResult:
    runs: list[RunRecord]
    skipped: list[Skipped]
    roots: list[str]
    seconds: float
    warnings: list[str] = field(default_factory=list)

    @property
    def n_records(self) -> int:
        return len(self.runs) + len(self.skipped)

    def summary_line(self) -> str:
        kinds: dict[str, int] = {}
        for s in self.skipped:
            kinds[s.kind] = kinds.get(s.kind, 0) + 1
        status: dict[str, int] = {}
        for r in self.runs:
            status[r.status] = status.get(r.status, 0) + 1
        parts = [f"{n} {k}" for k, n in sorted(status.items())]
        skipped = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"
        return (f"read {self.n_records} run records in {self.seconds:.2f}s: "
                f"{', '.join(parts) or 'no finished runs'}; skipped {len(self.skipped)} ({skipped})")


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
    warnings: list[str] = []
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
                skipped.append(Skipped(path, "duplicate", f"identity {item.identity} already read from {first.path}"))
                continue
            by_identity[item.identity] = item
            runs.append(item)
            if item.seedless_identity is None:
                warnings.append(f"{path}: no {SEEDLESS_IDENTITY} in {SUMMARY} and no readable {CONFIG}: "
                                "not pooled with other seeds")
    return ScanResult(runs, skipped, real_roots, time.perf_counter() - t0, warnings)


# --- cells: runs that differ only in their seed --------------------------------------------------

def pool_key(run: RunRecord) -> tuple[str, str]:
    """Runs with the same key differ at most in their seed and in keys that do not change the numbers
    (normbench.identity.NOT_IDENTITY): the experiment and the seedless identity. A run without a
    seedless identity (an old record without config.yaml) is a cell of its own: its identity."""
    return (run.experiment, run.seedless_identity or run.identity)


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
