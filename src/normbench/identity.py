"""A run's identity: a short hash of everything in its config that changes the numbers."""

from __future__ import annotations

import hashlib
import json

from omegaconf import DictConfig, OmegaConf

# How or where a run executes, not what it computes.
NOT_IDENTITY = {
    "hydra", "logger", "experiment_name", "paths",
    "pruning",  # whether a run may be stopped early, not what an epoch computes (normbench.pruning)
    "trainer.device", "trainer.threads", "trainer.compile", "trainer.channels_last",
    "trainer.log_every_steps", "trainer.checkpoint", "trainer.eval_batch_size",
    "data.root", "data.download",
}


def training_config(cfg: DictConfig) -> dict:
    """The resolved config minus the keys that don't change the numbers."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)

    def strip(node: dict, prefix: str) -> dict:
        out = {}
        for key, value in node.items():
            path = f"{prefix}{key}"
            if path in NOT_IDENTITY:
                continue
            out[key] = strip(value, path + ".") if isinstance(value, dict) else value
        return out

    return strip(container, "")


def run_identity(cfg: DictConfig) -> str:
    blob = json.dumps(training_config(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
