"""hydra/launcher=submitit_local|slurm: the plugin's launchers, whose `launch` ends by collecting every job's
result, which raises for a job that ended without one (its process killed, the SLURM job cancelled) and so
ends the sweep. Here the sweep process records that job instead (normbench.dead_jobs)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from types import SimpleNamespace
from typing import Any

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher import submitit_launcher


class SettlingLauncher(submitit_launcher.BaseSubmititLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        make_executor = submitit.AutoExecutor

        def settling_executor(*args: Any, **kwargs: Any) -> Any:  # the only hook the plugin's launch leaves
            executor = make_executor(*args, **kwargs)
            map_array = executor.map_array
            executor.map_array = lambda fn, overrides, key, nums, *rest: [
                SimpleNamespace(results=partial(self._results, job, *job_args))
                for job, *job_args in zip(map_array(fn, overrides, key, nums, *rest), nums, overrides)]
            return executor

        submitit.AutoExecutor = settling_executor
        try:
            return super().launch(job_overrides, initial_job_idx)
        finally:
            submitit.AutoExecutor = make_executor

    def _results(self, job: Any, idx: int, overrides: Sequence[str]) -> list[JobReturn]:
        from submitit.core.utils import FailedJobError, UncompletedJobError

        try:
            return job.results()
        except UncompletedJobError as err:
            if isinstance(err, FailedJobError):  # the job's own exception, outside its run: as the plugin
                raise
            from normbench.dead_jobs import dead_job_return

            cause = f"submitit job {job.job_id} {job.state.lower()} without a result"
            return [dead_job_return(self.hydra_context, self.config, idx, overrides, cause)]


class LocalLauncher(SettlingLauncher, submitit_launcher.LocalLauncher):
    pass


class SlurmLauncher(SettlingLauncher, submitit_launcher.SlurmLauncher):
    pass
