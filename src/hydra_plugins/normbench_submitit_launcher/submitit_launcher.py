"""hydra/launcher=submitit_local|slurm: the submitit launcher plugin, whose `launch` ends by collecting
every job's result, which raises for a job that ended without one (its process killed, the SLURM job
cancelled or out of memory) and so ends the sweep. Here the sweep process finishes that job's record
instead (normbench.sweep.dead_jobs) and collects the other jobs' results."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher import submitit_launcher


class SettledJob:
    """A submitted job whose results() is its JobReturn, also when the job ended without a result."""

    def __init__(self, job: Any, launcher: submitit_launcher.BaseSubmititLauncher, overrides: Sequence[str],
                 idx: int) -> None:
        self.job, self.launcher, self.overrides, self.idx = job, launcher, overrides, idx

    def results(self) -> list[JobReturn]:
        from submitit.core.utils import FailedJobError, UncompletedJobError

        try:
            return self.job.results()
        except FailedJobError:  # the job's own exception, outside its run: as the plugin does
            raise
        except UncompletedJobError:
            from normbench.sweep.dead_jobs import dead_job_return

            cause = f"submitit job {self.job.job_id} {self.job.state.lower()} without a result"
            return [dead_job_return(self.launcher.hydra_context, self.launcher.config, self.idx,
                                    self.overrides, cause)]


class SettlingLauncher(submitit_launcher.BaseSubmititLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        # the plugin makes its executor and collects the results inside launch; its executor's jobs are
        # wrapped for the length of this call, the only hook it leaves
        import submitit

        make_executor = submitit.AutoExecutor

        def settling_executor(*args: Any, **kwargs: Any) -> Any:
            executor = make_executor(*args, **kwargs)
            map_array = executor.map_array

            def settling_map_array(fn: Any, overrides: list, *rest: list) -> list[SettledJob]:
                jobs = map_array(fn, overrides, *rest)  # rest: the job dir key, the job numbers, ...
                return [SettledJob(job, self, its_overrides, idx)
                        for job, its_overrides, idx in zip(jobs, overrides, rest[1])]

            executor.map_array = settling_map_array
            return executor

        submitit.AutoExecutor = settling_executor
        try:
            return super().launch(job_overrides, initial_job_idx)
        finally:
            submitit.AutoExecutor = make_executor


class LocalLauncher(SettlingLauncher, submitit_launcher.LocalLauncher):
    pass


class SlurmLauncher(SettlingLauncher, submitit_launcher.SlurmLauncher):
    pass
