"""Links both ways between an Optuna study and what made it (imported lazily, like _impl.py).

The study's user attributes say how it was made: the command, the search space, the git revision of
the code and the W&B project and group its runs are logged to. Each trial's user attributes point at
its run: the run dir (set with its outcome), the W&B run id and the test accuracy from the run's
summary.json. The other way, each job knows its study and trial number
(normbench.sweep.optuna_support.optuna_trial_info), which go into its W&B config.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from normbench.errors import mask_passwords

WANDB_RUN_ID = "wandb_run_id"   # summary.json key of the run's W&B run id (when it logged to W&B)


def git_revision(path: Path) -> str | None:
    """The commit checked out at `path` (`<sha>-dirty` with uncommitted changes); None outside git."""
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()

        revision = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{revision}-dirty" if dirty else revision or None


def _code_dir() -> Path:
    """Where the task's code lives: the script's dir (bench/ for normbench), else the working dir."""
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    return script.resolve().parent if script is not None and script.is_file() else Path.cwd()


def study_attributes(config: DictConfig, space: dict, storage_url: str | None) -> dict:
    """The study's user attributes (JSON values; the password in a storage URL masked)."""
    attrs = {"command": shlex.join([Path(sys.executable).name, *sys.argv]),
             "search_space": {str(k): str(v) for k, v in space.items()},
             "sweep_dir": str(config.hydra.sweep.dir)}
    if storage_url:
        attrs["storage"] = mask_passwords(storage_url)
    revision = git_revision(_code_dir())
    if revision:
        attrs["git_revision"] = revision
    logger = OmegaConf.select(config, "logger", default=None)
    if OmegaConf.is_config(logger) and logger.get("name") == "wandb":
        # normbench's W&B runs: project logger.project, group logger.group or else experiment_name
        group = logger.get("group") or config.get("experiment_name")
        if group:
            attrs["wandb_group"] = str(group)
        if logger.get("project"):
            attrs["wandb_project"] = str(logger.project)
        if logger.get("entity"):
            attrs["wandb_entity"] = str(logger.entity)
    return attrs


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
