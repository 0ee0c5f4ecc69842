"""Optuna searches (conf/search/, hydra/sweeper=normbench_optuna): real sweeps in subprocesses on tiny
synthetic runs, the study read back with optuna.load_study; plus fast in-process checks of the
sweeper's bookkeeping (failure strategy, stale trials, credential masking)."""

from __future__ import annotations

import json
import math
import random
import socket
import time
from pathlib import Path

import optuna
import pytest
from conftest import CONF, TINY, run_train
from optuna.trial import TrialState

from hydra_plugins.normbench_optuna_sweeper._study import (
    COUNTED_FAILURE_ATTR,
    Outcome,
    tell_outcome,
    trials_to_ask,
    trials_used,
)
from normbench.errors import mask_passwords
from normbench.sweep.optuna_support import StorageSettings, open_storage, quiet_optuna, url_secrets

optuna.logging.set_verbosity(optuna.logging.WARNING)

FAST = [*TINY, "model=vgg_a_light", "logger=none"]
# Every searched group fixed but the ones a test searches (a key on the command line leaves the space).
FIXED = ["norm=bn", "activation=relu", "loss=ce", "scheduler=constant",
         "optimizer.weight_decay=0", "model.dropout=0"]


def load_study(cwd: Path, name: str, experiment: str = "default") -> optuna.Study:
    db = cwd / "multirun" / experiment / "optuna.db"
    assert db.exists(), f"no study database at {db}"
    return optuna.load_study(study_name=name, storage=f"sqlite:///{db}")


def summary_of(trial: optuna.trial.FrozenTrial) -> dict:
    return json.loads((Path(trial.user_attrs["run_dir"]) / "summary.json").read_text())


# --------------------------------------------------------------------------------------------------
# Sweeps through bench/train.py


@pytest.mark.slow
def test_tpe_sweep_fills_the_study_and_a_rerun_continues_it(tmp_path):
    args = ["-m", "search=optuna_tpe", "hydra.sweeper.sampler.seed=0", *FAST]
    run_train([*args, "hydra.sweeper.n_trials=2"], tmp_path)

    study = load_study(tmp_path, "default-optuna_tpe")
    first = study.get_trials()
    assert [t.number for t in first] == [0, 1]
    assert all(t.state == TrialState.COMPLETE for t in first)
    for trial in first:
        # the searched groups and continuous keys are Optuna params; keys fixed on the CLI are not
        assert {"norm", "activation", "loss", "optimizer", "scheduler", "optimizer.lr",
                "optimizer.weight_decay", "model.dropout"} <= set(trial.params)
        assert "model" not in trial.params and "batch_size" not in trial.params
        summary = summary_of(trial)
        assert trial.user_attrs["status"] == summary["status"]
        # the objective is the validation error the run returned, never a test metric
        assert trial.value == pytest.approx(summary["objective"])
        if summary["status"] == "completed":
            assert trial.value == pytest.approx(1.0 - summary["metrics"]["val/best_acc"])
        assert summary["choices"]["norm"] == trial.params["norm"]

    # Same command, a larger study-wide budget: the same study continues (no new study, no rerun).
    proc = run_train([*args, "hydra.sweeper.n_trials=3"], tmp_path)
    assert "2 of 3 trials already there" in proc.stderr + proc.stdout
    study = load_study(tmp_path, "default-optuna_tpe")
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    assert [(t.params, t.value) for t in trials[:2]] == [(t.params, t.value) for t in first]
    assert len(optuna.get_all_study_names(f"sqlite:///{tmp_path}/multirun/default/optuna.db")) == 1
    results = (tmp_path / "multirun" / "default" / "optimization_results.yaml").read_text()
    assert "best_params" in results and "default-optuna_tpe" in results


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["worst", "fail"])
def test_grid_sweep_survives_failing_and_diverging_runs(tmp_path, strategy):
    """A 2 x 2 grid where half the runs raise (an injected fault) and one diverges (lr 1e9): the sweep
    finishes, the study holds the 4 grid points once each, failures told per hydra.sweeper.failure."""
    proc = run_train(["-m", "search=optuna_grid", f"hydra.sweeper.failure={strategy}",
                      "optimizer.lr=choice(0.003,1e9)", "+trainer.fault=choice(none,raise)",
                      *FIXED, "optimizer=adam", *FAST], tmp_path)
    assert proc.returncode == 0
    study = load_study(tmp_path, "default-optuna_grid")
    trials = study.get_trials()
    points = {(t.params["optimizer.lr"], t.params["+trainer.fault"]) for t in trials}
    assert len(trials) == 4 and points == {(0.003, "none"), (0.003, "raise"), (1e9, "none"), (1e9, "raise")}
    by_point = {(t.params["optimizer.lr"], t.params["+trainer.fault"]): t for t in trials}
    good = by_point[(0.003, "none")]
    assert good.state == TrialState.COMPLETE and good.user_attrs["status"] == "completed" and good.value < 1.0
    assert by_point[(1e9, "none")].user_attrs["status"] == "diverged"
    for point in [(0.003, "raise"), (1e9, "raise")]:
        assert by_point[point].user_attrs["status"] == "failed"
        assert "fault" in by_point[point].user_attrs["error"]
        assert summary_of(by_point[point])["status"] == "failed"
    for trial in trials:
        if trial is good:
            continue
        if strategy == "worst":
            assert trial.state == TrialState.COMPLETE and trial.value == 1.0
        else:
            assert trial.state == TrialState.FAIL and trial.system_attrs[COUNTED_FAILURE_ATTR]


