"""The sweeper's bookkeeping in the Optuna study: the storage-wide lock, the study-wide trial budget,
what a job's exit or return means for its trial and how that is told, the heartbeats of the running
trials, the best results. (Imported lazily,
like _impl.py: Hydra's plugin scan skips `_` modules, so no Hydra start pays for SQLAlchemy here.)"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy
from filelock import FileLock
from hydra.types import TaskFunction
from omegaconf import DictConfig
from optuna.study import StudyDirection
from optuna.trial import TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from normbench.errors import one_line
from normbench.interrupts import process_stat
from normbench.record import Status
from normbench.sweep.objectives import OBJECTIVES
from normbench.sweep.optuna_support import backend, driver_url, engine_kwargs

log = logging.getLogger(__name__)

STATUS_ATTR = "status"                      # trial user attr: completed | diverged | failed | pruned
COUNTED_FAILURE_ATTR = "normbench:failed"   # FAIL trials the sweeper decided (they count as done)
FAILURE_STRATEGIES = ("worst", "fail")
SCHEMA_LOCK = "normbench:schema"
OWNER_ATTR = "normbench:owner"              # trial system attr: the sweeper process running it


def quote_override(value: str) -> str:
    """A string as a quoted Hydra override value."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def study_lock_name(study_name: str) -> str:
    return f"normbench:study:{study_name}"


def default_storage_url(sweep_dir: str | Path) -> str:
    """The embedded SQLite study next to the sweep's runs: <sweep dir>/optuna.db (dir created)."""
    path = Path(sweep_dir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'optuna.db'}"


# --------------------------------------------------------------------------------------------------
# The storage-wide lock


def _lock_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


_LOCK_ENGINES: dict[str, Any] = {}


def _lock_engine(url: str, connect_timeout: int):
    if url not in _LOCK_ENGINES:
        kwargs = engine_kwargs(url, connect_timeout)
        kwargs.pop("pool_pre_ping", None)
        _LOCK_ENGINES[url] = sqlalchemy.create_engine(driver_url(url), poolclass=NullPool, **kwargs)
    return _LOCK_ENGINES[url]


@contextlib.contextmanager
def _database_lock(url: str, name: str, connect_timeout: int) -> Iterator[None]:
    """PostgreSQL: an advisory lock; MySQL: GET_LOCK (both released when the connection drops)."""
    key = _lock_key(name)
    if backend(url) == "postgresql":
        take, give, args = "SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)", {"k": key}
    else:
        take, give, args = "SELECT GET_LOCK(:k, -1)", "SELECT RELEASE_LOCK(:k)", {"k": f"normbench{key}"}
    with _lock_engine(url, connect_timeout).connect() as conn:
        conn.execute(sqlalchemy.text(take), args)
        conn.commit()
        try:
            yield
        finally:
            conn.execute(sqlalchemy.text(give), args)
            conn.commit()


def sqlite_lock_path(url: str) -> Path | None:
    """<db>.lock for an SQLite file database; None for an in-memory one."""
    db = make_url(url).database
    return Path(db + ".lock") if db and db != ":memory:" else None


@contextlib.contextmanager
def storage_lock(url: str, name: str, connect_timeout: int = 10) -> Iterator[None]:
    """A lock shared by every process that uses this storage, held while a worker counts the study's
    trials and asks for new ones (so that n_trials is a study-wide total with no race), and while the
    schema is created. PostgreSQL: an advisory lock; MySQL: GET_LOCK; SQLite: a filelock (flock) on
    <db>.lock, which the kernel releases when its holder dies."""
    kind = backend(url)
    if kind in ("postgresql", "mysql"):
        with _database_lock(url, name, connect_timeout):
            yield
        return
    path = sqlite_lock_path(url) if kind == "sqlite" else None
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path):
        yield


# --------------------------------------------------------------------------------------------------
# The study-wide trial budget


def counts_toward_total(trial) -> bool:
    """Whether a trial uses up one of the study's n_trials.

    Everything counts except FAIL trials the sweeper did not decide: trials of a killed or interrupted
    sweeper, which are failed (stale heartbeat, Ctrl-C) and re-queued as a WAITING copy that counts."""
    if trial.state != TrialState.FAIL:
        return True
    return bool(trial.system_attrs.get(COUNTED_FAILURE_ATTR))


def trials_used(study) -> int:
    return sum(counts_toward_total(t) for t in study.get_trials(deepcopy=False))


def trials_to_ask(study, target: int) -> int:
    """How many trials a worker may ask for now: what is missing to reach `target`, plus the WAITING
    trials (enqueued, or re-queued after an interruption), which count already but still have to run."""
    trials = study.get_trials(deepcopy=False)
    used = sum(counts_toward_total(t) for t in trials)
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    return max(0, target - used) + waiting


# --------------------------------------------------------------------------------------------------
# Outcomes


class JobExited(RuntimeError):
    """A job called sys.exit with a non-zero status (normbench's entry point does so on user errors)."""

    def __init__(self, message: str, cause: BaseException | None = None):
        super().__init__(message)
        self.cause = cause


