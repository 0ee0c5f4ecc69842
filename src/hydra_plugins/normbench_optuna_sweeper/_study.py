"""The sweeper's bookkeeping in the Optuna study: storage-wide lock, trial budget, outcomes, heartbeats,
best results. (Underscored like _impl.py, so that no Hydra start pays for SQLAlchemy here.)"""

from __future__ import annotations

import contextlib
import functools
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
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.study import StudyDirection
from optuna.study._multi_objective import _get_pareto_front_trials_by_trials
from optuna.trial import TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from normbench.errors import one_line
from normbench.interrupts import process_stat
from normbench.record import Status
from normbench.sweep.objectives import worst_value
from normbench.sweep.optuna_support import backend, driver_url, engine_kwargs, quiet_optuna

log = logging.getLogger(__name__)

STATUS_ATTR = "status"                      # trial user attr: completed | diverged | failed | pruned
COUNTED_FAILURE_ATTR = "normbench:failed"   # FAIL trials the sweeper decided (they count as done)
FAILURE_STRATEGIES = ("worst", "fail")
SCHEMA_LOCK = "normbench:schema"
OWNER_ATTR = "normbench:owner"              # trial system attr: the sweeper process running it


def quote_override(value: str) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def study_lock_name(study_name: str) -> str:
    return f"normbench:study:{study_name}"


@functools.cache
def _lock_engine(url: str, connect_timeout: int):
    kwargs = engine_kwargs(url, connect_timeout)
    kwargs.pop("pool_pre_ping", None)
    return sqlalchemy.create_engine(driver_url(url), poolclass=NullPool, **kwargs)


@contextlib.contextmanager
def _database_lock(url: str, name: str, connect_timeout: int) -> Iterator[None]:
    """PostgreSQL: an advisory lock; MySQL: GET_LOCK (both released when the connection drops)."""
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
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


def storage_lock(url: str, name: str, connect_timeout: int = 10) -> contextlib.AbstractContextManager:
    """A lock shared by every process of this storage, held while a worker counts the study's trials and
    asks for new ones (n_trials is a study-wide total with no race) and while the schema is created.
    SQLite: a flock on <db>.lock (released by the kernel when its holder dies)."""
    kind = backend(url)
    if kind in ("postgresql", "mysql"):
        return _database_lock(url, name, connect_timeout)
    db = make_url(url).database if kind == "sqlite" else None
    if not db or db == ":memory:":
        return contextlib.nullcontext()
    Path(db).parent.mkdir(parents=True, exist_ok=True)
    return FileLock(db + ".lock")


def trials_used(study) -> int:
    """All but the FAIL trials the sweeper did not decide (those of a killed or interrupted sweeper are
    re-queued as a WAITING copy that counts)."""
    return sum(t.state != TrialState.FAIL or bool(t.system_attrs.get(COUNTED_FAILURE_ATTR))
               for t in study.get_trials(deepcopy=False))


def trials_to_ask(study, target: int) -> int:
    """What is missing to reach `target`, plus the WAITING trials (counted, yet to run)."""
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    return max(0, target - trials_used(study)) + len(waiting)


class JobExited(RuntimeError):  # a job's sys.exit(n != 0): normbench's entry point's on user errors
    def __init__(self, message: str, cause: BaseException | None = None):
        super().__init__(message)
        self.cause = cause  # the error the entry point exited on (it pickles with the exception)


class TrialTask:
    """The task function whose sys.exit(n) is an ordinary failure: one bad trial does not end the sweep."""

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
class Outcome:  # what a finished job means for its trial
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
    """Under `failure: worst`: hydra.sweeper.worst_value (one for all, or one each) as it is, else each
    objective's worst possible value (+-inf where unbounded: Optuna's samplers rank those last)."""
    n = len(directions)
    if explicit is not None:
        values = [float(explicit)] * n if isinstance(explicit, (int, float)) else [float(v) for v in explicit]
        if len(values) != n:
            raise ValueError(f"hydra.sweeper.worst_value has {len(values)} values for {n} objectives")
        return values
    return [worst_value(name, direction) for name, direction in zip(objectives or [None] * n, directions)]


def returned_values(returned: Any, n: int) -> list[float] | str:
    """One float per objective (upstream's rules and messages), or what is wrong with the return value."""
    try:
        values = [float(returned)] if n == 1 else [float(v) for v in returned]
    except (TypeError, ValueError):
        kind = "float-castable" if n == 1 else "a list or tuple of float-castable values"
        return f"Return value must be {kind}. Got {returned!r}."
    if len(values) != n:
        return (f"The number of the values and the number of the objectives are mismatched. "
                f"Expect {n}, but actually {len(values)}.")
    return values


