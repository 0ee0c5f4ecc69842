"""hydra/sweeper=normbench_optuna: the Hydra plugin class (light; the work is in _impl.py)."""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

from . import config as _config  # noqa: F401 - registers the configs


class NormbenchOptunaSweeper(OptunaSweeper):
    """hydra-optuna-sweeper 1.4.0rc3 with pruning, failure handling and a study-wide trial budget."""

    def __init__(self, sampler: Any, **settings: Any) -> None:  # settings: the keys of config.py
        from ._impl import NormbenchOptunaSweeperImpl

        sampler = instantiate(sampler, _execution_whitelist_=("hydra_plugins.hydra_optuna_sweeper.*",
                                                              "optuna.samplers.*"))
        self.sweeper = NormbenchOptunaSweeperImpl(sampler, **settings)