class TrialTask:
    """The task function as the launcher runs it: a job's sys.exit(n) becomes an ordinary failure, so
    that one bad trial is recorded as failed instead of ending the whole sweep."""

    def __init__(self, task_function: TaskFunction):
        self.task_function = task_function

    def __call__(self, cfg: DictConfig) -> Any:
        try:
            return self.task_function(cfg)
        except SystemExit as exc:
            if exc.code in (None, 0):
                raise
            cause = exc.__context__  # normbench's entry point exits 2 while handling a NormbenchError
            reason = one_line(cause) if cause is not None else "no message"
            raise JobExited(f"the job exited with status {exc.code} ({reason})", cause) from None


@dataclass
class Outcome:
    """What a finished job means for its trial."""
    status: str                 # a normbench.record.Status but running
    value: float | Sequence[float] | None  # the job's objective value(s); None when it raised
    error: str | None = None
    run_dir: str | None = None  # the job's output dir (its run record)
    attrs: dict = field(default_factory=dict)  # more trial user attrs (the W&B run id, test accuracy)

    def values(self) -> list[float] | None:
        if self.value is None:
            return None
        return [float(self.value)] if isinstance(self.value, (int, float)) else [float(v) for v in self.value]


def failure_values(directions: Sequence[str], objectives: Sequence[str] | None,
                   explicit: float | Sequence[float] | None) -> list[float]:
    """The values a failed or diverged trial is told under `failure: worst`, one per objective.

    `explicit` (hydra.sweeper.worst_value) is told as it is (a number for every objective, or one per
    objective). Otherwise each objective's worst possible value: the bound of a known normbench
    objective in its direction (val/error 1.0, val/best_acc 0.0, ...), else +inf when minimizing and
    -inf when maximizing -- worse than any value a trial can return. Optuna accepts infinite values;
    its samplers rank them last (TPE, NSGA-II, CMA-ES) or clip them to the worst finite value (GP)."""
    n = len(directions)
    if explicit is not None:
        values = [float(explicit)] * n if isinstance(explicit, (int, float)) else [float(v) for v in explicit]
        if len(values) != n:
            raise ValueError(f"hydra.sweeper.worst_value has {len(values)} values for {n} objectives")
        return values
    out = []
    for i, direction in enumerate(directions):
        known = OBJECTIVES.get(objectives[i]) if objectives and i < len(objectives) else None
        if known is not None and known.worst is not None and known.direction == direction:
            out.append(float(known.worst))
        else:
            out.append(math.inf if direction == "minimize" else -math.inf)
    return out


def returned_values(returned: Any, n: int) -> list[float] | str:
    """A job's return value as one float for each of `n` objectives (upstream's rules), or what is wrong
    with it."""
    if n == 1:
        try:
            return [float(returned)]
        except (TypeError, ValueError):
            return f"Return value must be float-castable. Got {returned!r}."
    try:
        values = [float(v) for v in returned]
    except (TypeError, ValueError):
        return f"Return value must be a list or tuple of float-castable values. Got {returned!r}."
    if len(values) != n:
        return (f"The number of the values and the number of the objectives are mismatched. "
                f"Expect {n}, but actually {len(values)}.")
    return values


def is_failure(trial) -> bool:
    """Whether a finished trial stands for a run that failed or diverged (told as the worst value)."""
    return trial.user_attrs.get(STATUS_ATTR) in (Status.DIVERGED, Status.FAILED)


def tell_outcome(study, trial, outcome: Outcome, strategy: str = "worst",
                 worst_value: float | Sequence[float] = 1.0):
    """Record a job's outcome in its trial.

    completed -> COMPLETE(values); pruned -> PRUNED (Optuna keeps the last reported value);
    diverged or failed -> strategy "worst": COMPLETE(worst_value, one per objective), so the sampler
    sees these parameters as the worst ones; strategy "fail": FAIL, which Optuna's samplers ignore.
    A FAIL told here counts toward n_trials (system attr normbench:failed)."""
    if strategy not in FAILURE_STRATEGIES:
        raise ValueError(f"failure strategy must be one of {FAILURE_STRATEGIES}, got {strategy!r}")
    storage, trial_id = study._storage, trial._trial_id
    storage.set_trial_user_attr(trial_id, STATUS_ATTR, str(outcome.status))
    if outcome.error:
        storage.set_trial_user_attr(trial_id, "error", outcome.error[:500])
    if outcome.run_dir:
        storage.set_trial_user_attr(trial_id, "run_dir", outcome.run_dir)
    for key, value in outcome.attrs.items():
        storage.set_trial_user_attr(trial_id, key, value)
    if outcome.status == Status.PRUNED:
        return study.tell(trial, state=TrialState.PRUNED)
    values = outcome.values()
    n = len(study.directions)
    if (outcome.status in (Status.DIVERGED, Status.FAILED) or values is None or len(values) != n
            or not all(math.isfinite(v) for v in values)):
        if strategy == "fail":
            storage.set_trial_system_attr(trial_id, COUNTED_FAILURE_ATTR, True)
            return study.tell(trial, state=TrialState.FAIL)
        worst = [float(worst_value)] * n if isinstance(worst_value, (int, float)) else list(worst_value)
        return study.tell(trial, values=worst)
    return study.tell(trial, values=values)


