"""hydra/launcher=joblib: the joblib launcher plugin's jobs in loky worker processes, each worker in a pool of
its own. loky kills a whole pool when one of its workers dies (the out-of-memory killer's SIGKILL, a
SIGTERM sent to it), and joblib then ends the sweep; one worker per pool confines a death to its job: the
sweep process records it (normbench.job.record_dead_worker), starts a fresh worker and goes on. Settings
the plugin's Parallel alone implements (backend=multiprocessing, a per-job timeout) run as the plugin runs
them."""

from __future__ import annotations

import re
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
from omegaconf import OmegaConf, open_dict, read_write


class JoblibLauncher(joblib_launcher.JoblibLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        settings = dict(self.joblib)
        if (settings.get("backend") or "loky") != "loky" or settings.get("timeout"):
            return super().launch(job_overrides, initial_job_idx)
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose,
                      execution_whitelist=self.hydra_context.execution_whitelist)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        n_workers = min(effective_n_jobs(settings.get("n_jobs")), len(job_overrides))
        backend = LokyBackend(inner_max_num_threads=settings.get("inner_max_num_threads"))
        env = backend._prepare_worker_env(n_workers)  # the threads per worker, as the plugin's Parallel
        queue = list(enumerate(job_overrides, start=initial_job_idx))
        running: dict = {}  # future -> (its pool, job number, overrides)
        idle: list[ProcessPoolExecutor] = []
        returns: dict[int, JobReturn] = {}
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
                        pool.shutdown(wait=False)
                        cause = re.search(r"SIG[A-Z]+|EXIT\(\d+\)", str(err))
                        returns[idx] = self._dead_worker(idx, overrides, cause[0] if cause else "unknown")
        finally:  # on the way out (an interrupt: the workers have recorded their runs): no worker stays
            for pool in [*idle, *(pool for pool, _, _ in running.values())]:
                pool.shutdown(wait=False, kill_workers=True)
        return [returns[idx] for idx in sorted(returns)]

    def _dead_worker(self, idx: int, overrides: Sequence[str], cause: str) -> JobReturn:
        """The job of a worker that died: its record finished here, its return as a failed job's."""
        from normbench.job import record_dead_worker

        config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        before = HydraConfig.instance().cfg
        try:
            with read_write(config.hydra), open_dict(config.hydra):  # as the job's run_job made it
                config.hydra.job.num = idx
                config.hydra.runtime.output_dir = str(Path(config.hydra.sweep.dir, config.hydra.sweep.subdir)
                                                      .absolute())
            HydraConfig.instance().set_config(config)
            task = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
            value, failed = record_dead_worker(task, cause)
        finally:
            HydraConfig.instance().cfg = before
        return JobReturn(overrides=list(overrides), cfg=task, hydra_cfg=config, working_dir=str(Path.cwd()),
                         task_name=config.hydra.job.name, _return_value=value,
                         status=JobStatus.FAILED if failed else JobStatus.COMPLETED)
