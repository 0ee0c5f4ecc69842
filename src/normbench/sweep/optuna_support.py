"""Optuna plumbing the jobs need (the sweeper extension, hydra_plugins.normbench_optuna_sweeper, uses it too).

Each job learns its trial from three entries of `hydra.job.env_set` (ENV_STUDY, ENV_TRIAL_ID,
ENV_TRIAL_NUMBER: per-job Hydra overrides, so the job's own config, identity and dir name are
untouched) and the storage URL from the environment variable ENV_STORAGE, never from a config, so
that a password in it stays out of the run records (docs/optuna.md, "Pruning").
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


def _parse(url: str | None):
    """SQLAlchemy's URL of `url`, or None (imported here: every job imports this module)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url) if url else None
    except ArgumentError:  # not an SQLAlchemy URL: nothing in it is recognisably a password
        return None


def _spelled_in(text: str, secret: str) -> set[str]:
    """The spellings of `secret` in `text` with any of its characters percent-encoded (any hex case)."""

    def char(c: str) -> str:
        encoded = "".join(f"%[{b >> 4:X}{b >> 4:x}][{b & 15:X}{b & 15:x}]" for b in c.encode())
        return f"(?:{re.escape(c)}|{encoded}{'|[+]' if c == ' ' else ''})"

    return set(re.findall("".join(char(c) for c in secret), text))


def url_secrets(url: str | None) -> list[str]:
    """A storage URL's passwords in every spelling they may take in text, longest first."""
    parsed = _parse(url)
    if parsed is None:
        return []
    found: set[str] = set()
    in_query = [value for key, values in parsed.query.items() if key.lower() in PASSWORD_KEYS
                for value in ([values] if isinstance(values, str) else values)]
    for secret in ([parsed.password] if parsed.password else []) + in_query:
        found |= {secret, quote(secret, safe=""), quote(secret, safe=" +"), quote_plus(secret)}
        found |= _spelled_in(url, secret)
    return sorted((s for s in found if s and s != MASK), key=len, reverse=True)


def _reason(err: BaseException, url: str) -> str:  # a driver's error may quote the password
    return mask_passwords(one_line(err, typed=False), url_secrets(url))


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Silence Optuna's notes that the heartbeat API is "experimental" and "supposed to be used with
    Study.optimize" (we record them ourselves)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        yield


def backend(url: str) -> str:
    """The database kind of a storage URL (`postgres` spelled `postgresql`), or ""."""
    parsed = _parse(url)
    kind = parsed.get_backend_name() if parsed is not None else ""
    return "postgresql" if kind == "postgres" else kind


def driver_url(url: str) -> str:
    """`postgresql://` without a driver means psycopg (v3) to SQLAlchemy 2.1: with only psycopg2 installed
    (our dependency), name it."""
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


def open_storage(url: str, settings: StorageSettings | None = None,
                 schema_lock: contextlib.AbstractContextManager | None = None):
    """One RDBStorage per URL and process; else a one-line StorageError, its password masked."""
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
                retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=settings.max_retry)
                heartbeat = {"heartbeat_interval": int(settings.heartbeat_interval),
                             "grace_period": int(settings.grace_period) if settings.grace_period else None,
                             "heartbeat_stale_trial_callback": retry} if settings.heartbeat_interval else {}
                storage = optuna.storages.RDBStorage(
                    driver_url(url), engine_kwargs=engine_kwargs(url, settings.connect_timeout), **heartbeat)
        except Exception as err:  # noqa: BLE001 - any driver error becomes one clear line
            raise StorageError(f"cannot open the Optuna storage {mask_passwords(url)}: "
                               f"{_reason(err, url)}") from None
        _STORAGES[url] = storage
        return storage


def optuna_pruner(pruner_cfg):
    import optuna
    from hydra.utils import instantiate

    if pruner_cfg is None:
        return optuna.pruners.NopPruner()
    return instantiate(pruner_cfg, _execution_whitelist_=("optuna.pruners.*",))


class OptunaTrialPruner:
    """Reports each epoch's validation error to the job's trial and asks its pruner."""

    def __init__(self, trial, storage_url: str):
        self.trial, self.storage_url = trial, storage_url
        self._broken = False

    def should_stop(self, epoch: int, val_error: float) -> bool:
        if self._broken or val_error is None or not math.isfinite(val_error):
            return False
        try:
            self.trial.report(float(val_error), step=int(epoch))
            if self.trial.should_prune():
                self.trial.storage.set_trial_system_attr(self.trial._trial_id, PRUNED_ATTR, int(epoch))
                log.info("Optuna trial %d pruned after epoch %d (val error %.4f)",
                         self.trial.number, epoch, val_error)
                return True
        except Exception as err:  # noqa: BLE001 - the storage hiccuping must not kill a training run
            self._broken = True
            log.warning("Optuna trial %d: reporting to the study failed, pruning is off for this run: %s",
                        self.trial.number, _reason(err, self.storage_url))
        return False


def trial_pruner() -> OptunaTrialPruner | None:
    """For a job launched by the normbench Optuna sweeper: the handle on its trial; otherwise None."""
    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    env_set = (hydra_cfg.job.get("env_set") or {}) if hydra_cfg is not None else {}
    if ENV_TRIAL_ID not in env_set:
        return None
    number, sweeper = env_set.get(ENV_TRIAL_NUMBER), hydra_cfg.get("sweeper", {})
    candidate = str(sweeper.get("storage") or "")  # a masked one cannot be opened
    url = os.environ.get(ENV_STORAGE) or (candidate if MASK not in candidate else "")
    if not url:
        log.warning("Optuna trial %s: %s is not set in this job's environment, so the trial cannot be "
                    "re-opened; pruning is off for this run", number, ENV_STORAGE)
        return None
    import optuna

    try:
        storage = open_storage(url, StorageSettings(heartbeat_interval=None))
        # RandomSampler: re-opening the trial must not run the study's sampler (a GridSampler would
        # pick a grid point); the pruner is the one the sweeper was configured with.
        study = optuna.load_study(study_name=str(env_set[ENV_STUDY]), storage=storage,
                                  sampler=optuna.samplers.RandomSampler(),
                                  pruner=optuna_pruner(sweeper.get("pruner")))
        if len(study.directions) > 1:  # Optuna prunes single-objective trials only
            log.info("Optuna trial %s: multi-objective study, no pruning", number)
            return None
        trial = optuna.trial.Trial(study, int(env_set[ENV_TRIAL_ID]))
    except Exception as err:  # noqa: BLE001
        log.warning("Optuna trial %s: cannot re-open it (%s); pruning is off for this run",
                    number, _reason(err, url))
        return None
    return OptunaTrialPruner(trial, url)