def is_failure(trial) -> bool:  # a run that failed or diverged, told as the worst value
    return trial.user_attrs.get(STATUS_ATTR) in (Status.DIVERGED, Status.FAILED)


def tell_outcome(study, trial, outcome: Outcome, strategy: str = "worst",
                 worst_value: float | Sequence[float] = 1.0):
    """completed -> COMPLETE(values); pruned -> PRUNED; diverged or failed -> "worst": COMPLETE(worst_value)
    (the sampler learns to avoid them), "fail": FAIL (the samplers ignore it)."""
    attrs = {STATUS_ATTR: str(outcome.status), "error": (outcome.error or "")[:500],
             "run_dir": outcome.run_dir, **outcome.attrs}
    for key, value in attrs.items():
        if value is not None and value != "":
            study._storage.set_trial_user_attr(trial._trial_id, key, value)
    if outcome.status == Status.PRUNED:
        return study.tell(trial, state=TrialState.PRUNED)
    values = outcome.values()
    n = len(study.directions)
    if (outcome.status in (Status.DIVERGED, Status.FAILED) or values is None or len(values) != n
            or not all(math.isfinite(v) for v in values)):
        if strategy == "fail":  # counts toward n_trials (system attr normbench:failed), so that a sweep ends
            study._storage.set_trial_system_attr(trial._trial_id, COUNTED_FAILURE_ATTR, True)
            return study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        worst = [float(worst_value)] * n if isinstance(worst_value, (int, float)) else list(worst_value)
        return study.tell(trial, values=worst)
    return study.tell(trial, values=values)


def requeue(study, trial, max_retry: int | None) -> None:
    """FAIL (not counted) and a WAITING copy (at most max_retry times) that the next sweeper runs first."""
    with quiet_optuna():
        retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
    study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
    retry(study, study._storage.get_trial(trial._trial_id))


class Heartbeat:
    """Records a heartbeat for each running trial of this process every `interval` seconds."""

    def __init__(self, storage, interval: int | None):
        self.storage, self.interval = storage, interval
        self.trial_ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="optuna-heartbeat", daemon=True)
        if interval:
            self._thread.start()

    def add(self, trial_id: int) -> None:  # beat now, then every interval until discarded
        if self.interval:
            self.storage.record_heartbeat(trial_id)
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
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def _process_start(pid: int) -> str | None:  # in clock ticks since boot: a pid reused later differs
    return next(iter(process_stat(pid)[19:20]), None)


def mark_owner(storage, trial_id: int) -> None:  # so that a successor on this host can tell it died
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
    if start is not None:
        return owner.get("start") is not None and start != owner["start"]  # the pid was reused
    try:  # gone (or no /proc: ask the kernel)
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        pass  # alive, another user's
    return False


def requeue_dead_local_trials(study, max_retry: int | None) -> None:
    """The RUNNING trials of a dead sweeper of this host, re-queued now (not after the grace period)."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.system_attrs.get(OWNER_ATTR)
        if not _owner_is_gone(owner):
            continue
        try:
            requeue(study, trial, max_retry)
        except Exception as err:  # noqa: BLE001 - another worker got there first
            log.debug("could not re-queue trial %d: %s", trial.number, err)
            continue
        log.warning("Optuna trial %d: its sweeper (pid %s on this host) is gone: re-queued", trial.number,
                    owner.get("pid"))


def best_results(study, trials: list) -> dict | None:
    """optimization_results.yaml's content as upstream's, from the trials whose runs completed (a
    failure told as the worst value is never the best); None when none did."""
    real = [t for t in trials if t.state == TrialState.COMPLETE and not is_failure(t)]
    if not real:
        return None
    if len(study.directions) == 1:
        pick = min if study.direction == StudyDirection.MINIMIZE else max
        best = pick(real, key=lambda t: t.value)
        return {"best_trial": best.number, "best_params": best.params, "best_value": best.value,
                "log": [f"Best value {best.value:.6g} (trial {best.number}): {best.params}"]}
    front = _get_pareto_front_trials_by_trials(real, study.directions)  # study.best_trials' own rule
    return {"solutions": [{"number": t.number, "params": t.params, "values": t.values} for t in front],
            "log": [f"Number of Pareto solutions: {len(front)}"]
                   + [f"    Values: {t.values}, Params: {t.params} (trial {t.number})" for t in front]}
