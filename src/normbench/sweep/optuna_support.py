"""Optuna plumbing the jobs need (the sweeper extension, hydra_plugins.normbench_optuna_sweeper, uses it too).

The sweeper asks Optuna for trials and launches one Hydra job per trial. Each job learns which trial it
is through three entries of `hydra.job.env_set` (set by the sweeper as per-job Hydra overrides, so they
never touch the job's own config, its identity or its output dir name):

    NORMBENCH_OPTUNA_STUDY      study name
    NORMBENCH_OPTUNA_TRIAL_ID   Optuna's storage-wide trial id (what the job re-opens)
    NORMBENCH_OPTUNA_TRIAL      the trial's number in the study (for people)

The storage URL reaches the job through the environment variable NORMBENCH_OPTUNA_STORAGE, which the
sweeper sets in its own process (jobs inherit it: in-process, joblib, submitit, sbatch's default
--export=ALL). It is never written into a config, so a password in it stays out of the run records.

`trial_pruner()` re-opens the trial from the storage and returns an object whose
`should_stop(epoch, val_error)` reports the epoch's validation error to Optuna and asks its pruner.
`optuna_trial_info()` is the job's study name and trial number (for its W&B config), storage-free.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import re
import threading
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, quote_plus

from hydra.core.hydra_config import HydraConfig

from normbench.errors import MASK, PASSWORD_KEYS, StorageError, mask_passwords, one_line

log = logging.getLogger(__name__)

ENV_STORAGE = "NORMBENCH_OPTUNA_STORAGE"   # set by the sweeper for its jobs (may hold a password)
ENV_STUDY = "NORMBENCH_OPTUNA_STUDY"
ENV_TRIAL_ID = "NORMBENCH_OPTUNA_TRIAL_ID"
ENV_TRIAL_NUMBER = "NORMBENCH_OPTUNA_TRIAL"

PRUNED_ATTR = "normbench:pruned_epoch"      # trial system attr the job sets when its pruner stops it
BACKENDS = ("sqlite", "postgresql", "mysql", "oracle", "mssql")


# --------------------------------------------------------------------------------------------------
# Credentials


def _parse(url: str | None):
    """SQLAlchemy's URL of `url`; None when it is none. (SQLAlchemy is imported here, not with this
    module: every job imports it, and only Optuna sweeps need it.)"""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url) if url else None
    except ArgumentError:  # not an SQLAlchemy URL: nothing in it is recognisably a password
        return None


def _query_passwords(parsed) -> list[str]:
    return [value for key, values in parsed.query.items() if key.lower() in PASSWORD_KEYS
            for value in ([values] if isinstance(values, str) else values)]


def _spelled_in(text: str, secret: str) -> set[str]:
    """The spellings of `secret` in `text` with any of its characters percent-encoded (any hex case)."""
    def char(c: str) -> str:
        encoded = "".join(f"%[{b >> 4:X}{b >> 4:x}][{b & 15:X}{b & 15:x}]" for b in c.encode())
        return f"(?:{re.escape(c)}|{encoded}{'|[+]' if c == ' ' else ''})"

    return set(re.findall("".join(char(c) for c in secret), text))


def url_secrets(url: str | None) -> list[str]:
    """The passwords of a storage URL (userinfo and ?password=) in every spelling they may take in
    text: decoded, as written in the URL, percent-encoded; longest first."""
    parsed = _parse(url)
    if parsed is None:
        return []
    found: set[str] = set()
    for secret in ([parsed.password] if parsed.password else []) + _query_passwords(parsed):
        found |= {secret, quote(secret, safe=""), quote(secret, safe=" +"), quote_plus(secret)}
        found |= _spelled_in(url, secret)
    return sorted((s for s in found if s and s != MASK), key=len, reverse=True)


def _reason(err: BaseException, url: str) -> str:
    """An error's first line with the passwords of `url` masked (a driver's error may quote them)."""
    return mask_passwords(one_line(err, typed=False), url_secrets(url))


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


def backend(url: str) -> str:
    """The database kind of a storage URL (`postgres` spelled `postgresql`); "" when it is no URL."""
    parsed = _parse(url)
    kind = parsed.get_backend_name() if parsed is not None else ""
    return "postgresql" if kind == "postgres" else kind


def driver_url(url: str) -> str:
    """The URL SQLAlchemy is given. `postgresql://` (or `postgres://`) without a driver means psycopg
    (v3) to SQLAlchemy 2.1; when only psycopg2 is installed (our dependency), use it instead."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme.lower() in ("postgresql", "postgres"):
        has_psycopg3 = importlib.util.find_spec("psycopg") is not None
        return f"postgresql{'' if has_psycopg3 else '+psycopg2'}://{rest}"
    return url


