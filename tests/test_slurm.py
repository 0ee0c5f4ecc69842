"""normbench's `hydra/launcher=slurm` on a real one-node SLURM cluster (tests/slurm_cluster.py, started
with scripts/slurm_one_node.sh): a job array, a requeue mid-run, a timeout through submitit's
checkpointing, and an Optuna search whose workers are array tasks. Skipped where SLURM cannot run.

Runs stop at exact points with the `wait` fault (`+trainer.fault=wait`): the run appends a line to
`<file>.waiting` when it reaches epoch 2 (its epoch-1 checkpoint written) and holds there until
`<file>` exists, so the test interrupts it at that point instead of guessing with sleeps.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, TRAIN

SLURM = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.mem_gb=null",
         "hydra.launcher.cpus_per_task=1", "hydra.launcher.array_parallelism=2", "hydra.launcher.timeout_min=10",
         "logger=none"]


def start_sweep(args: list[str], cwd: Path, cluster) -> subprocess.Popen:
    env = {**os.environ, **cluster.env, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1", "WANDB_MODE": "disabled"}
    return subprocess.Popen([sys.executable, str(TRAIN), "-m", *SLURM, *TINY, *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, cluster, timeout: float = 180) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"sweep timed out:\n{out[-5000:]}\n{cluster.queue()}\n{cluster.logs()}") from None
    return out


def wait_for(predicate, what: str, proc: subprocess.Popen, timeout: float = 120, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended while waiting for {what}:\n{proc.stdout.read()[-5000:]}")
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def arrivals(marker: Path) -> list[list[str]]:
    """The `wait` fault's lines: pid, SLURM restart count, where."""
    return [line.split() for line in marker.read_text().splitlines()] if marker.exists() else []


def submitted_job_id(sweep: Path) -> str:
    """The SLURM job id of a one-job sweep (submitit's folder is named after it)."""
    folders = [p.name for p in (sweep / ".submitit").iterdir() if p.is_dir() and p.name != "%j"]
    return folders[0] if len(folders) == 1 else ""


def results(sweep: Path) -> list:
    """What Hydra collected: the JobReturn of each task, from submitit's result pickles."""
    rows = []
    for path in sorted((sweep / ".submitit").rglob("*_result.pkl")):
        outcome, value = pickle.loads(path.read_bytes())
        rows.append((outcome, value))
    return rows


def summaries(sweep: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep.rglob("summary.json"))]


def test_job_array_sweep_completes_and_hydra_collects_every_objective(slurm_cluster, tmp_path):
    sweep = tmp_path / "sweep"
    started = time.monotonic()
    proc = start_sweep(["norm=bn,gn", f"hydra.sweep.dir={sweep}"], tmp_path, slurm_cluster)
    out = finish(proc, slurm_cluster)
    assert proc.returncode == 0, out[-5000:]
    # one array of two tasks, both through sbatch (the sbatch script names the array)
    sbatch = list((sweep / ".submitit").rglob("*_submission.sh"))
    assert sbatch and "#SBATCH --array=0-1%2" in sbatch[0].read_text()
    records = summaries(sweep)
    assert sorted(r["choices"]["norm"] for r in records) == ["bn", "gn"]
    assert all(r["status"] == "completed" for r in records), records
    assert all(r["host"] and r["pid"] != proc.pid for r in records)
    collected = results(sweep)
    assert [outcome for outcome, _ in collected] == ["success", "success"], collected
    objectives = sorted(job_return.return_value for _, job_return in collected)
    assert objectives == sorted(r["objective"] for r in records)
    assert re.search(r"2 completed / 0 diverged / 0 failed", out), out[-3000:]
    print(f"array sweep: {time.monotonic() - started:.1f} s (cluster up in {slurm_cluster.start_s:.1f} s)")
