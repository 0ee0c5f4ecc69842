"""Reading run records (docs/ARCHITECTURE.md) and the small statistics the report needs.

Only files are read, never live objects. ``scan`` walks the given directories with ``os.scandir``,
reads every ``summary.json`` and nothing else; the jsonl files and ``config.yaml`` are read on
demand (``RunRecord.epochs()``, ``.steps()``, ``.probes()``, ``.setting()``) for the few runs that
need them. Records in progress, malformed or duplicated are returned as ``Skipped`` with a reason.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

STATUSES = ("completed", "diverged", "failed", "pruned", "running")
# summary.json keys the report relies on, with their types
REQUIRED_KEYS: dict[str, type | tuple[type, ...]] = {
    "status": str,
    "identity": str,
    "experiment": str,
    "choices": dict,
    "overrides": list,
    "metrics": dict,
}
# metrics a completed run must report (values may be null where the job could not measure them)
METRIC_KEYS = (
    "test/loss", "test/acc", "val/best_acc", "val/acc", "val/loss", "train/loss", "train/acc",
    "convergence/epoch", "model/params", "memory/peak_mb", "time/total_s", "throughput/img_s",
)
REQUIRED_COMPLETED_NUMBERS = ("test/acc", "val/best_acc")
RECORD_FILES = frozenset({"summary.json", "config.yaml", "metrics.jsonl", "steps.jsonl", "probes.jsonl",
                          "filters.png"})
RUN_MARKERS = ("summary.json", "config.yaml", "metrics.jsonl")
# overrides that do not change a run's numbers (left out of the seed-pooling key)
NEUTRAL_OVERRIDE_PREFIXES = ("seed", "hydra", "logger", "data.root", "data.download", "trainer.device",
                             "trainer.threads", "trainer.checkpoint", "trainer.log_every_steps",
                             "experiment", "+experiment", "++experiment", "search", "+search")
# config.yaml paths of the numeric settings when summary["choices"] does not carry them
CONFIG_PATHS = {"dropout": ("model", "dropout"), "lr": ("optimizer", "lr"), "batch_size": ("batch_size",)}


class MalformedRecord(ValueError):
    pass


@dataclass
class Skipped:
    path: str
    kind: str  # "in progress" | "malformed" | "duplicate"
    reason: str


@dataclass
class RunRecord:
    path: str
    summary: dict[str, Any]
    files: frozenset[str]
    _config: dict | None = field(default=None, repr=False)
    _config_read: bool = field(default=False, repr=False)

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
        return self.choices.get("seed")

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
            if "config.yaml" in self.files:
                import yaml

                loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
                try:
                    with open(os.path.join(self.path, "config.yaml"), encoding="utf-8") as f:
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
        return self._jsonl("metrics.jsonl")

    def steps(self) -> tuple[list[dict], int]:
        return self._jsonl("steps.jsonl")

    def probes(self) -> tuple[list[dict], int]:
        return self._jsonl("probes.jsonl")

    @property
    def filters_png(self) -> str | None:
        return os.path.join(self.path, "filters.png") if "filters.png" in self.files else None


def read_jsonl(path: str) -> tuple[list[dict], int]:
    """Rows of a jsonl file and the number of lines that were not a JSON object (ignored)."""
    rows: list[dict] = []
    bad = 0
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return [], 1
    loads = json.loads
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            row = loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def validate_summary(summary: Any) -> None:
    """Raise MalformedRecord naming what does not follow the documented summary.json format."""
    if not isinstance(summary, dict):
        raise MalformedRecord(f"summary.json is a JSON {type(summary).__name__}, not an object")
    missing = [k for k in REQUIRED_KEYS if k not in summary]
    if missing:
        raise MalformedRecord(f"summary.json misses key(s) {', '.join(missing)}")
    for key, kind in REQUIRED_KEYS.items():
        if not isinstance(summary[key], kind):
            raise MalformedRecord(f"summary.json {key!r} is {type(summary[key]).__name__}, expected "
                                  f"{kind.__name__ if isinstance(kind, type) else kind}")
    if summary["status"] not in STATUSES:
        raise MalformedRecord(f"summary.json status {summary['status']!r} is not one of {', '.join(STATUSES)}")
    if not summary["identity"]:
        raise MalformedRecord("summary.json identity is empty")
    if not all(isinstance(o, str) for o in summary["overrides"]):
        raise MalformedRecord("summary.json overrides must be a list of strings")
    for key, value in summary["choices"].items():
        if not isinstance(value, (str, int, float, bool)) and value is not None:
            raise MalformedRecord(f"summary.json choices[{key!r}] is {type(value).__name__}")
    for key, value in summary["metrics"].items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise MalformedRecord(f"summary.json metrics[{key!r}] is {type(value).__name__}, not a number")
    if summary["status"] == "completed":
        missing = [k for k in METRIC_KEYS if k not in summary["metrics"]]
        if missing:
            raise MalformedRecord(f"completed run's metrics miss {', '.join(missing)}")
        nulls = [k for k in REQUIRED_COMPLETED_NUMBERS if summary["metrics"][k] is None]
        if nulls:
            raise MalformedRecord(f"completed run has null {', '.join(nulls)}")


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


def _run_dirs(root: str) -> Iterable[tuple[str, frozenset[str]]]:
    """Directories holding a run record, with the record files present. Hidden dirs and wandb/ are
    not entered, nor are a run dir's subdirectories."""
    stack = [root]
    while stack:
        path = stack.pop()
        names: set[str] = set()
        subdirs: list[str] = []
        try:
            with os.scandir(path) as it:
                for entry in it:
                    name = entry.name
                    if name in RECORD_FILES:
                        names.add(name)
                    elif not name.startswith(".") and name != "wandb" and entry.is_dir(follow_symlinks=False):
                        subdirs.append(entry.path)
        except OSError:
            continue
        if any(m in names for m in RUN_MARKERS):
            yield path, frozenset(names)
        else:
            stack.extend(sorted(subdirs, reverse=True))


