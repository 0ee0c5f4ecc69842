"""Links both ways between an Optuna study and what made it (imported lazily, like _impl.py): the study's
user attributes say how it was made, each trial's where its run is (docs/optuna.md, "Links both ways").
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from normbench.errors import mask_passwords
from normbench.record import WANDB_RUN_ID


def git_revision(path: Path) -> str | None:
    """The commit checked out at `path` (`<sha>-dirty` with uncommitted changes to tracked files, never
    a tag name); None outside git."""
    command = ["git", "-C", str(path), "describe", "--always", "--dirty", "--abbrev=40", "--exclude=*"]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def study_attributes(config: DictConfig, space: dict, storage_url: str) -> dict:
    """The study's user attributes (JSON values; the password in a storage URL masked; unknown ones left
    out). The git revision is of the script's dir (bench/ for normbench), else of the working dir."""
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    code_dir = script.resolve().parent if script is not None and script.is_file() else Path.cwd()
    attrs = {"command": shlex.join([Path(sys.executable).name, *sys.argv]),
             "search_space": {str(k): str(v) for k, v in space.items()},
             "sweep_dir": str(config.hydra.sweep.dir), "storage": mask_passwords(storage_url),
             "git_revision": git_revision(code_dir)}
    logger = OmegaConf.select(config, "logger", default=None)
    if OmegaConf.is_config(logger) and logger.get("wandb"):
        # normbench's W&B runs: project logger.project, group logger.group or else experiment_name
        attrs.update(wandb_group=logger.get("group") or config.get("experiment_name"),
                     wandb_project=logger.get("project"), wandb_entity=logger.get("entity"))
    return {key: value if isinstance(value, dict) else str(value) for key, value in attrs.items()
            if value is not None and value != ""}


def trial_links(summary: dict) -> dict:
    """A trial's user attributes from its run's summary.json: the W&B run id and the test accuracy
    (each only when the record has it)."""
    attrs = {}
    run_id = summary.get(WANDB_RUN_ID)
    if run_id:
        attrs[WANDB_RUN_ID] = str(run_id)
    test_acc = (summary.get("metrics") or {}).get("test/acc")
    if isinstance(test_acc, (int, float)):
        attrs["test_acc"] = float(test_acc)
    return attrs