@pytest.mark.slow
def test_median_pruner_stops_a_clearly_worse_trial(tmp_path):
    """Two trials in a fixed order (enqueued): a learning one (Adam lr 3e-3), then one that cannot
    learn (lr 1e-4). With the median pruner the second stops after its first epoch: PRUNED in the
    study, `pruned` in its run record, fewer epochs than configured."""
    db = tmp_path / "multirun" / "default" / "optuna.db"
    db.parent.mkdir(parents=True)
    study = optuna.create_study(study_name="default-optuna_tpe", storage=f"sqlite:///{db}")
    study.enqueue_trial({"optimizer.lr": 0.003})
    study.enqueue_trial({"optimizer.lr": 0.0001})
    run_train(["-m", "search=optuna_tpe", "hydra.sweeper.n_trials=2", "hydra/sweeper/pruner=median",
               "hydra.sweeper.pruner.n_startup_trials=1", *FIXED, "optimizer=adam", "data.augment=false",
               *FAST, "trainer.epochs=3", "trainer.max_steps_per_epoch=8"], tmp_path)
    good, bad = load_study(tmp_path, "default-optuna_tpe").get_trials()
    assert good.params["optimizer.lr"] == 0.003 and bad.params["optimizer.lr"] == 0.0001
    assert good.state == TrialState.COMPLETE and sorted(good.intermediate_values) == [1, 2, 3]
    assert bad.state == TrialState.PRUNED, (good.intermediate_values, bad.intermediate_values)
    assert bad.user_attrs["status"] == "pruned" and len(bad.intermediate_values) < 3
    assert bad.intermediate_values[1] > good.intermediate_values[1]
    summary = summary_of(bad)
    assert summary["status"] == "pruned" and summary["epochs_done"] < 3


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_unreachable_storage_fails_in_one_line_with_the_password_masked(tmp_path):
    port = closed_port()
    url = f"postgresql://bench:hunter2-pw@127.0.0.1:{port}/studies"
    proc = run_train(["-m", "search=optuna_tpe", f"hydra.sweeper.storage={url}", *FAST], tmp_path,
                     check=False)
    assert proc.returncode == 2
    out = proc.stdout + proc.stderr
    assert "hunter2-pw" not in out
    lines = [line for line in proc.stderr.splitlines() if line.startswith("normbench:")]
    expected = (f"normbench: cannot open the Optuna storage postgresql://bench:***@127.0.0.1:{port}/studies: "
                f"connection to server at \"127.0.0.1\", port {port} failed: Connection refused")
    assert lines == [expected], proc.stderr
    assert "Traceback" not in out
    # nothing trained: no job dir under the sweep dir
    sweep = tmp_path / "multirun" / "default"
    assert not sweep.exists() or not any(p.is_dir() for p in sweep.iterdir())


