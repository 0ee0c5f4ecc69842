"""hydra/launcher=fused: Hydra's basic launcher, except that jobs which may train as one fused model
(same ``normbench.fused_launch.fuse_key``) run in groups of at most ``max_fuse`` in this process, each
still a whole run. Jobs that cannot fuse run one at a time; the sweep says once which and why."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


@dataclass
class FusedLauncherConf:
    _target_: str = "hydra_plugins.normbench_fused_launcher.fused_launcher.FusedLauncher"
    # the most jobs trained as one fused model (1: every job alone, as the basic launcher runs them);
    # checked before the sweep starts (normbench.preflight.check_launch)
    max_fuse: int = 8


ConfigStore.instance().store(group="hydra/launcher", name="fused", node=FusedLauncherConf,
                             provider="normbench")


class FusedLauncher(Launcher):
    def __init__(self, max_fuse: int = 8) -> None:
        super().__init__()
        self.max_fuse = max_fuse
        self.unfused_said = False

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def _job_config(self, overrides: Sequence[str], idx: int) -> DictConfig:
        config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(config):
            config.hydra.job.id = str(idx)
            config.hydra.job.num = idx
        return config

    def _plan(self, configs: list[DictConfig]) -> list[list[int]]:
        from normbench.fused_launch import fuse_key, plan_groups, unfusable_job_reason
        from normbench.identity import run_identity

        keys, identities, reasons = [], [], Counter()
        before = HydraConfig.instance().cfg
        try:
            for config in configs:
                HydraConfig.instance().set_config(config)  # for the interpolations that read it
                task = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])  # the task's
                reason = unfusable_job_reason(task)
                reasons.update([reason] if reason else [])
                keys.append(None if reason or self.max_fuse == 1 else fuse_key(task))
                identities.append(run_identity(task))
        finally:
            HydraConfig.instance().cfg = before
        if reasons and not self.unfused_said:
            said = ", ".join(f"{reason} ({count})" for reason, count in reasons.items())
            print(f"normbench: hydra/launcher=fused: {sum(reasons.values())} job(s) run unfused, no fused "
                  f"code for: {said}", flush=True)
            self.unfused_said = True
        return plan_groups(keys, identities, self.max_fuse)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from normbench.fused_launch import run_group

        setup_globals()
        hydra_cfg = self.config.hydra
        reset_log = partial(configure_log, hydra_cfg.hydra_logging, hydra_cfg.verbose,
                            execution_whitelist=self.hydra_context.execution_whitelist)
        reset_log()
        Path(str(hydra_cfg.sweep.dir)).mkdir(parents=True, exist_ok=True)
        configs = [self._job_config(over, initial_job_idx + i) for i, over in enumerate(job_overrides)]
        groups = self._plan(configs)
        log.info(f"Launching {len(configs)} jobs locally, in {len(groups)} group(s) of at most "
                 f"{self.max_fuse}")
        returns: list = [None] * len(configs)
        for group in groups:
            for i in group:
                log.info(f"\t#{initial_job_idx + i} : {' '.join(filter_overrides(job_overrides[i]))}")
            jobs = [partial(run_job, hydra_context=self.hydra_context, task_function=self.task_function,
                            config=configs[i], job_dir_key="hydra.sweep.dir",
                            job_subdir_key="hydra.sweep.subdir") for i in group]
            outcomes = [jobs[0]()] if len(jobs) == 1 else run_group(jobs)
            for i, outcome in zip(group, outcomes):
                if isinstance(outcome, BaseException):  # as the basic launcher, whose job would raise it
                    raise outcome
                returns[i] = outcome
            reset_log()
        return returns
