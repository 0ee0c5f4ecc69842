"""Many sweeper processes sharing one Optuna study in a real PostgreSQL 15 server (tests/pg.py), and
the storage password never leaking into logs, run records or W&B."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import TINY, TRAIN, run_train
from optuna.trial import TrialState
from pg import PASSWORD, postgres  # noqa: F401 - the fixture

# scheduler fixed: a sampled scheduler=step would decay after 10 epochs of a 1-epoch run, which validate()
# refuses (the trial fails before it has a record).
FAST = [*TINY, "model=vgg_a_light", "scheduler=constant"]


def start_worker(args: list[str], cwd: Path) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.Popen([sys.executable, str(TRAIN), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_concurrent_workers_share_one_study_with_exactly_n_trials(tmp_path, postgres):  # noqa: F811
    """Three sweeper processes (as on three machines: each its own working dir) run the same command
    against one PostgreSQL study with n_trials=8: the study ends with exactly 8 finished trials,
    numbered 0..7, each trained exactly once by one of the workers."""
    n_trials, n_workers = 8, 3
    url = postgres.url()
    args = ["-m", "search=optuna_tpe", f"hydra.sweeper.storage={url}", "hydra.sweeper.study_name=shared",
            f"hydra.sweeper.n_trials={n_trials}", "hydra/sweeper/pruner=median", *FAST, "logger=none",
            "trainer.epochs=2"]
    workers = [start_worker(args, tmp_path / f"worker{i}") for i in range(n_workers)]
    outputs = []
    for worker in workers:
        out, _ = worker.communicate(timeout=600)
        outputs.append(out)
        assert worker.returncode == 0, out[-4000:]

    study = optuna.load_study(study_name="shared", storage=url.replace("postgresql://", "postgresql+psycopg2://"))
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == list(range(n_trials))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials), [t.state for t in trials]
    run_dirs = [t.user_attrs["run_dir"] for t in trials]
    assert len(set(run_dirs)) == n_trials
    records = sorted(str(p.parent) for p in tmp_path.glob("worker*/multirun/default/*/summary.json"))
    # every run record is one trial's, none trained twice
    assert records == sorted(run_dirs), (set(records) ^ set(run_dirs), outputs)
    for trial in trials:
        summary = json.loads((Path(trial.user_attrs["run_dir"]) / "summary.json").read_text())
        assert summary["status"] == trial.user_attrs["status"]
        if trial.state == TrialState.COMPLETE:
            assert summary["objective"] == pytest.approx(trial.value)
    ran = [len(re.findall(r"Optuna trial \d+: (?:completed|pruned|diverged|failed)", out)) for out in outputs]
    print("trials per worker:", ran)
    assert sum(ran) == n_trials, ran
    assert sum(1 for n in ran if n > 0) >= 2, f"the workers did not overlap: {ran}"
    for out in outputs:
        assert PASSWORD not in out and "bench:***@" in out


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "submitit_local"])
def test_storage_password_never_reaches_logs_records_or_wandb(tmp_path, postgres, wandb_env,  # noqa: F811
                                                               launcher):
    """In-process jobs (basic launcher: W&B records this process's command line) and pickled ones
    (submitit writes the jobs' configs and Hydra's state to disk)."""
    url = postgres.url()
    proc = run_train(["-m", "search=optuna_tpe", f"hydra.sweeper.storage={url}",
                      f"hydra.sweeper.study_name=secret_{launcher}", "hydra.sweeper.n_trials=1",
                      f"hydra/launcher={launcher}", *FAST], tmp_path)  # logger: wandb (offline)
    assert PASSWORD not in proc.stdout + proc.stderr
    sweep = tmp_path / "multirun" / "default"
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    run_files = [p for p in files if sweep in p.parents]
    names = {p.name for p in run_files}
    assert {"summary.json", "config.yaml", "hydra.yaml", "overrides.yaml"} <= names
    if launcher == "submitit_local":
        assert any(p.suffix == ".pkl" for p in run_files)
    assert any(p.suffix == ".wandb" for p in files), "no W&B run was written"
    if launcher == "basic":  # W&B recorded this process's command line: with the password masked
        assert any(b"hydra.sweeper.storage=postgresql://bench:***@" in p.read_bytes()
                   for p in files if p.suffix == ".wandb")
    leaked = [str(p) for p in files if PASSWORD.encode() in p.read_bytes()]
    assert not leaked, f"password found in {leaked}"
    hydra_yaml = next(p for p in run_files if p.name == "hydra.yaml").read_text()
    assert "bench:***@127.0.0.1" in hydra_yaml  # the job's record says which storage, masked
    # The study itself was written with the real password.
    study = optuna.load_study(study_name=f"secret_{launcher}", storage=url.replace("postgresql://", "postgresql+psycopg2://"))
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE]