# --------------------------------------------------------------------------------------------------
# Configs


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF)):
        return hydra_compose("config", overrides=overrides, return_hydra_config=True)


def test_unknown_search_or_pruner_lists_the_available_ones():
    with pytest.raises(Exception) as err:
        compose(["search=optuna_nope"])
    message = str(err.value)
    assert "optuna_nope" in message
    assert all(name in message for name in ("optuna_tpe", "optuna_grid", "optuna_random"))
    with pytest.raises(Exception) as err:
        compose(["search=optuna_tpe", "hydra/sweeper/pruner=nope"])
    assert all(name in str(err.value) for name in ("none", "median", "hyperband"))


def test_search_configs_cover_every_group():
    groups = ("model", "norm", "activation", "loss", "optimizer", "scheduler")
    tpe = compose(["search=optuna_tpe"]).hydra.sweeper
    grid = compose(["search=optuna_grid"]).hydra.sweeper
    assert tpe._target_.endswith("NormbenchOptunaSweeper") and tpe.direction == "minimize"
    assert tpe.sampler._target_ == "optuna.samplers.TPESampler"
    assert grid.sampler._target_ == "optuna.samplers.GridSampler" and grid.n_trials is None
    assert tpe.study_name == "default-optuna_tpe" and tpe.pruner._target_ == "optuna.pruners.NopPruner"
    size = 1
    for group in (*groups, "batch_size"):
        for params in (tpe.params, grid.params):
            assert params[group].startswith("choice(")
        if group != "batch_size":  # every option of the group is searched
            options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
            assert sorted(grid.params[group][len("choice("):-1].replace(" ", "").split(",")) == options
        size *= len(grid.params[group].split(","))
    assert size == 86_400  # the grid size documented in conf/search/optuna_grid.yaml and docs/optuna.md
    assert tpe.params["optimizer.lr"].startswith("tag(log")
    assert {"optimizer.weight_decay", "model.dropout"} <= set(tpe.params)
    median = compose(["search=optuna_tpe", "hydra/sweeper/pruner=median"]).hydra.sweeper.pruner
    assert median._target_ == "optuna.pruners.MedianPruner"


def test_plugin_is_discovered_from_the_source_tree():
    from hydra.core.plugins import Plugins
    from hydra.plugins.sweeper import Sweeper

    names = [f"{p.__module__}.{p.__name__}" for p in Plugins.instance().discover(Sweeper)]
    assert "hydra_plugins.normbench_optuna_sweeper.normbench_optuna_sweeper.NormbenchOptunaSweeper" in names


# --------------------------------------------------------------------------------------------------
# Bookkeeping, in process


def simulate(strategy: str, seed: int, n_trials: int = 40, startup: int = 10) -> float:
    """TPE over {norm: 4 choices, lr}; norm=broken always fails. The share of trials after the
    startup phase that still pick the broken choice (uniform sampling: 0.25)."""
    choices = ["bn", "gn", "ln", "broken"]
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup))
    rng = random.Random(seed)
    picks = []
    for _ in range(n_trials):
        trial = study.ask()
        norm = trial.suggest_categorical("norm", choices)
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        picks.append(norm)
        if norm == "broken":
            outcome = Outcome("failed", None, "RuntimeError: boom")
        else:
            error = 0.2 + 0.05 * choices.index(norm) + 0.1 * abs(math.log10(lr) + 2) + rng.uniform(0, 0.05)
            outcome = Outcome("completed", error)
        tell_outcome(study, trial, outcome, strategy, worst_value=1.0)
    return sum(p == "broken" for p in picks[startup:]) / (n_trials - startup)


def test_worst_value_teaches_tpe_to_avoid_failures_and_fail_state_does_not():
    worst = [simulate("worst", seed) for seed in range(3)]
    fail = [simulate("fail", seed) for seed in range(3)]
    mean_worst, mean_fail = sum(worst) / 3, sum(fail) / 3
    # Told the worst value, TPE samples the failing choice less than uniformly; told FAIL, it never
    # learns anything about it and, as an unexplored choice, keeps sampling it (more than uniformly).
    assert mean_worst < 0.25, worst
    assert mean_fail > 0.4 and mean_fail > mean_worst + 0.2, (worst, fail)