def load_run(path: str, files: frozenset[str]) -> RunRecord | Skipped:
    if "summary.json" not in files:
        return Skipped(path, "in progress", "no summary.json")
    try:
        with open(os.path.join(path, "summary.json"), "rb") as f:
            raw = f.read()
    except OSError as e:
        return Skipped(path, "malformed", f"summary.json unreadable: {e.strerror or e}")
    try:
        summary = json.loads(raw)
    except ValueError as e:
        return Skipped(path, "malformed", f"summary.json is not valid JSON ({e})")
    try:
        validate_summary(summary)
    except MalformedRecord as e:
        return Skipped(path, "malformed", str(e))
    if summary["status"] == "running":
        return Skipped(path, "in progress", "status running")
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
        for path, files in _run_dirs(root):
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
    return ScanResult(runs, skipped, real_roots, time.perf_counter() - t0)


# --- cells: runs that differ only in their seed --------------------------------------------------

def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def pooling_key(run: RunRecord) -> tuple:
    """Runs with the same key differ only in their seed: same experiment, same choices other than
    seed, same value overrides (group overrides are in the choices already)."""
    choices = tuple(sorted((k, _hashable(v)) for k, v in run.choices.items() if k != "seed"))
    # group overrides (norm=bn) and overrides of numeric settings the choices carry (optimizer.lr when
    # choices has lr) are in the choices already
    known = set(run.choices) | {".".join(CONFIG_PATHS[k]) for k in run.choices if k in CONFIG_PATHS}
    overrides = tuple(sorted(
        o for o in run.overrides
        if "=" in o and _override_key(o) not in known
        and not _override_key(o).startswith(NEUTRAL_OVERRIDE_PREFIXES)
    ))
    return (run.experiment, choices, overrides)


