"""The sweep loop of hydra/sweeper=normbench_optuna: hydra-optuna-sweeper's OptunaSweeperImpl with the
differences docs/optuna.md lists. Imported lazily: Hydra's plugin scan skips `_` modules."""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import ConfigCompositionException, OverrideParseException
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from optuna.trial import TrialState

from normbench.errors import PREFIX, ConfigError, StorageError, fail, mask_passwords, one_line
from normbench.interrupts import EXIT_CODES, raise_on_sigterm, signal_name
from normbench.record import Status, read_summary, record_dir
from normbench.sweep.objectives import OBJECTIVES
from normbench.sweep.optuna_support import (
    ENV_STORAGE,
    ENV_STUDY,
    ENV_TRIAL_ID,
    ENV_TRIAL_NUMBER,
    PRUNED_ATTR,
    StorageSettings,
    open_storage,
    optuna_pruner,
    quiet_optuna,
    url_secrets,
)

from ._links import study_attributes, trial_links
from ._study import (
    FAILURE_STRATEGIES,
    SCHEMA_LOCK,
    Heartbeat,
    JobExited,
    Outcome,
    TrialTask,
    best_results,
    failure_values,
    is_failure,
    mark_owner,
    quote_override,
    requeue,
    requeue_dead_local_trials,
    returned_values,
    storage_lock,
    study_lock_name,
    tell_outcome,
    trials_to_ask,
    trials_used,
)

log = logging.getLogger(__name__)