@pytest.mark.slow
def test_stale_trials_of_a_dead_worker_are_requeued_not_counted(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    storage = open_storage(url, StorageSettings(heartbeat_interval=1, grace_period=1, max_retry=3))
    study = optuna.create_study(study_name="s", storage=storage)
    with quiet_optuna():
        done, dead = study.ask(), study.ask()  # `dead`: a worker asked, beat once, and died
    study.tell(done, 0.5)
    storage.record_heartbeat(dead._trial_id)
    assert trials_used(study) == 2 and trials_to_ask(study, 3) == 1
    time.sleep(2.5)
    with quiet_optuna():
        optuna.storages.fail_stale_trials(study)
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    # the dead trial is replaced by its WAITING copy: still 2 used, and the copy has to run
    assert trials_used(study) == 2 and trials_to_ask(study, 2) == 1 and trials_to_ask(study, 3) == 2
    with quiet_optuna():
        retry = study.ask()
    assert retry.number == 2 and study.get_trials()[2].system_attrs["failed_trial"] == 1


def test_password_masking():
    url = "postgresql://bench:p%40ss-w0rd@db.example:5432/studies?sslmode=require"
    assert mask_passwords(url) == "postgresql://bench:***@db.example:5432/studies?sslmode=require"
    assert set(url_secrets(url)) >= {"p%40ss-w0rd", "p@ss-w0rd"}
    assert mask_passwords("postgresql://h/db?user=u&password=x1y2") == "postgresql://h/db?user=u&password=***"
    assert mask_passwords("sqlite:////tmp/a.db") == "sqlite:////tmp/a.db"
    assert url_secrets("sqlite:///a.db") == []


def test_a_password_in_the_query_is_masked_too():
    url = ("postgresql://bench:u%3Ainfo@db.example/studies?sslmode=require&password=p%40ss%2Fw0rd"
           "&application_name=nb")
    assert mask_passwords(url) == ("postgresql://bench:***@db.example/studies?sslmode=require&password=***"
                             "&application_name=nb")
    secrets = url_secrets(url)
    assert {"u%3Ainfo", "u:info", "p%40ss%2Fw0rd", "p@ss/w0rd"} <= set(secrets)
    text = mask_passwords(f"could not connect to {url} (password p@ss/w0rd)", secrets)
    assert "w0rd" not in text and "info" not in text
    assert mask_passwords("postgresql://h/db?PWD=x1y2&passwd=z") == "postgresql://h/db?PWD=***&passwd=***"


HOLD = """
import sys, time
from hydra_plugins.normbench_optuna_sweeper._study import storage_lock
url, log, name = sys.argv[1:]
print("ready", flush=True)
sys.stdin.readline()
with storage_lock(url, "normbench:study:s"):
    with open(log, "a") as f:
        f.write(f"start {name} {time.monotonic()}\\n")
    time.sleep(1.0)
    with open(log, "a") as f:
        f.write(f"end {name} {time.monotonic()}\\n")
"""


@pytest.mark.slow
def test_sqlite_storage_lock_serialises_two_processes(tmp_path):
    """Two sweeper processes on one SQLite study: the storage lock (a filelock on <db>.lock) lets one
    count-and-ask at a time."""
    import subprocess
    import sys

    url, log = f"sqlite:///{tmp_path / 'optuna.db'}", tmp_path / "log"
    procs = [subprocess.Popen([sys.executable, "-c", HOLD, url, str(log), name], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for name in ("a", "b")]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    for proc in procs:  # both ask for the lock at (nearly) the same time
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in procs:
        assert proc.wait(60) == 0
    events = [line.split() for line in log.read_text().splitlines()]
    assert [e[0] for e in events] == ["start", "end", "start", "end"], events
    assert events[0][1] == events[1][1] and events[2][1] == events[3][1] != events[0][1]
    assert float(events[2][2]) >= float(events[1][2])  # the second started after the first ended
    assert (tmp_path / "optuna.db.lock").exists()
