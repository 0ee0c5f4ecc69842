"""A job whose worker process died (the out-of-memory killer's SIGKILL, a cancelled SLURM job): the sweep
process finishes its record and hands its sweeper a JobReturn, so that it costs only that job. Shared by
the joblib and submitit launchers (hydra_plugins.normbench_*_launcher)."""

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
    """Job `idx` of the launcher's sweep `config`, whose worker died of `cause`, recorded as its run_job
    would have configured it."""
    config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with read_write(config.hydra), open_dict(config.hydra):  # as the job's run_job made it
        config.hydra.job.num = idx
        config.hydra.runtime.output_dir = os.path.abspath(Path(config.hydra.sweep.dir,
                                                               config.hydra.sweep.subdir))
    task = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
    before = HydraConfig.instance().cfg
    try:
        HydraConfig.instance().set_config(config)
        value, failed = record_dead_worker(task, cause)
    finally:
        HydraConfig.instance().cfg = before
    return JobReturn(overrides=list(overrides), cfg=task, hydra_cfg=config, working_dir=os.getcwd(),
                     task_name=config.hydra.job.name, _return_value=value,
                     status=JobStatus.FAILED if failed else JobStatus.COMPLETED)


def record_dead_worker(cfg: DictConfig, cause: str) -> tuple[object, bool]:
    """The job whose worker died (`cause`: SIGKILL, ...). A worker stopped by SIGTERM recorded its run
    `interrupted` itself; a record left `running` is finished `failed`, naming the cause, with one line.
    Returns the job's return value and whether it failed: the worst objective for the basic sweeper (the
    sweep goes on, as after any failed job), else the error (an Optuna trial fails)."""
    info, error = job_info(cfg), f"its worker process died ({cause})"
    identity, state = run_identity(cfg), SweepState(info.sweep_dir)
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
        print(f"normbench: job {info.job_num} failed: {error} -- recorded in {run_dir}, the sweep goes on",
              file=sys.stderr, flush=True)
    else:  # it died before its run started
        journal_unreported(info, NormbenchError(error))
    return (WORST_OBJECTIVE, False) if info.isolate else (NormbenchError(error), True)