class NormbenchOptunaSweeperImpl(OptunaSweeperImpl):
    def __init__(self, sampler: Any, *, pruner: Any, failure: str, worst_value: Any, objectives: Any,
                 heartbeat_interval: int | None, grace_period: int | None, max_retry: int | None,
                 connect_timeout: int, **upstream: Any) -> None:
        super().__init__(sampler, **upstream)
        self.pruner_cfg = pruner
        self.failure = str(failure)
        self.worst_value = _plain(worst_value)
        self.objectives = None if objectives is None else [str(o) for o in _plain(objectives)]
        self.failure_values: list[float] = []
        self.last_failure: JobReturn | None = None
        self.space_description: dict = {}       # the search space as written (a study user attr)
        self.fixed_overrides: list[str] = []    # the overrides every trial gets (a study user attr)
        self.settings = StorageSettings(heartbeat_interval, grace_period, max_retry, connect_timeout)
        self.storage_url: str | None = None
        self.masked_storage: str | None = None   # set when the configs had to be scrubbed
        self.secrets: list[str] = []

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        if self.storage is not None and not isinstance(self.storage, str):
            fail(f"bad value hydra.sweeper.storage: expected a URL string, got {type(self.storage).__name__}")
        self.storage_url = (self.storage or "").strip()
        if not self.storage_url:  # <sweep dir>/optuna.db, beside the runs
            sweep_dir = Path(config.hydra.sweep.dir).resolve()
            sweep_dir.mkdir(parents=True, exist_ok=True)
            self.storage_url = f"sqlite:///{sweep_dir / 'optuna.db'}"
        self.secrets = url_secrets(self.storage_url)
        if self.secrets:
            self._scrub_credentials(config)
        # Jobs re-open their trial from this URL; it goes through the environment, never a config.
        os.environ[ENV_STORAGE] = self.storage_url
        super().setup(hydra_context=hydra_context, task_function=TrialTask(task_function), config=config)

    def _scrub_credentials(self, config: DictConfig) -> None:
        """Replace the storage password by *** in the sweep's config (jobs are composed from it and
        save it in .hydra/) and in sys.argv (W&B records the command line)."""
        masked = mask_passwords(self.storage_url)
        with read_write(config.hydra), open_dict(config.hydra):
            raw = OmegaConf.to_container(config.hydra.sweeper, resolve=False).get("storage")
            leaks = raw is not None and any(s in str(raw) for s in self.secrets)
            scrubbed = []
            for item in OmegaConf.to_container(config.hydra.overrides.hydra, resolve=False):
                if any(s in item for s in self.secrets):
                    key = item.split("=", 1)[0].lstrip("+~")
                    leaks |= key == "hydra.sweeper.storage"
                    item = (f"{key}={quote_override(masked)}" if key == "hydra.sweeper.storage"
                            else mask_passwords(item, self.secrets))
                scrubbed.append(item)
            config.hydra.overrides.hydra = scrubbed
            if leaks:
                config.hydra.sweeper.storage = self.masked_storage = masked
        # HydraConfig holds its own copy of the sweep's hydra node, which launchers pickle with the
        # jobs (submitit writes it to disk): refresh it from the scrubbed config.
        if HydraConfig.initialized():
            HydraConfig.instance().set_config(config)
        sys.argv[:] = [mask_passwords(arg, self.secrets) for arg in sys.argv]

    def sweep(self, arguments: list[str]) -> None:
        assert self.config is not None and self.launcher is not None
        if self.failure not in FAILURE_STRATEGIES:
            fail(f"bad value hydra.sweeper.failure={self.failure!r}: "
                 f"choose one of {', '.join(FAILURE_STRATEGIES)}")
        self._check_objectives()
        space = self._search_space(arguments)
        target = self._target(space[0])
        try:
            pruner = optuna_pruner(self.pruner_cfg)
        except Exception as err:  # noqa: BLE001
            fail(f"bad value hydra.sweeper.pruner: {one_line(err, typed=False)}")
        storage, study = self._open_study(pruner)
        self._describe_study(study)
        log.info("Study %r in %s: %d of %d trials already there; sampler %s, pruner %s, failures -> %s",
                 study.study_name, mask_passwords(self.storage_url), trials_used(study), target,
                 type(self.sampler).__name__, type(pruner).__name__, self.failure)
        ran = self._run_trials(storage, study, space, target)
        self._finish(study, target, ran)

    def _check_objectives(self) -> None:
        """The study's directions, checked against hydra.sweeper.objectives and worst_value (one line
        naming the key otherwise), and the values a failed trial is told."""
        directions = [str(d).lower() for d in self._get_directions()]
        if not directions or any(d not in ("minimize", "maximize") for d in directions):
            fail(f"bad value hydra.sweeper.direction={directions}: each direction is minimize or maximize")
        if self.objectives is not None:
            if len(self.objectives) != len(directions):
                fail(f"bad value hydra.sweeper.objectives={self.objectives}: {len(self.objectives)} name(s) "
                     f"for {len(directions)} direction(s) (hydra.sweeper.direction={directions}); give one "
                     "name per direction")
            for name, direction in zip(self.objectives, directions):
                known = OBJECTIVES.get(name)
                if known is not None and known.direction != direction:
                    fail(f"bad value hydra.sweeper.direction={directions}: objective {name} is to "
                         f"{known.direction}, not to {direction}")
        try:
            self.failure_values = failure_values(directions, self.objectives, self.worst_value)
        except (TypeError, ValueError) as err:
            fail(f"bad value hydra.sweeper.worst_value={self.worst_value!r}: {err}; use null (the worst "
                 "possible value), a number, or one number per objective")

    def _search_space(self, arguments: list[str]) -> tuple[dict, dict, list]:
        """Upstream's (distributions, fixed params, fixed overrides) of the params and the command line."""
        self._process_searchspace_config()
        params_conf = self._parse_sweeper_params_config()
        params_conf.extend(arguments)
        distributions, fixed_params, fixed_overrides = create_params_from_overrides(params_conf)
        for name in fixed_params:  # a value given on the command line fixes a searched key
            distributions.pop(name, None)
        self.space_description = dict(item.split("=", 1) if "=" in item else (item, "")
                                      for item in params_conf)
        # passed to every job as overrides, but recorded once, on the study (upstream copies the fixed
        # values into each trial's user attributes, where they hide the trial's own)
        self.fixed_overrides = [*(f"{key}={value}" for key, value in fixed_params.items()), *fixed_overrides]
        return distributions, {}, self.fixed_overrides

    def _describe_study(self, study: optuna.Study) -> None:
        """Links from the study to what made it: metric names, and user attributes with the command,
        the search space, the git revision and the W&B group of its runs."""
        try:
            if self.objectives is not None and study.metric_names != self.objectives:
                with quiet_optuna():  # "experimental" since Optuna 3.2
                    study.set_metric_names(self.objectives)
            attrs = study_attributes(self.config, self.space_description, self.storage_url)
            for key, value in {**attrs, "fixed_overrides": self.fixed_overrides}.items():
                study.set_user_attr(key, value)
        except Exception as err:  # noqa: BLE001 - descriptions must never stop a sweep
            log.warning("could not describe study %r: %s", study.study_name, one_line(err, typed=False))

    def _target(self, distributions: dict) -> int:
        """The study's n_trials; for the grid sampler (which gets its grid here) at most the grid size."""
        target = self.n_trials
        if isinstance(self.sampler, functools.partial) and self.sampler.func == optuna.samplers.GridSampler:
            grid = {name: self._to_grid_sampler_choices(d) for name, d in distributions.items()}
            self.sampler = self.sampler(grid)
            grid_size = math.prod(len(v) for v in grid.values())
            target = grid_size if target is None else min(int(target), grid_size)
        if target is None:
            fail("bad value hydra.sweeper.n_trials=null: only the grid sampler can infer it; set a number")
        if isinstance(target, bool) or not isinstance(target, int) or target < 1:
            fail(f"bad value hydra.sweeper.n_trials={target!r}: must be the study's total number of trials, "
                 "an integer >= 1, e.g. hydra.sweeper.n_trials=100")
        return int(target)

    def _run_trials(self, storage, study: optuna.Study, space: tuple, target: int) -> Counter:
        """Ask, launch and tell batches of n_jobs trials until the study has `target`; running trials
        of an interrupted sweep are re-queued. Returns how many trials of each status this process ran."""
        heartbeat = Heartbeat(storage, self.settings.heartbeat_interval)
        ran: Counter = Counter()
        in_flight: list[optuna.Trial] = []
        raise_on_sigterm()  # SIGTERM (docker stop, SLURM) re-queues the running trials like Ctrl-C
        try:
            while self._ask(study, target, heartbeat, in_flight):
                returns, error = self._launch(study, in_flight, space)
                for trial, ret in zip(list(in_flight), returns):
                    outcome = (Outcome(Status.FAILED, None, error) if ret is None
                               else self._outcome(storage, trial, ret))
                    self._tell(study, trial, outcome)
                    heartbeat.discard(trial._trial_id)
                    in_flight.remove(trial)
                    ran[outcome.status] += 1
                    if outcome.status == Status.FAILED and ret is not None:
                        self.last_failure = ret
                        # a job that failed its check of a hydra.sweeper key (e.g. an unknown objective):
                        # every trial would fail alike, so the sweep stops with that one line
                        cause = getattr(ret._return_value, "cause", None)
                        if isinstance(cause, ConfigError) and str(cause.key).startswith("hydra.sweeper."):
                            fail(str(cause))
                self._check_failure_rate(ran)
        except BaseException as exc:
            self._requeue(study, in_flight)
            if not isinstance(exc, KeyboardInterrupt):
                raise
            requeued = f"; {len(in_flight)} running trial(s) re-queued" if in_flight else ""
            fail(f"sweep interrupted{requeued}; run the same command to continue the study",
                 EXIT_CODES.get(signal_name(exc), 130))
        finally:
            heartbeat.stop()
        return ran

    def _ask(self, study: optuna.Study, target: int, heartbeat: Heartbeat, in_flight: list) -> bool:
        """Under the storage-wide lock: fail stale trials, then ask for up to n_jobs of the trials the
        study still misses (appended to `in_flight`). False when the study is full."""
        lock = storage_lock(self.storage_url, study_lock_name(study.study_name),
                            self.settings.connect_timeout)
        with lock, quiet_optuna():
            requeue_dead_local_trials(study, self.settings.max_retry)
            optuna.storages.fail_stale_trials(study)
            missing = trials_to_ask(study, target)
            if missing <= 0:
                return False
            for _ in range(min(self.n_jobs, missing)):
                trial = study.ask()
                mark_owner(study._storage, trial._trial_id)
                in_flight.append(trial)
                heartbeat.add(trial._trial_id)
        return True

    def _launch(self, study: optuna.Study, trials: list, space: tuple) -> tuple[list, str | None]:
        """One job per trial. A launcher that fails (e.g. a joblib worker killed by the OOM killer)
        gives no returns (None each) and the error; a search space that cannot compose ends the sweep."""
        overrides = self._configure_trials(trials, *space)
        overrides = [tuple(o) + self._job_overrides(study, t) for o, t in zip(overrides, trials)]
        error = None
        try:
            returns = list(self.launcher.launch(overrides, initial_job_idx=self.job_idx))
        except (ConfigCompositionException, OverrideParseException) as err:
            for trial in trials:  # a search space that cannot compose: stop, don't retry
                study.tell(trial, state=TrialState.FAIL)
            fail(mask_passwords(f"Optuna trial {trials[0].number}: {one_line(err, typed=False)}",
                                self.secrets))
        except Exception as err:  # noqa: BLE001
            error = mask_passwords(one_line(err), self.secrets)
            returns = [None] * len(trials)
            log.warning("the launcher failed for trial(s) %s: %s", [t.number for t in trials], error)
        self.job_idx += len(returns)
        return returns, error

    def _tell(self, study: optuna.Study, trial: optuna.Trial, outcome: Outcome) -> None:
        try:
            tell_outcome(study, trial, outcome, self.failure, self.failure_values)
        except RuntimeError as err:  # GridSampler calls study.stop() once the grid is done
            if "Study.stop" not in str(err):
                raise
        except ValueError as err:  # Optuna refused the values: FAIL, counted, so that the sweep ends
            outcome.status = Status.FAILED
            outcome.error = f"Optuna refused the outcome: {one_line(err, typed=False)}"
            tell_outcome(study, trial, outcome, "fail")
        values = outcome.values()
        shown = "-" if values is None else ", ".join(f"{v:.4g}" for v in values)
        names = ", ".join(self.objectives) if self.objectives else "value"
        log.info("Optuna trial %d: %s, %s %s%s", trial.number, outcome.status, names, shown,
                 f" ({outcome.error})" if outcome.error else "")

    def _check_failure_rate(self, ran: Counter) -> None:
        """As upstream: more failed trials than max_failure_rate allows ends the sweep with the failed
        job's exception (its traceback on stderr) and a non-zero exit status."""
        n_ran = sum(ran.values())
        if not n_ran or ran[Status.FAILED] / n_ran <= self.max_failure_rate:
            return
        log.error("%d of %d trials failed, more than hydra.sweeper.max_failure_rate=%s",
                  ran[Status.FAILED], n_ran, self.max_failure_rate)
        print(f"{PREFIX}{ran[Status.FAILED]} of {n_ran} trials failed, more than hydra.sweeper."
              f"max_failure_rate={self.max_failure_rate}; the last failure:", file=sys.stderr, flush=True)
        error = self.last_failure._return_value if self.last_failure is not None else None
        if isinstance(error, BaseException):  # a job's own one line (JobExited) without a traceback
            text = str(error) if isinstance(error, JobExited) else "".join(traceback.format_exception(error))
            print(mask_passwords(text.rstrip(), self.secrets), file=sys.stderr, flush=True)
        sys.exit(1)

    def _job_overrides(self, study: optuna.Study, trial: optuna.Trial) -> tuple[str, ...]:
        trial_env = {ENV_STUDY: study.study_name, ENV_TRIAL_ID: trial._trial_id,
                     ENV_TRIAL_NUMBER: trial.number}
        extra = [f"+hydra.job.env_set.{key}={quote_override(str(value))}" for key, value in trial_env.items()]
        if self.masked_storage is not None:
            extra.append(f"hydra.sweeper.storage={quote_override(self.masked_storage)}")
        return tuple(extra)

    def _open_study(self, pruner) -> tuple[Any, optuna.Study]:
        directions = self._get_directions()
        study_name = self.study_name or Path(self.sweep_dir).name
        try:
            schema_lock = storage_lock(self.storage_url, SCHEMA_LOCK, self.settings.connect_timeout)
            storage = open_storage(self.storage_url, self.settings, schema_lock)
            with storage_lock(self.storage_url, study_lock_name(study_name), self.settings.connect_timeout):
                study = optuna.create_study(study_name=study_name, storage=storage, sampler=self.sampler,
                                            pruner=pruner, directions=directions, load_if_exists=True)
        except StorageError as err:
            fail(str(err))
        except Exception as err:  # noqa: BLE001
            fail(mask_passwords(f"cannot open the Optuna study {study_name!r} in {self.storage_url}: "
                                f"{one_line(err, typed=False)}", self.secrets))
        existing = [d.name.lower() for d in study.directions]
        if existing != [d.lower() for d in directions]:
            fail(f"bad value hydra.sweeper.direction={directions}: study {study_name!r} in "
                 f"{mask_passwords(self.storage_url)} already exists with direction {existing}; "
                 "use another hydra.sweeper.study_name")
        return storage, study

    def _outcome(self, storage, trial: optuna.Trial, ret: JobReturn) -> Outcome:
        try:  # the job's output dir, or where its skipped.json points (a run already done elsewhere)
            run_dir = str(record_dir(Path(ret.hydra_cfg.hydra.runtime.output_dir)))
        except Exception:  # noqa: BLE001
            run_dir = None
        summary = (read_summary(Path(run_dir)) or {}) if run_dir else {}  # {}: failed before writing one
        outcome = self._classify(storage, trial, ret, summary)
        outcome.run_dir, outcome.attrs = run_dir, trial_links(summary)
        if outcome.error:
            outcome.error = mask_passwords(outcome.error, self.secrets)
        return outcome

    def _classify(self, storage, trial: optuna.Trial, ret: JobReturn, summary: dict) -> Outcome:
        status = summary.get("status")
        if ret.status != JobStatus.COMPLETED:
            error = ret._return_value
            text = summary.get("error") or (one_line(error) if isinstance(error, BaseException)
                                            else str(error))
            return Outcome(Status.FAILED, None, text.strip().split("\n")[0] or "failed")
        value = returned_values(ret._return_value, len(self._get_directions()))
        if isinstance(value, str):
            return Outcome(Status.FAILED, None, value)
        if PRUNED_ATTR in storage.get_trial(trial._trial_id).system_attrs or status == Status.PRUNED:
            return Outcome(Status.PRUNED, value)
        if status in (Status.DIVERGED, Status.FAILED):
            return Outcome(Status(status), value, summary.get("error"))
        if not all(math.isfinite(v) for v in value):
            return Outcome(Status.DIVERGED, value)
        return Outcome(Status.COMPLETED, value)

    def _requeue(self, study: optuna.Study, trials: list[optuna.Trial]) -> None:
        for trial in trials:
            try:
                requeue(study, trial, self.settings.max_retry)
                log.warning("Optuna trial %d interrupted: re-queued", trial.number)
            except Exception as err:  # noqa: BLE001
                log.warning("Optuna trial %d interrupted, could not re-queue it: %s", trial.number, err)

    def _finish(self, study: optuna.Study, target: int, ran: Counter) -> None:
        trials = study.get_trials(deepcopy=False)
        states = Counter(t.state.name for t in trials)
        done = ", ".join(f"{k} {v}" for k, v in sorted(ran.items())) or "nothing to do"
        log.info("Study %r: %d trials (%s) of n_trials=%d; this sweeper ran: %s", study.study_name,
                 len(trials), ", ".join(f"{k} {v}" for k, v in sorted(states.items())), target, done)
        if not ran:
            log.info("Nothing to run: the study already has %d trials; raise hydra.sweeper.n_trials to "
                     "continue it", target)
        results = best_results(study, trials)
        if results is None:
            failed = sum(1 for t in trials if t.state == TrialState.COMPLETE and is_failure(t))
            log.info("No trial completed a run yet (%d failed or diverged); no best trial", failed)
            return
        for line in results.pop("log"):
            log.info("%s", line)
        Path(self.config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create({"name": "optuna", "study_name": study.study_name,
                                         "storage": mask_passwords(self.storage_url), **results}),
                       f"{self.config.hydra.sweep.dir}/optimization_results.yaml")


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
