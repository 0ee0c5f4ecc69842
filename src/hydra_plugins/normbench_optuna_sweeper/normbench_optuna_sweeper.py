"""hydra/sweeper=normbench_optuna: the Hydra plugin class (light; the work is in _impl.py)."""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig

from . import config as _config  # noqa: F401 - registers the configs


class NormbenchOptunaSweeper(Sweeper):
    """hydra-optuna-sweeper 1.4.0rc3 with pruning, failure handling and a study-wide trial budget."""

    def __init__(self, sampler: Any, direction: Any, storage: Any | None, study_name: str | None,
                 n_trials: int | None, n_jobs: int, max_failure_rate: float, custom_search_space: str | None,
                 params: DictConfig | None, pruner: Any = None, failure: str = "worst",
                 worst_value: Any = None, objectives: Any = None, heartbeat_interval: int | None = 60,
                 grace_period: int | None = None, max_retry: int | None = 3,
                 connect_timeout: int = 10) -> None:
        from ._impl import NormbenchOptunaSweeperImpl

        sampler = instantiate(sampler, _execution_whitelist_=("hydra_plugins.hydra_optuna_sweeper.*",
                                                              "optuna.samplers.*"))
        self.sweeper = NormbenchOptunaSweeperImpl(
            sampler, direction, storage, study_name, n_trials, n_jobs, max_failure_rate, custom_search_space,
            params, pruner=pruner, failure=failure, worst_value=worst_value, objectives=objectives,
            heartbeat_interval=heartbeat_interval, grace_period=grace_period, max_retry=max_retry,
            connect_timeout=connect_timeout)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        return self.sweeper.sweep(arguments)
