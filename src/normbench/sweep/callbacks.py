"""Hydra callbacks (configured in conf/config.yaml under hydra.callbacks).

SweepSummary: at the start of a multirun it names the sweep invocation (environment variable
NORMBENCH_SWEEP_ID, inherited by launcher workers: joblib processes, submitit/SLURM tasks); every job
of it then writes its outcome to `<sweep dir>/.normbench/sweeps/<id>/`; at the end of the multirun one
line is printed:

    sweep multirun/vgg_losses: 8 completed / 1 diverged / 1 failed / 0 pruned / 0 skipped
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from normbench.sweep.index import SWEEP_ID_ENV, SweepState, count_outcomes, summary_line

log = logging.getLogger(__name__)

_ACTIVE: dict[str, Any] = {}  # the multirun in progress in this process (for the line on an interrupt)


def interrupted_summary_line(signame: str) -> str | None:
    """The closing line of the multirun this process was running when a signal interrupted it."""
    if not _ACTIVE:
        return None
    rows = SweepState(_ACTIVE["sweep_dir"]).read_journal(_ACTIVE["sweep_id"])
    line = summary_line(_ACTIVE["sweep_dir"], count_outcomes(rows))
    return f"{line} (interrupted by {signame}; run the same command to continue)"


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


class SweepSummary(Callback):
    def __init__(self) -> None:
        self.sweep_id: str | None = None
        self.previous: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.previous = os.environ.get(SWEEP_ID_ENV)
        self.sweep_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        os.environ[SWEEP_ID_ENV] = self.sweep_id
        _ACTIVE.update(sweep_dir=str(config.hydra.sweep.dir), sweep_id=self.sweep_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.sweep_id is None:
            return
        sweep_dir = str(config.hydra.sweep.dir)
        rows = SweepState(sweep_dir).read_journal(self.sweep_id)
        line = summary_line(sweep_dir, count_outcomes(rows), expected_jobs(config))
        print(line, flush=True)
        log.debug(line)
        _ACTIVE.clear()
        if self.previous is None:
            os.environ.pop(SWEEP_ID_ENV, None)
        else:
            os.environ[SWEEP_ID_ENV] = self.previous