def _hashable(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


@dataclass
class Cell:
    key: tuple
    experiment: str
    runs: list[RunRecord]  # completed runs (the statistics)
    diverged: list[RunRecord]
    other: list[RunRecord]  # failed / pruned
    choices: dict[str, Any] = field(default_factory=dict)  # the shared choices, seed left out
    _settings: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def all_runs(self) -> list[RunRecord]:
        return self.runs + self.diverged + self.other

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def value_overrides(self) -> tuple[str, ...]:
        return self.key[2]

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
    cells: dict[tuple, Cell] = {}
    for run in runs:
        key = pooling_key(run)
        cell = cells.get(key)
        if cell is None:
            cell = cells[key] = Cell(key, run.experiment, [], [], [], dict(key[1]))
        if run.status == "completed":
            cell.runs.append(run)
        elif run.status == "diverged":
            cell.diverged.append(run)
        else:
            cell.other.append(run)
    for cell in cells.values():
        for group in (cell.runs, cell.diverged, cell.other):
            group.sort(key=lambda r: (str(r.seed), r.path))
    return list(cells.values())


# --- statistics --------------------------------------------------------------------------------------

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_sf2(t: float, df: float) -> float:
    """Two-sided tail probability P(|T| >= |t|) of Student's t with df degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


_TQ: dict[tuple[float, float], float] = {}


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t (p > 0.5), by bisection on the two-sided tail."""
    key = (p, df)
    if key not in _TQ:
        target = 2.0 * (1.0 - p)
        lo, hi = 0.0, 1.0
        while t_sf2(hi, df) > target:
            hi *= 2.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if t_sf2(mid, df) > target:
                lo = mid
            else:
                hi = mid
            if hi - lo < 1e-12 * max(1.0, hi):
                break
        _TQ[key] = 0.5 * (lo + hi)
    return _TQ[key]


@dataclass(frozen=True)
class Stat:
    n: int
    mean: float | None
    sd: float | None  # sample standard deviation (n-1); None for n < 2
    ci: float | None  # half-width of the 95% confidence interval of the mean; None for n < 2

    def fmt(self, scale: float = 1.0, digits: int = 2) -> str:
        if self.mean is None:
            return "–"
        text = f"{self.mean * scale:.{digits}f}"
        if self.ci is not None:
            text += f" ± {self.ci * scale:.{digits}f}"
        return text


def mean_ci(values: Sequence[float], level: float = 0.95) -> Stat:
    """Mean and Student-t confidence interval of the mean."""
    n = len(values)
    if n == 0:
        return Stat(0, None, None, None)
    mean = math.fsum(values) / n
    if n == 1:
        return Stat(1, mean, None, None)
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    sd = math.sqrt(var)
    return Stat(n, mean, sd, t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n))


@dataclass(frozen=True)
class Comparison:
    diff: float | None  # mean(a) - mean(b)
    p: float | None  # Welch's t-test, two-sided
    df: float | None
    verdict: str  # "differs" | "within noise" | "cannot tell"
    text: str


def welch(a: Sequence[float], b: Sequence[float], alpha: float = 0.05) -> Comparison:
    """Can the data tell mean(a) from mean(b)? Welch's unequal-variance t-test at level alpha."""
    na, nb = len(a), len(b)
    if na == 0 or nb == 0:
        return Comparison(None, None, None, "cannot tell", "no data")
    sa, sb = mean_ci(a), mean_ci(b)
    diff = sa.mean - sb.mean
    if na < 2 or nb < 2:
        return Comparison(diff, None, None, "cannot tell", f"n={min(na, nb)}, cannot tell")
    va, vb = sa.sd ** 2 / na, sb.sd ** 2 / nb
    se2 = va + vb
    if se2 == 0.0:
        if diff == 0.0:
            return Comparison(0.0, 1.0, None, "within noise", "identical values")
        return Comparison(diff, 0.0, None, "differs", "differs (no spread in either)")
    df = se2 ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1))
    p = t_sf2(diff / math.sqrt(se2), df)
    verdict = "differs" if p < alpha else "within noise"
    return Comparison(diff, p, df, verdict, f"{verdict} (Welch p={p:.3g}, n={na}/{nb})")
