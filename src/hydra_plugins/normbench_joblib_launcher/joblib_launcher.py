"""hydra/launcher=joblib: the joblib launcher plugin's jobs in loky workers, each worker in a pool of its own.
loky kills a whole pool when one of its workers dies (the out-of-memory killer's SIGKILL, a SIGTERM sent to
it) and joblib then ends the sweep; alone in its pool, a dead worker costs only its job: the sweep process
finishes that job's record and goes on with a fresh worker. backend=multiprocessing and a per-job timeout,
which only the plugin's joblib.Parallel implements, run as the plugin runs them."""

from __future__ import annotations

import re
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, wait

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, setup_globals
from hydra_plugins.hydra_joblib_launcher import joblib_launcher
from hydra_plugins.hydra_joblib_launcher._core import execute_job
from joblib import effective_n_jobs
from joblib._parallel_backends import LokyBackend
from joblib.externals.loky import ProcessPoolExecutor
from joblib.externals.loky.process_executor import TerminatedWorkerError


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
                        from normbench.dead_jobs import dead_job_return  # not at plugin discovery

                        cause = re.search(r"SIG[A-Z]+|EXIT\(\d+\)", str(err))
                        returns[idx] = dead_job_return(self.hydra_context, self.config, idx, overrides,
                                                       cause[0] if cause else "unknown")
        finally:  # an interrupt: the workers have recorded their runs (normbench.interrupts); none stays
            for pool in [*idle, *(pool for pool, _, _ in running.values())]:
                pool.shutdown(wait=False, kill_workers=True)
        return [returns[idx] for idx in sorted(returns)]
