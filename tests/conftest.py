"""Shared fixtures: offline W&B in a temp dir, and the tiny overrides that make runs take seconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "bench" / "train.py"
CONF = ROOT / "conf"

# The project's quick run (conf/debug/quick.yaml: narrow model, 4 steps of 16 images, 2 eval batches, one
# thread) on small synthetic data: a run takes a second or two on a laptop CPU. A test's own key=value
# overrides win over quick's (a command-line value beats any config); a preset (+experiment=) must come
# before TINY, or its sizes win. batch_size is also given on the command line because a key given there
# leaves an Optuna search's space (a search would sample the batch size otherwise).
TINY = ["data=synthetic", "data.num_train=512", "data.num_test=128", "+debug=quick", "batch_size=16"]


@pytest.fixture
def wandb_env(tmp_path, monkeypatch) -> dict:
    """W&B offline, every W&B dir inside the test's temp dir, no credentials from the host. WANDB_DIR
    is unset, so that each run keeps its W&B files in its own record dir (normbench's default)."""
    base = tmp_path / "wandb-home"
    env = {
        "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
        "WANDB_CACHE_DIR": str(base / "cache"),
        "WANDB_CONFIG_DIR": str(base / "config"), "WANDB_DATA_DIR": str(base / "data"),
        "NETRC": str(base / "netrc"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    for value in env.values():
        if value.startswith(str(base)) and not value.endswith("netrc"):
            Path(value).mkdir(parents=True, exist_ok=True)
    return env


@pytest.fixture(autouse=True)
def no_shared_wandb_service():
    """An in-process wandb.init (test_tracking) sets WANDB_SERVICE in this process's environment, and
    every child process would then join that one wandb-core service: a SIGKILLed run's stream would stay
    open there and its re-run's same W&B id would be "in use". Each test starts without it (not restored
    afterwards, on purpose)."""
    os.environ.pop("WANDB_SERVICE", None)


def run_train(args: list[str], cwd: Path, env_extra: dict | None = None, timeout: int = 600,
              check: bool = True) -> subprocess.CompletedProcess:
    """`python bench/train.py ARGS` in a fresh process, run from `cwd` (where outputs land)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", **(env_extra or {})}
    proc = subprocess.run([sys.executable, str(TRAIN), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def wandb_inspect(run_dir: Path) -> dict:
    """Read an offline W&B run back with W&B's own reader (no server)."""
    import json
    import shutil

    wandb_bin = shutil.which("wandb", path=str(Path(sys.executable).parent)) or "wandb"
    proc = subprocess.run([wandb_bin, "leet", "inspect", "--summary", "--json", str(run_dir)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real one-node SLURM cluster (tests/slurm_cluster.py) for the whole session, started on first
    use and stopped at the end, even when tests fail; skips where SLURM cannot run here."""
    from slurm_cluster import Unavailable, one_node_cluster

    try:
        with one_node_cluster() as cluster:
            yield cluster
    except Unavailable as reason:
        pytest.skip(str(reason))


def pytest_collection_modifyitems(config, items):
    """Mark `cuda` every test that skips without a CUDA device (a skipif reason "needs ... CUDA ..."), so
    `pytest -m cuda` (bench/gpu_check.py) runs exactly the tests the CPU suite cannot."""
    for item in items:
        for mark in item.iter_markers("skipif"):
            reason = str(mark.kwargs.get("reason", "")).lower()
            if "needs" in reason and "cuda" in reason:
                item.add_marker(pytest.mark.cuda)
                break
