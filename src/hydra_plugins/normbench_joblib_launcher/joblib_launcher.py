"""hydra/launcher=joblib: the joblib launcher plugin's jobs in loky workers, each worker in a pool of its own.
loky kills a whole pool when one of its workers dies (the out-of-memory killer's SIGKILL, a SIGTERM sent to
it) and joblib then ends the sweep; alone in its pool, a dead worker costs only its job: the sweep process
finishes that job's record and goes on with a fresh worker. backend=multiprocessing and a per-job timeout,
which only the plugin's joblib.Parallel implements, run as the plugin runs them."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, wait
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, setup_globals
from hydra_plugins.hydra_joblib_launcher import joblib_launcher
from hydra_plugins.hydra_joblib_launcher._core import execute_job
from joblib import effective_n_jobs
from joblib._parallel_backends import LokyBackend
from joblib.externals.loky import ProcessPoolExecutor
from joblib.externals.loky.process_executor import TerminatedWorkerError
from omegaconf import DictConfig, OmegaConf, open_dict, read_write


class JoblibLauncher(joblib_launcher.JoblibLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        settings = dict(self.joblib)
        if (settings.get("backend") or "loky") != "loky" or settings.get("timeout"):
            return super().launch(job_overrides, initial_job_idx)
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose,
                      execution_whitelist=self.hydra_context.execution_whitelist)
        n_workers = min(effective_n_jobs(settings.get("n_jobs")), len(job_overrides))
        backend = LokyBackend(inner_max_num_threads=settings.get("inner_max_num_threads"))
        env = backend._prepare_worker_env(n_workers)  # the threads per worker, as the plugin's Parallel
        queue, running, idle, returns = list(enumerate(job_overrides, initial_job_idx)), {}, [], {}
        try:
            while queue or running:
                while queue and len(running) < n_workers:
                    pool = idle.pop() if idle else ProcessPoolExecutor(max_workers=1, env=env)
                    idx, overrides = queue.pop(0)
                    future = pool.submit(execute_job, idx, overrides, self.hydra_context, self.config,
                                         self.task_function, 0, Singleton.get_state(), False)
                    running[future] = (pool, idx, overrides)
                for future in wait(running, return_when=FIRST_COMPLETED)[0]:
                    pool, idx, overrides = running.pop(future)
                    try:
                        returns[idx] = future.result()
                        idle.append(pool)
                    except TerminatedWorkerError as err:
                        cause = re.search(r"SIG[A-Z]+|EXIT\(\d+\)", str(err))
                        returns[idx] = self._dead_worker(idx, overrides, cause[0] if cause else "unknown")
        finally:  # an interrupt: the workers have recorded their runs (normbench.interrupts); none stays
            for pool in [*idle, *(pool for pool, _, _ in running.values())]:
                pool.shutdown(wait=False, kill_workers=True)
        return [returns[idx] for idx in sorted(returns)]

    def _dead_worker(self, idx: int, overrides: Sequence[str], cause: str) -> JobReturn:
        config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
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
    from normbench.errors import NormbenchError
    from normbench.identity import run_identity
    from normbench.job import job_info, journal, journal_unreported
    from normbench.record import SUMMARY, Status, atomic_write_json, now_iso, read_summary
    from normbench.run import WORST_OBJECTIVE
    from normbench.sweep.index import SWEEP_ID_ENV, SweepState

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
