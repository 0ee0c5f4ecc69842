"""OmegaConf resolvers the config tree uses; registered before Hydra composes."""

from __future__ import annotations

import hashlib

from omegaconf import OmegaConf

MAX_DIRNAME = 120


def job_dirname(override_dirname: str) -> str:
    """A sweep job's subdir: its overrides (readable, stable across re-runs), hashed when too long."""
    name = (override_dirname or "base").replace("/", "_")
    if len(name) > MAX_DIRNAME:
        digest = hashlib.sha256(name.encode()).hexdigest()[:10]
        name = f"{name[:MAX_DIRNAME - 11]}_{digest}"
    return name


def register() -> None:
    if not OmegaConf.has_resolver("normbench_job_dir"):
        OmegaConf.register_resolver("normbench_job_dir", job_dirname)
