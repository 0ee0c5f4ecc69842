"""Optuna plumbing shared by the sweeper extension (hydra_plugins.normbench_optuna_sweeper) and the job.

The sweeper asks Optuna for trials and launches one Hydra job per trial. Each job learns which trial it
is through three entries of `hydra.job.env_set` (set by the sweeper as per-job Hydra overrides, so they
never touch the job's own config, its identity or its output dir name):

    NORMBENCH_OPTUNA_STUDY      study name
    NORMBENCH_OPTUNA_TRIAL_ID   Optuna's storage-wide trial id (what the job re-opens)
    NORMBENCH_OPTUNA_TRIAL      the trial's number in the study (for people)

The storage URL reaches the job through the environment variable NORMBENCH_OPTUNA_STORAGE, which the
sweeper sets in its own process (jobs inherit it: in-process, joblib, submitit, sbatch's default
--export=ALL). It is never written into a config, so a password in it stays out of the run records.

`trial_pruner(cfg)` re-opens the trial from the storage and returns an object whose
`should_stop(epoch, val_error)` reports the epoch's validation error to Optuna and asks its pruner.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import math
import os
import re
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from normbench.errors import StorageError

log = logging.getLogger(__name__)

ENV_STORAGE = "NORMBENCH_OPTUNA_STORAGE"   # set by the sweeper for its jobs (may hold a password)
ENV_STUDY = "NORMBENCH_OPTUNA_STUDY"
ENV_TRIAL_ID = "NORMBENCH_OPTUNA_TRIAL_ID"
ENV_TRIAL_NUMBER = "NORMBENCH_OPTUNA_TRIAL"
USER_STORAGE_ENV = "NORMBENCH_STORAGE"      # what users set; conf/search/*.yaml read it

PRUNED_ATTR = "normbench:pruned_epoch"      # trial system attr the job sets when its pruner stops it
STATUS_ATTR = "status"                      # trial user attr: completed | diverged | failed | pruned
COUNTED_FAILURE_ATTR = "normbench:failed"   # FAIL trials the sweeper decided (they count as done)
FAILURE_STRATEGIES = ("worst", "fail")
MASK = "***"


# --------------------------------------------------------------------------------------------------
# Credentials


def url_secrets(url: str | None) -> list[str]:
    """The password of a storage URL in every spelling it may take in text (raw, decoded, encoded)."""
    if not url:
        return []
    found: set[str] = set()
    match = re.search(r"^[A-Za-z][\w+.-]*://[^/@:?#]*:([^@/?#]*)@", url)
    if match and match.group(1):
        found.add(match.group(1))
    for m in re.finditer(r"[?&](?:password|passwd|pwd)=([^&#]*)", url, flags=re.IGNORECASE):
        if m.group(1):
            found.add(m.group(1))
    for secret in list(found):
        found.add(unquote(secret))
        found.add(quote(unquote(secret), safe=""))
    return sorted((s for s in found if s and s != MASK), key=len, reverse=True)


def mask_url(url: str | None) -> str | None:
    """The URL with its password (userinfo or ?password=) replaced by ***."""
    if url is None:
        return None
    masked = re.sub(r"^([A-Za-z][\w+.-]*://[^/@:?#]*:)([^@/?#]*)(@)", rf"\g<1>{MASK}\g<3>", url)
    masked = re.sub(r"([?&](?:password|passwd|pwd)=)[^&#]*", rf"\g<1>{MASK}", masked, flags=re.IGNORECASE)
    return masked


def mask_text(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, MASK)
    return text


def quote_override(value: str) -> str:
    """A string as a quoted Hydra override value."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Silence Optuna's notes about the (stable for years) heartbeat API being "experimental" and about
    heartbeats being "supposed to be used with Study.optimize" (we record them ourselves)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        yield


# --------------------------------------------------------------------------------------------------
# Storage


def default_storage_url(sweep_dir: str | os.PathLike) -> str:
    """The embedded SQLite study next to the sweep's runs: <sweep dir>/optuna.db (dir created)."""
    path = Path(sweep_dir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'optuna.db'}"


def backend(url: str) -> str:
    kind = url.split(":", 1)[0].split("+", 1)[0].lower()
    return "postgresql" if kind == "postgres" else kind