def tell_failed(study, trial, error: str) -> None:
    """FAIL that counts toward n_trials: a trial whose outcome could not be told (so a sweep ends)."""
    storage, trial_id = study._storage, trial._trial_id
    storage.set_trial_user_attr(trial_id, STATUS_ATTR, str(Status.FAILED))
    storage.set_trial_user_attr(trial_id, "error", error[:500])
    storage.set_trial_system_attr(trial_id, COUNTED_FAILURE_ATTR, True)
    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)


# --------------------------------------------------------------------------------------------------
# Heartbeats


class Heartbeat:
    """Records a heartbeat for each running trial of this process every `interval` seconds."""

    def __init__(self, storage, interval: int | None):
        self.storage, self.interval = storage, interval
        self.trial_ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if interval:
            self._thread = threading.Thread(target=self._run, name="optuna-heartbeat", daemon=True)
            self._thread.start()

    def beat(self, trial_id: int) -> None:
        if self.interval:
            self.storage.record_heartbeat(trial_id)

    def add(self, trial_id: int) -> None:
        with self._lock:
            self.trial_ids.add(trial_id)

    def discard(self, trial_id: int) -> None:
        with self._lock:
            self.trial_ids.discard(trial_id)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                ids = list(self.trial_ids)
            for trial_id in ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as err:  # noqa: BLE001 - a missed beat is retried next interval
                    log.debug("heartbeat for trial id %d failed: %s", trial_id, err)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


# --------------------------------------------------------------------------------------------------
# Trials whose sweeper died on this host


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc): a pid reused later differs."""
    return next(iter(process_stat(pid)[19:20]), None)


def mark_owner(storage, trial_id: int) -> None:
    """Which process runs this trial, so that its successor on the same host can tell it died."""
    pid = os.getpid()
    storage.set_trial_system_attr(trial_id, OWNER_ATTR,
                                  {"host": socket.gethostname(), "pid": pid, "start": _process_start(pid)})


def _owner_is_gone(owner) -> bool:
    if not isinstance(owner, dict) or owner.get("host") != socket.gethostname():
        return False  # another host's trial: only its heartbeat can tell
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    start = _process_start(pid)
    if start is None:  # gone (or no /proc: ask the kernel)
        return not _pid_alive(pid)
    return owner.get("start") is not None and start != owner["start"]  # the pid was reused


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def requeue_dead_local_trials(study, max_retry: int | None) -> list[int]:
    """RUNNING trials whose sweeper process on this host is gone (killed, then restarted at once):
    failed (not counted) and re-queued now, not after the heartbeat's grace period."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    storage, requeued = study._storage, []
    retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.system_attrs.get(OWNER_ATTR)
        if not _owner_is_gone(owner):
            continue
        try:
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            retry(study, storage.get_trial(trial._trial_id))
        except Exception as err:  # noqa: BLE001 - another worker got there first
            log.debug("could not re-queue trial %d: %s", trial.number, err)
            continue
        log.warning("Optuna trial %d: its sweeper (pid %s on this host) is gone: re-queued", trial.number,
                    owner.get("pid"))
        requeued.append(trial.number)
    return requeued


# --------------------------------------------------------------------------------------------------
# Results


def best_results(study, trials: list) -> dict | None:
    """optimization_results.yaml's content, as upstream (best_params / best_value, or the Pareto front
    as `solutions`), from the trials whose runs completed: a failure told as the worst value is never
    the best. None when no trial completed."""
    real = [t for t in trials if t.state == TrialState.COMPLETE and not is_failure(t)]
    if not real:
        return None
    if len(study.directions) == 1:
        pick = min if study.direction == StudyDirection.MINIMIZE else max
        best = pick(real, key=lambda t: t.value)
        return {"best_trial": best.number, "best_params": best.params, "best_value": best.value,
                "log": [f"Best value {best.value:.6g} (trial {best.number}): {best.params}"]}
    front = _pareto_front(real, study.directions)
    return {"solutions": [{"number": t.number, "params": t.params, "values": t.values} for t in front],
            "log": [f"Number of Pareto solutions: {len(front)}"]
                   + [f"    Values: {t.values}, Params: {t.params} (trial {t.number})" for t in front]}


def _pareto_front(trials: list, directions) -> list:
    signs = [1.0 if d == StudyDirection.MINIMIZE else -1.0 for d in directions]

    def dominates(a, b) -> bool:
        x = [s * v for s, v in zip(signs, a.values)]
        y = [s * v for s, v in zip(signs, b.values)]
        return all(p <= q for p, q in zip(x, y)) and any(p < q for p, q in zip(x, y))

    return [t for t in trials if not any(dominates(o, t) for o in trials if o is not t)]
