"""A job whose worker process died, finished by the sweep process (the joblib and submitit launchers)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from normbench.errors import NormbenchError
from normbench.identity import run_identity
from normbench.job import job_info, journal, journal_unreported
from normbench.record import SUMMARY, Status, atomic_write_json, now_iso, read_summary
from normbench.run import WORST_OBJECTIVE
from normbench.sweep.index import SWEEP_ID_ENV, SweepState


def dead_job_return(hydra_context: HydraContext, config: DictConfig, idx: int, overrides: Sequence[str],
                    cause: str) -> JobReturn:
    """Job `idx` of the sweep `config`, whose worker died of `cause` (SIGKILL, ...): a record left `running`
    is finished `failed` with one line; the basic sweeper gets the worst objective (the sweep goes on),
    another the error (an Optuna trial fails)."""
    config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with read_write(config.hydra), open_dict(config.hydra):  # as the job's run_job made it
        config.hydra.job.num = idx
        config.hydra.runtime.output_dir = os.path.abspath(Path(config.hydra.sweep.dir,
                                                               config.hydra.sweep.subdir))
    task = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
    before = HydraConfig.instance().cfg
    try:
        HydraConfig.instance().set_config(config)
        info, error = job_info(task), f"its worker process died ({cause})"
        identity, state = run_identity(task), SweepState(info.sweep_dir)
        entry = state.get(identity) or {}
        run_dir = state.run_dir(entry) if entry.get("dir") else info.output_dir
        summary = read_summary(run_dir) or {}
        if (state.journal_dir / str(os.environ.get(SWEEP_ID_ENV)) / f"{info.job_num:06d}.json").exists():
            error = f"interrupted by {cause}"  # it recorded itself
        elif summary.get("identity") == identity and summary.get("status") == Status.RUNNING:
            summary.update(status=Status.FAILED, error=error, error_type=cause, finished_at=now_iso())
            atomic_write_json(run_dir / SUMMARY, summary)
            state.put(identity, status=Status.FAILED)
            journal(info, identity, Status.FAILED, WORST_OBJECTIVE, run_dir, error)
            print(f"normbench: job {idx} failed: {error} -- recorded in {run_dir}, the sweep goes on",
                  file=sys.stderr, flush=True)
        else:  # it died before its run started
            journal_unreported(info, NormbenchError(error))
    finally:
        HydraConfig.instance().cfg = before
    value, status = ((WORST_OBJECTIVE, JobStatus.COMPLETED) if info.isolate
                     else (NormbenchError(error), JobStatus.FAILED))
    return JobReturn(overrides=list(overrides), cfg=task, hydra_cfg=config, working_dir=os.getcwd(),
                     task_name=config.hydra.job.name, _return_value=value, status=status)