def driver_url(url: str) -> str:
    """The URL SQLAlchemy is given. `postgresql://` (or `postgres://`) without a driver means psycopg
    (v3) to SQLAlchemy 2.1; when only psycopg2 is installed (our dependency), use it instead."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme.lower() in ("postgresql", "postgres"):
        import importlib.util

        has_psycopg3 = importlib.util.find_spec("psycopg") is not None
        return f"postgresql{'' if has_psycopg3 else '+psycopg2'}://{rest}"
    return url


@dataclass
class StorageSettings:
    heartbeat_interval: int | None = 60
    grace_period: int | None = None
    max_retry: int | None = 3
    connect_timeout: int = 10


_STORAGES: dict[str, Any] = {}
_STORAGES_LOCK = threading.Lock()


def _engine_kwargs(url: str, connect_timeout: int) -> dict:
    kind = backend(url)
    if kind == "postgresql":
        # pre-ping: a worker's pooled connection may sit idle for a whole training run.
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": int(connect_timeout)}}
    if kind == "mysql":
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": int(connect_timeout)}}
    if kind == "sqlite":
        return {"connect_args": {"timeout": 60}}
    return {}


def first_line(err: BaseException) -> str:
    """The first line of an error's message (of the driver's own error for SQLAlchemy ones)."""
    orig = getattr(err, "orig", None) or err
    text = str(orig).strip() or type(orig).__name__
    return text.splitlines()[0].strip()


def open_storage(url: str, settings: StorageSettings | None = None):
    """An Optuna RDBStorage for `url` (one per URL and process; jobs in the sweeper's process share it).

    Fails with a one-line StorageError naming the URL with its password masked."""
    import optuna

    settings = settings or StorageSettings()
    with _STORAGES_LOCK:
        if url in _STORAGES:
            return _STORAGES[url]
        if backend(url) not in ("sqlite", "postgresql", "mysql", "oracle", "mssql"):
            raise StorageError(f"bad value hydra.sweeper.storage={mask_url(url)!r}: use an SQLAlchemy URL "
                               "(sqlite:///path/optuna.db, postgresql://user:password@host/db, ...)")
        kwargs: dict[str, Any] = {}
        if settings.heartbeat_interval:
            with quiet_optuna():
                retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=settings.max_retry)
            kwargs.update(heartbeat_interval=int(settings.heartbeat_interval),
                          grace_period=int(settings.grace_period) if settings.grace_period else None,
                          heartbeat_stale_trial_callback=retry)
        try:
            with quiet_optuna(), storage_lock(url, "normbench:schema", settings.connect_timeout):
                storage = optuna.storages.RDBStorage(
                    driver_url(url), engine_kwargs=_engine_kwargs(url, settings.connect_timeout), **kwargs)
        except StorageError:
            raise
        except Exception as err:  # noqa: BLE001 - any driver error becomes one clear line
            secrets = url_secrets(url)
            raise StorageError(f"cannot open the Optuna storage {mask_url(url)}: "
                               f"{mask_text(first_line(err), secrets)}") from None
        _STORAGES[url] = storage
        return storage


def _lock_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


@contextlib.contextmanager
def storage_lock(url: str, name: str, connect_timeout: int = 10) -> Iterator[None]:
    """A lock shared by every process that uses this storage, held while a worker counts the study's
    trials and asks for new ones (so that n_trials is a study-wide total with no race), and while the
    schema is created. PostgreSQL: an advisory lock; MySQL: GET_LOCK; SQLite: flock on <db>.lock."""
    kind = backend(url)
    if kind == "sqlite":
        db = url.split(":///", 1)[1] if ":///" in url else ""
        db = db.split("?", 1)[0]
        if not db or db == ":memory:":
            yield
            return
        lock_path = Path(db + ".lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    if kind not in ("postgresql", "mysql"):
        yield
        return
    import sqlalchemy

    engine = _lock_engine(url, connect_timeout)
    key = _lock_key(name)
    with engine.connect() as conn:
        if kind == "postgresql":
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        else:
            conn.execute(sqlalchemy.text("SELECT GET_LOCK(:k, -1)"), {"k": f"normbench{key}"})
        conn.commit()
        try:
            yield
        finally:
            if kind == "postgresql":
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            else:
                conn.execute(sqlalchemy.text("SELECT RELEASE_LOCK(:k)"), {"k": f"normbench{key}"})
            conn.commit()


_LOCK_ENGINES: dict[str, Any] = {}


def _lock_engine(url: str, connect_timeout: int):
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    if url not in _LOCK_ENGINES:
        kwargs = _engine_kwargs(url, connect_timeout)
        kwargs.pop("pool_pre_ping", None)
        _LOCK_ENGINES[url] = sqlalchemy.create_engine(driver_url(url), poolclass=NullPool, **kwargs)
    return _LOCK_ENGINES[url]


# --------------------------------------------------------------------------------------------------
# Study bookkeeping


def counts_toward_total(trial) -> bool:
    """Whether a trial uses up one of the study's n_trials.

    Everything counts except FAIL trials the sweeper did not decide: trials of a killed or interrupted
    sweeper, which are failed (stale heartbeat, Ctrl-C) and re-queued as a WAITING copy that counts."""
    from optuna.trial import TrialState

    if trial.state != TrialState.FAIL:
        return True
    return bool(trial.system_attrs.get(COUNTED_FAILURE_ATTR))


def trials_used(study) -> int:
    return sum(counts_toward_total(t) for t in study.get_trials(deepcopy=False))


def trials_to_ask(study, target: int) -> int:
    """How many trials a worker may ask for now: what is missing to reach `target`, plus the WAITING
    trials (enqueued, or re-queued after an interruption), which count already but still have to run."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    used = sum(counts_toward_total(t) for t in trials)
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    return max(0, target - used) + waiting


@dataclass
class Outcome:
    """What a finished job means for its trial."""
    status: str                 # completed | diverged | failed | pruned
    value: float | None         # the job's objective (validation error); None when it raised
    error: str | None = None
    run_dir: str | None = None  # the job's output dir (its run record)


def tell_outcome(study, trial, outcome: Outcome, strategy: str = "worst", worst_value: float = 1.0):
    """Record a job's outcome in its trial.

    completed -> COMPLETE(value); pruned -> PRUNED (Optuna keeps the last reported value);
    diverged or failed -> strategy "worst": COMPLETE(worst_value), so the sampler sees these
    parameters as the worst ones; strategy "fail": FAIL, which Optuna's samplers ignore."""
    from optuna.trial import TrialState

    if strategy not in FAILURE_STRATEGIES:
        raise ValueError(f"failure strategy must be one of {FAILURE_STRATEGIES}, got {strategy!r}")
    storage, trial_id = study._storage, trial._trial_id
    storage.set_trial_user_attr(trial_id, STATUS_ATTR, outcome.status)
    if outcome.error:
        storage.set_trial_user_attr(trial_id, "error", outcome.error[:500])
    if outcome.run_dir:
        storage.set_trial_user_attr(trial_id, "run_dir", outcome.run_dir)
    if outcome.status == "pruned":
        return study.tell(trial, state=TrialState.PRUNED)
    if outcome.status in ("diverged", "failed") or outcome.value is None or not math.isfinite(outcome.value):
        if strategy == "fail":
            storage.set_trial_system_attr(trial_id, COUNTED_FAILURE_ATTR, True)
            return study.tell(trial, state=TrialState.FAIL)
        return study.tell(trial, values=float(worst_value))
    return study.tell(trial, values=float(outcome.value))


# --------------------------------------------------------------------------------------------------
# The job side


@dataclass
class TrialPointer:
    study: str
    trial_id: int
    number: int
    storage: str


def current_trial() -> TrialPointer | None:
    """The Optuna trial this Hydra job runs, or None when it is not an Optuna trial."""
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:  # pragma: no cover
        return None
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    env_set = hydra_cfg.job.get("env_set") or {}
    if ENV_TRIAL_ID not in env_set:
        return None
    storage = os.environ.get(ENV_STORAGE)
    if not storage:
        candidate = hydra_cfg.get("sweeper", {}).get("storage")
        storage = candidate if candidate and MASK not in str(candidate) else None
    if not storage:
        log.warning("Optuna trial %s: %s is not set in this job's environment, so the trial cannot be "
                    "re-opened; pruning is off for this run", env_set.get(ENV_TRIAL_NUMBER), ENV_STORAGE)
        return None
    return TrialPointer(study=str(env_set[ENV_STUDY]), trial_id=int(env_set[ENV_TRIAL_ID]),
                        number=int(env_set.get(ENV_TRIAL_NUMBER, -1)), storage=storage)


def job_pruner_config():
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().get("sweeper", {}).get("pruner")


def build_pruner(pruner_cfg):
    import optuna
    from hydra.utils import instantiate

    if pruner_cfg is None:
        return optuna.pruners.NopPruner()
    return instantiate(pruner_cfg, _execution_whitelist_=("optuna.pruners.*",))


class OptunaTrialPruner:
    """The job's handle on its Optuna trial: reports each epoch's validation error, asks the pruner."""

    def __init__(self, trial, pointer: TrialPointer):
        self.trial, self.pointer = trial, pointer
        self._broken = False

    def should_stop(self, epoch: int, val_error: float) -> bool:
        if self._broken or val_error is None or not math.isfinite(val_error):
            return False
        try:
            self.trial.report(float(val_error), step=int(epoch))
            if self.trial.should_prune():
                self.trial.storage.set_trial_system_attr(self.trial._trial_id, PRUNED_ATTR, int(epoch))
                log.info("Optuna trial %d pruned after epoch %d (val error %.4f)",
                         self.pointer.number, epoch, val_error)
                return True
        except Exception as err:  # noqa: BLE001 - the storage hiccuping must not kill a training run
            self._broken = True
            log.warning("Optuna trial %d: reporting to the study failed, pruning is off for this run: %s",
                        self.pointer.number, mask_text(first_line(err), url_secrets(self.pointer.storage)))
        return False


def trial_pruner(cfg=None) -> OptunaTrialPruner | None:
    """For a job launched by the normbench Optuna sweeper: the handle on its trial; otherwise None."""
    pointer = current_trial()
    if pointer is None:
        return None
    import optuna

    try:
        storage = open_storage(pointer.storage, StorageSettings(heartbeat_interval=None))
        # RandomSampler: re-opening the trial must not run the study's sampler (a GridSampler would
        # pick a grid point); the pruner is the one the sweeper was configured with.
        study = optuna.load_study(study_name=pointer.study, storage=storage,
                                  sampler=optuna.samplers.RandomSampler(),
                                  pruner=build_pruner(job_pruner_config()))
        trial = optuna.trial.Trial(study, pointer.trial_id)
    except Exception as err:  # noqa: BLE001
        log.warning("Optuna trial %d: cannot re-open it (%s); pruning is off for this run",
                    pointer.number, mask_text(first_line(err), url_secrets(pointer.storage)))
        return None
    return OptunaTrialPruner(trial, pointer)