def engine_kwargs(url: str, connect_timeout: int) -> dict:
    kind = backend(url)
    if kind in ("postgresql", "mysql"):
        # pre-ping: a worker's pooled connection may sit idle for a whole training run.
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": int(connect_timeout)}}
    if kind == "sqlite":
        return {"connect_args": {"timeout": 60}}
    return {}


@dataclass
class StorageSettings:
    heartbeat_interval: int | None = 60
    grace_period: int | None = None
    max_retry: int | None = 3
    connect_timeout: int = 10


_STORAGES: dict[str, Any] = {}
_STORAGES_LOCK = threading.Lock()


def _heartbeat_kwargs(settings: StorageSettings) -> dict:
    import optuna

    if not settings.heartbeat_interval:
        return {}
    with quiet_optuna():
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=settings.max_retry)
    return {"heartbeat_interval": int(settings.heartbeat_interval),
            "grace_period": int(settings.grace_period) if settings.grace_period else None,
            "heartbeat_stale_trial_callback": retry}


def open_storage(url: str, settings: StorageSettings | None = None,
                 schema_lock: AbstractContextManager | None = None):
    """An Optuna RDBStorage for `url` (one per URL and process; jobs in the sweeper's process share it).
    `schema_lock` is held while the storage (its schema, on first use) is created.

    Fails with a one-line StorageError naming the URL with its password masked."""
    import optuna

    settings = settings or StorageSettings()
    with _STORAGES_LOCK:
        if url in _STORAGES:
            return _STORAGES[url]
        if backend(url) not in BACKENDS:
            raise StorageError(f"bad value hydra.sweeper.storage={mask_passwords(url)!r}: use an SQLAlchemy "
                               "URL (sqlite:///path/optuna.db, postgresql://user:password@host/db, ...)")
        try:
            with quiet_optuna(), schema_lock or contextlib.nullcontext():
                storage = optuna.storages.RDBStorage(
                    driver_url(url), engine_kwargs=engine_kwargs(url, settings.connect_timeout),
                    **_heartbeat_kwargs(settings))
        except Exception as err:  # noqa: BLE001 - any driver error becomes one clear line
            raise StorageError(f"cannot open the Optuna storage {mask_passwords(url)}: "
                               f"{_reason(err, url)}") from None
        _STORAGES[url] = storage
        return storage


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


def optuna_trial_info() -> dict | None:
    """{"study": name, "trial": number} of the Optuna trial this Hydra job runs (for its W&B config and
    name), or None when it is not one. Needs no storage: it reads the job's hydra.job.env_set."""
    if not HydraConfig.initialized():
        return None
    env_set = HydraConfig.get().job.get("env_set") or {}
    if ENV_TRIAL_NUMBER not in env_set:
        return None
    return {"study": str(env_set.get(ENV_STUDY)), "trial": int(env_set[ENV_TRIAL_NUMBER])}


def job_pruner_config():
    return HydraConfig.get().get("sweeper", {}).get("pruner")


def optuna_pruner(pruner_cfg):
    """The Optuna pruner a `hydra.sweeper.pruner` node configures (NopPruner for none)."""
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
                        self.pointer.number, _reason(err, self.pointer.storage))
        return False


def trial_pruner() -> OptunaTrialPruner | None:
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
                                  pruner=optuna_pruner(job_pruner_config()))
        if len(study.directions) > 1:  # Optuna prunes single-objective trials only
            log.info("Optuna trial %d: multi-objective study, no pruning", pointer.number)
            return None
        trial = optuna.trial.Trial(study, pointer.trial_id)
    except Exception as err:  # noqa: BLE001
        log.warning("Optuna trial %d: cannot re-open it (%s); pruning is off for this run",
                    pointer.number, _reason(err, pointer.storage))
        return None
    return OptunaTrialPruner(trial, pointer)
