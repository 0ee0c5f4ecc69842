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
class NopPrunerConfig(PrunerConfig):  # the default: per-epoch errors are still reported
    _target_: str = "optuna.pruners.NopPruner"


@dataclass
class MedianPrunerConfig(PrunerConfig):
    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 5       # no pruning until this many trials have finished
    n_warmup_steps: int = 0         # no pruning before this epoch (epochs are the steps, from 1)
    interval_steps: int = 1
    n_min_trials: int = 1


@dataclass
class HyperbandPrunerConfig(PrunerConfig):  # over epochs
    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 1
    max_resource: Any = "${trainer.epochs}"
    reduction_factor: int = 3
    bootstrap_count: int = 0


@dataclass
class NormbenchOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "hydra_plugins.normbench_optuna_sweeper.normbench_optuna_sweeper.NormbenchOptunaSweeper"
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "none"}])
    # Every field is described in docs/optuna.md.
    pruner: PrunerConfig = MISSING
    storage: Any | None = None        # null: sqlite:///<hydra.sweep.dir>/optuna.db
    # over every sweeper process sharing the study (a re-run continues up to it); null: the whole grid
    n_trials: int | None = 20
    n_jobs: int = 1                   # trials asked for and launched at once by this process
    max_failure_rate: float = 1.0     # abort when more of this process's trials raised (1.0: never)
    objectives: list[str] | None = None  # names of the returned values (normbench.sweep.objectives)
    failure: str = "worst"            # a diverged or failed run: "worst" (COMPLETE(worst_value)) | "fail"
    worst_value: Any | None = None    # null: each objective's worst possible value (+-inf if unbounded)
    # a RUNNING trial with no heartbeat for grace_period (null: 2 x interval) is re-queued (max_retry)
    heartbeat_interval: int | None = 60
    grace_period: int | None = None
    max_retry: int | None = 3
    connect_timeout: int = 10         # seconds (PostgreSQL, MySQL)


cs = ConfigStore.instance()
cs.store(group="hydra/sweeper", name="normbench_optuna", node=NormbenchOptunaSweeperConf,
         provider="normbench")
cs.store(group="hydra/sweeper/pruner", name="none", node=NopPrunerConfig, provider="normbench")
cs.store(group="hydra/sweeper/pruner", name="median", node=MedianPrunerConfig, provider="normbench")
cs.store(group="hydra/sweeper/pruner", name="hyperband", node=HyperbandPrunerConfig, provider="normbench")
