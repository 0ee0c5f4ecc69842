"""OmegaConf resolvers the config tree uses; registered before Hydra composes."""

from __future__ import annotations

from omegaconf import OmegaConf

from normbench.sweep.identity import job_dirname


def register() -> None:
    if not OmegaConf.has_resolver("normbench_job_dir"):
        OmegaConf.register_resolver("normbench_job_dir", lambda overrides: job_dirname(list(overrides)))
