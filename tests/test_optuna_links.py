"""normbench's Optuna searches, read back with Optuna's API: named objectives (two of them), the links
between the study and its runs (metric names, study and trial user attributes), and trials that fail
their config check (counted in the sweep's closing line, listed by the report with the reason)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import optuna
import pytest
from conftest import ROOT, TINY, run_train
from optuna.trial import TrialState

from normbench.report.records import scan

optuna.logging.set_verbosity(optuna.logging.WARNING)

FAST = [*TINY, "model=vgg_a_light"]
FIXED = ["norm=bn", "activation=relu", "loss=ce", "scheduler=constant", "optimizer=adam",
         "optimizer.weight_decay=0", "model.dropout=0", "optimizer.lr=0.003"]


def load_study(cwd: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name,
                             storage=f"sqlite:///{cwd / 'multirun' / 'default' / 'optuna.db'}")


def summary_of(trial) -> dict:
    return json.loads((Path(trial.user_attrs["run_dir"]) / "summary.json").read_text())


@pytest.mark.slow
def test_two_objective_study_links_both_ways(tmp_path, wandb_env):
    """val/error and model/params as two objectives: exactly n_trials COMPLETE trials with both values
    taken from each run's record, the study's metric names and user attributes, each trial's test
    accuracy (and W&B run id when the record has one)."""
    run_train(["-m", "search=optuna_random", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.seed=1",
               "hydra.sweeper.objectives=[val/error,model/params]",
               "hydra.sweeper.direction=[minimize,minimize]",
               *FIXED, *FAST, "model.width=choice(0.125,0.25)"], tmp_path)
    study = load_study(tmp_path, "default-optuna_random")
    assert study.metric_names == ["val/error", "model/params"]
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    trials = study.get_trials()
    assert len(trials) == 2 and all(t.state == TrialState.COMPLETE for t in trials)
    for trial in trials:
        summary = summary_of(trial)
        metrics = summary["metrics"]
        assert trial.values == [1.0 - metrics["val/best_acc"], metrics["model/params"]]
        assert trial.user_attrs["test_acc"] == metrics["test/acc"]
        if summary.get("wandb_run_id"):  # the W&B run id, once the record carries it
            assert trial.user_attrs["wandb_run_id"] == summary["wandb_run_id"]
    attrs = study.user_attrs
    assert "search=optuna_random" in attrs["command"] and "hydra.sweeper.objectives" in attrs["command"]
    assert attrs["search_space"]["norm"] == "bn"
    assert attrs["search_space"]["model.width"] == "choice(0.125,0.25)"
    assert attrs["search_space"]["optimizer.lr"] == "0.003"  # fixed on the command line
    assert attrs["wandb_group"] == "default" and attrs["wandb_project"] == "normbench"
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=False)
    if head.returncode == 0:
        assert attrs["git_revision"].startswith(head.stdout.strip())
    results = (tmp_path / "multirun" / "default" / "optimization_results.yaml").read_text()
    assert "solutions:" in results


@pytest.mark.slow
def test_failed_config_checks_are_counted_and_reported(tmp_path):
    """A grid where one point fails its config check (norm.groups=5 divides no layer): Optuna is told
    val/error's worst value 1.0, the closing line counts it as failed, and the report lists its job dir
    among the skipped records with the reason. An objective that is no normbench metric stops the sweep
    in one line."""
    proc = run_train(["-m", "search=optuna_grid", "norm=gn", "norm.groups=choice(4,5)", "logger=none",
                      *FIXED[1:], *FAST], tmp_path)
    out = proc.stdout + proc.stderr
    assert ("sweep multirun/default: 1 completed / 0 diverged / 1 failed / 0 pruned / 0 skipped"
            in out), out[-3000:]
    by_groups = {t.params["norm.groups"]: t for t in load_study(tmp_path, "default-optuna_grid").get_trials()}
    bad = by_groups[5]
    assert bad.state == TrialState.COMPLETE and bad.value == 1.0 and bad.user_attrs["status"] == "failed"
    assert "norm.groups" in bad.user_attrs["error"]
    assert by_groups[4].user_attrs["status"] == "completed" and by_groups[4].value < 1.0
    result = scan([tmp_path / "multirun" / "default"])
    assert len(result.runs) == 1
    rejected = [s for s in result.skipped if s.kind == "rejected"]
    assert len(rejected) == 1 and "norm.groups=5" in rejected[0].reason
    assert Path(rejected[0].path) == Path(bad.user_attrs["run_dir"]).resolve()

    proc = run_train(["-m", "search=optuna_tpe", "hydra.sweeper.objectives=[test/acc]",
                      "hydra.sweeper.direction=maximize",
                      "experiment_name=objectives", "logger=none", *FIXED, *FAST], tmp_path, check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("normbench:")]
    assert lines and "hydra.sweeper.objectives" in lines[-1] and "test set" in lines[-1], proc.stderr[-2000:]
    study = optuna.load_study(study_name="objectives-optuna_tpe",
                              storage=f"sqlite:///{tmp_path / 'multirun' / 'objectives' / 'optuna.db'}")
    assert len(study.get_trials()) == 1  # stopped after the first trial told it so
