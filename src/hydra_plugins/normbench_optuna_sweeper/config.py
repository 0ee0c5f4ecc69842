"""Config schema of the normbench Optuna sweeper: hydra-optuna-sweeper's schema plus pruning, failure
handling, a study-wide n_trials and heartbeats. Registered as hydra/sweeper=normbench_optuna, with the
pruners as the group hydra/sweeper/pruner (none, median, hyperband)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from omegaconf import MISSING


@dataclass
class PrunerConfig:
    _target_: str = MISSING


@dataclass
class NopPrunerConfig(PrunerConfig):
    """No pruning (the default): every trial trains to the end; its per-epoch errors are still reported."""

    _target_: str = "optuna.pruners.NopPruner"


@dataclass
class MedianPrunerConfig(PrunerConfig):
    """Stop a trial whose validation error after an epoch is worse than the finished trials' median."""

    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 5       # no pruning until this many trials have finished
    n_warmup_steps: int = 0         # no pruning before this epoch (epochs are the steps, from 1)
    interval_steps: int = 1
    n_min_trials: int = 1


@dataclass
class HyperbandPrunerConfig(PrunerConfig):
    """Hyperband over epochs: successive halving in several brackets."""

    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 1
    max_resource: Any = "${trainer.epochs}"
    reduction_factor: int = 3
    bootstrap_count: int = 0


@dataclass
class NormbenchOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "hydra_plugins.normbench_optuna_sweeper.normbench_optuna_sweeper.NormbenchOptunaSweeper"
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "none"}])

    # Optuna pruner for the jobs (hydra/sweeper/pruner=none|median|hyperband).
    pruner: PrunerConfig = MISSING

    # Storage URL; null = sqlite:///<hydra.sweep.dir>/optuna.db.
    storage: Any | None = None

    # Total number of trials in the study, over every sweeper process sharing it (not per process).
    # Re-running a sweep continues the study up to this total; null = the whole grid (grid sampler).
    n_trials: int | None = 20

    # Trials asked for and launched at once by this process (match the launcher's parallelism).
    n_jobs: int = 1

    # Abort the sweep when more than this fraction of this process's trials raised (1.0: never).
    max_failure_rate: float = 1.0

    # Names of the values the task returns, one per direction (normbench.sweep.objectives), also the
    # study's metric names; null: unnamed ("Objective 0"), and normbench's job returns val/error.
    objectives: list[str] | None = None

    # A diverged or failed run: "worst" tells Optuna worst_value as a COMPLETE trial (the sampler
    # learns to avoid those parameters); "fail" tells it FAIL (the samplers ignore it).
    failure: str = "worst"
    # null: per objective, the worst possible value of a known normbench objective (val/error: 1.0,
    # val/best_acc: 0.0), else +inf when minimizing and -inf when maximizing. A number (or one per
    # objective) is told as it is.
    worst_value: Any | None = None

    # Liveness of running trials: the sweeper records a heartbeat for each of its running trials every
    # heartbeat_interval seconds; a RUNNING trial whose heartbeat is older than grace_period (null:
    # 2 x interval) belongs to a dead sweeper: it is failed and re-queued (at most max_retry times).
    heartbeat_interval: int | None = 60
    grace_period: int | None = None
    max_retry: int | None = 3

    # Seconds to wait for a database server before giving up (PostgreSQL, MySQL).
    connect_timeout: int = 10


cs = ConfigStore.instance()
cs.store(group="hydra/sweeper", name="normbench_optuna", node=NormbenchOptunaSweeperConf,
         provider="normbench")
cs.store(group="hydra/sweeper/pruner", name="none", node=NopPrunerConfig, provider="normbench")
cs.store(group="hydra/sweeper/pruner", name="median", node=MedianPrunerConfig, provider="normbench")
cs.store(group="hydra/sweeper/pruner", name="hyperband", node=HyperbandPrunerConfig, provider="normbench")
