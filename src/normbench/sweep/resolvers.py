"""OmegaConf resolvers the config tree uses; registered before Hydra composes."""

from __future__ import annotations

from omegaconf import OmegaConf

from normbench.sweep.identity import job_dirname, swept_keys_from_env


def _job_dir(overrides, trial=None) -> str:
    return job_dirname(list(overrides), swept_keys_from_env(), trial)


def register() -> None:
    if not OmegaConf.has_resolver("normbench_job_dir"):
        OmegaConf.register_resolver("normbench_job_dir", _job_dir)
