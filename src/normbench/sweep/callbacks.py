"""Hydra callbacks (configured in conf/config.yaml under hydra.callbacks).

SweepSummary: at the start of a multirun it names the sweep invocation (environment variable
NORMBENCH_SWEEP_ID, inherited by launcher workers: joblib processes, submitit/SLURM tasks); every job
of it then writes its outcome to `<sweep dir>/.normbench/sweeps/<id>/`; at the end of the multirun one
line is printed. It also names the keys the multirun sweeps (NORMBENCH_SWEPT_KEYS), which the jobs'
dir and W&B run names put first. At the end one line is printed:

    sweep multirun/vgg_losses: 8 completed / 1 diverged / 1 failed / 0 pruned / 0 skipped

Preflight: before the run dir (single run) or the sweep dir exists, checks experiment_name and the
launcher's parallelism (normbench.preflight); a bad value ends in one line, exit status 2.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from normbench.errors import ConfigError, fail
from normbench.identity import SWEPT_KEYS_ENV, swept_keys
from normbench.preflight import check_experiment_name, check_launch
from normbench.sweep.index import SWEEP_ID_ENV, SweepState, count_outcomes, summary_line

log = logging.getLogger(__name__)


def expected_jobs(config: DictConfig) -> int | None:
    """How many jobs the basic sweeper makes of this multirun config (None for other sweepers)."""
    target = OmegaConf.select(config, "hydra.sweeper._target_", default="") or ""
    if not target.endswith("BasicSweeper"):
        return None
    try:
        from normbench.sweep.plan import expand_grid, sweep_arguments

        return len(expand_grid(*sweep_arguments(config)))
    except Exception:  # noqa: BLE001 - the count only refines the summary line
        return None


class Preflight(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_experiment_name(config.get("experiment_name"))
        except ConfigError as err:
            fail(err)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_experiment_name(config.get("experiment_name"))
            check_launch(config)
        except ConfigError as err:
            fail(err)


class SweepSummary(Callback):
    def __init__(self) -> None:
        self.sweep_id: str | None = None
        self.previous: str | None = None
        self.previous_swept: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.previous = os.environ.get(SWEEP_ID_ENV)
        self.sweep_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        os.environ[SWEEP_ID_ENV] = self.sweep_id
        # which keys the jobs' dir and W&B run names put first (a job sees only its own overrides)
        self.previous_swept = os.environ.get(SWEPT_KEYS_ENV)
        params = OmegaConf.select(config, "hydra.sweeper.params", default=None)
        params = OmegaConf.to_container(params, resolve=False) if params is not None else {}
        task = list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
        os.environ[SWEPT_KEYS_ENV] = ",".join(swept_keys(params, task))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.sweep_id is None:
            return
        sweep_dir = str(config.hydra.sweep.dir)
        rows = SweepState(sweep_dir).read_journal(self.sweep_id)
        line = summary_line(sweep_dir, count_outcomes(rows), expected_jobs(config))
        print(line, flush=True)
        log.debug(line)
        for name, previous in ((SWEEP_ID_ENV, self.previous), (SWEPT_KEYS_ENV, self.previous_swept)):
            if previous is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = previous
