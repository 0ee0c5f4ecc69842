"""A run's identity: a short hash of everything in its config that changes the numbers.

`NOT_IDENTITY` is the one definition of the keys that do not: the identity leaves them out, a sweep job's
dir name leaves out overrides of them, and the report pools runs by the identity without the seed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

from omegaconf import DictConfig, OmegaConf

# How or where a run executes, or what it records, not what it computes. A key also covers its sub-keys.
NOT_IDENTITY = (
    "hydra", "logger", "experiment_name", "paths", "trusted_targets",
    "search",   # the search group configures the sweeper (hydra.sweeper), not the run
    "pruning",  # whether a run may be stopped early, not what an epoch computes (normbench.sweep.pruning)
    "trainer.device", "trainer.threads", "trainer.compile", "trainer.channels_last",
    "trainer.log_every_steps", "trainer.checkpoint", "trainer.eval_batch_size",
    "data.root", "data.download",
)
SEED = "seed"
MAX_DIRNAME = 120


def covered(key: str, keys: Iterable[str]) -> bool:
    """`key` is one of `keys` or a sub-key of one (how NOT_IDENTITY is read)."""
    return any(key == k or key.startswith(k + ".") for k in keys)


def training_config(cfg: DictConfig | dict, ignored: Iterable[str] = NOT_IDENTITY) -> dict:
    """The resolved config minus the keys that don't change the numbers."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    ignored = tuple(ignored)

    def strip(node: dict, prefix: str) -> dict:
        out = {}
        for key, value in node.items():
            path = f"{prefix}{key}"
            if covered(path, ignored):
                continue
            out[key] = strip(value, path + ".") if isinstance(value, dict) else value
        return out

    return strip(container, "")


def _digest(config: dict) -> str:
    blob = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def run_identity(cfg: DictConfig | dict) -> str:
    return _digest(training_config(cfg))


def seedless_identity(cfg: DictConfig | dict) -> str:
    """The identity of the run's config with its seed left out: the same for every seed of one setting."""
    return _digest(training_config(cfg, (*NOT_IDENTITY, SEED)))


def override_key(override: str) -> str:
    """`+trainer.fault=raise` -> `trainer.fault`."""
    return override.split("=", 1)[0].lstrip("+~")


def job_dirname(overrides: Iterable[str]) -> str:
    """A sweep job's subdir: its overrides of keys that change the numbers (readable, stable across
    re-runs), hashed when too long."""
    kept = [o for o in overrides if not covered(override_key(o), NOT_IDENTITY)]
    name = ",".join(kept).replace("/", "_") or "base"
    if len(name) > MAX_DIRNAME:
        digest = hashlib.sha256(name.encode()).hexdigest()[:10]
        name = f"{name[:MAX_DIRNAME - 11]}_{digest}"
    return name
