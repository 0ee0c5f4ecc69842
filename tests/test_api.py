"""The notebook API (normbench.train, normbench.load_runs, docs/api.md), the table and results.csv at the end
of a multirun (docs/sweeps.md), and what a first user met on the way: a short search's step schedule, the
single run's interrupt hint, the data dir the record names, --help, the progress bar, the Optuna trials'
attributes. Real runs: tiny synthetic ones (conftest.TINY), real Fashion-MNIST where the test is about it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from conftest import CONF, TINY, TRAIN, run_train

import normbench
from normbench.errors import NormbenchError

QUICK = [*TINY, "logger=none"]
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def test_import_normbench_loads_neither_torch_nor_hydra_nor_pandas():
    code = "import normbench, sys; print(sorted({'torch', 'hydra', 'pandas'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_train_returns_the_record_its_summary_and_the_epochs_as_a_dataframe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = normbench.train([*QUICK, "norm=gn", "trainer.epochs=2"])
    assert result.run_dir.parent == tmp_path / "outputs" / "default"  # bench/train.py's single-run dir
    assert result.summary == json.loads((result.run_dir / "summary.json").read_text())
    assert result.summary["status"] == "completed" and result.summary["choices"]["norm"] == "gn"
    assert result.summary["overrides"] == [*QUICK, "norm=gn", "trainer.epochs=2"]
    assert isinstance(result.metrics, pd.DataFrame) and list(result.metrics["epoch"]) == [1, 2]
    assert result.metrics["val/acc"].iloc[-1] == result.summary["metrics"]["val/acc"]

    other = normbench.train([*QUICK, "norm=none"])  # the same second: its own dir all the same
    assert other.run_dir != result.run_dir and other.summary["choices"]["norm"] == "none"
    runs = normbench.load_runs(tmp_path / "outputs").set_index("norm")
    assert len(runs) == 2 and runs.loc["gn", "identity"] == result.summary["identity"]
    assert runs.loc["gn", "seedless_identity"] == result.summary["seedless_identity"]
    assert runs.loc["gn", "steps"] == 8 and runs.loc["none", "steps"] == 4  # 4 steps an epoch
    assert runs.loc["gn", "test/acc"] == result.summary["metrics"]["test/acc"]
    assert Path(runs.loc["none", "dir"]) == other.run_dir and runs.loc["gn", "model"] == "vgg_a"


def test_train_refuses_bad_input_with_one_error_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NormbenchError, match="bad value optimizer.lr=-1"):
        normbench.train([*QUICK, "optimizer.lr=-1"])
    # nothing but, as for bench/train.py's single run, the job's .hydra/ metadata
    assert [path for path in tmp_path.rglob("*") if not path.is_dir() and ".hydra" not in path.parts] == []


def _table_rows(stdout: str, first_column_values: set[str]) -> list[list[str]]:
    return [[c.strip() for c in line.strip("│ ").split("│")] for line in stdout.splitlines()
            if line.startswith("│") and line.strip("│ ").split("│")[0].strip() in first_column_values]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [[], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]],
                         ids=["basic", "joblib"])
def test_a_multirun_ends_with_its_results_table_and_results_csv(launcher, tmp_path):
    args = ["-m", *QUICK, *launcher, "norm=bn,none", "optimizer.lr=0.01,0.1,-1"]
    proc = run_train(args, tmp_path)
    sweep = tmp_path / "multirun" / "default"
    results = pd.read_csv(sweep / "results.csv")
    assert list(results.columns[:2]) == ["norm", "optimizer.lr"]
    assert {"status", "objective", "test/acc", "steps", "time/total_s", "dir"} <= set(results.columns)
    assert len(results) == 6 and (results["status"] == "failed").sum() == 2  # lr -1: refused, recorded
    done = results[results["status"] == "completed"]
    assert list(done["objective"]) == sorted(done["objective"]) and (done["steps"] == 4).all()
    assert results["objective"].isna().tolist() == [False] * 4 + [True] * 2  # failed ones last

    runs = normbench.load_runs(sweep)  # the table's one source of rows
    for row in done.to_dict("records"):
        run = runs[runs["dir"] == row["dir"]].iloc[0]
        assert [run[key] for key in ("norm", "objective", "test/acc")] == [row["norm"], row["objective"],
                                                                           row["test/acc"]]
    table = _table_rows(proc.stdout, {"bn", "none"})
    assert [r[:2] for r in table] == [[norm, f"{lr:.4g}"] for norm, lr in zip(results["norm"],
                                                                               results["optimizer.lr"])]
    assert [r[2] for r in table] == list(results["status"])
    assert proc.stdout.index("6 runs in multirun/default") < proc.stdout.index("sweep multirun/default: ")

    again = run_train(args, tmp_path)  # all skipped: the same table again
    assert _table_rows(again.stdout, {"bn", "none"}) == table


@pytest.mark.slow
def test_an_optuna_search_of_short_runs_trains_step_schedules_and_labels_its_trials(tmp_path):
    """scheduler=step in a 3-epoch search trains (its period defaults to a third of the run); each trial's
    user attributes are its own (status, test accuracy, record dir), the fixed overrides are the study's."""
    fixed = [*QUICK, "model=vgg_a_light", "norm=bn", "activation=relu", "loss=ce", "optimizer.weight_decay=0",
             "model.dropout=0", "trainer.epochs=3"]
    search = ["search=optuna_random", "hydra.sweeper.sampler.seed=0", "hydra.sweeper.n_trials=3"]
    proc = run_train(["-m", *search, *fixed, "scheduler=choice(step,cosine)"], tmp_path)
    sweep = tmp_path / "multirun" / "default"
    study = optuna.load_study(study_name="default-optuna_random", storage=f"sqlite:///{sweep / 'optuna.db'}")
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert "step" in {t.params["scheduler"] for t in trials}
    for trial in trials:
        summary = json.loads((Path(trial.user_attrs["run_dir"]) / "summary.json").read_text())
        assert set(trial.user_attrs) == {"status", "test_acc", "run_dir"}  # W&B off: no run id
        assert trial.user_attrs["status"] == summary["status"] == "completed"
        assert trial.user_attrs["test_acc"] == summary["metrics"]["test/acc"]
        assert trial.value == pytest.approx(summary["objective"])
    assert study.user_attrs["fixed_overrides"] == ["search=optuna_random", *fixed]
    results = pd.read_csv(sweep / "results.csv")
    assert list(results.columns[:3]) == ["optimizer", "scheduler", "optimizer.lr"] and len(results) == 3
    assert list(results["objective"]) == sorted(t.value for t in trials)
    assert "3 runs in multirun/default" in proc.stdout


def test_the_step_schedule_decays_every_third_of_a_run_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = normbench.train([*QUICK, "scheduler=step", "trainer.epochs=3", "optimizer.lr=0.1"])
    assert result.summary["status"] == "completed"
    assert list(result.metrics["lr"]) == pytest.approx([0.01, 0.001, 0.0001])  # each epoch's last step's lr


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_the_record_names_the_data_dir_really_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data.root=./data holds nothing: the files come from Debian's dir
    monkeypatch.delenv("NORMBENCH_DATA", raising=False)
    result = normbench.train(["data=fashion_mnist", "+debug=quick", "logger=none", "data.train_size=256"])
    assert result.summary["data_dir"] == str(DEBIAN_FASHION_MNIST)
    assert "root: ./data" in (result.run_dir / "config.yaml").read_text()


def test_help_lists_the_config_groups_and_their_options_one_line_each():
    proc = subprocess.run([sys.executable, str(TRAIN), "--help"], capture_output=True, text=True, timeout=120,
                          check=True)
    lines = {line.strip().split(":")[0]: line.strip() for line in proc.stdout.splitlines() if ": " in line}
    groups = {p.name for p in CONF.iterdir() if p.is_dir()} - {"hydra", "vgg_best_row"}
    for group in groups:
        options = sorted(f.stem for f in (CONF / group).glob("*.yaml"))
        assert lines[group] == f"{group}: {', '.join(options)}", group
    assert "schema" not in lines and "vgg_best_row" not in lines and "experiment/base" not in lines
    assert not any(key.startswith("hydra/") for key in lines)
    assert "batch_size=128" in proc.stdout and "--shell-completion" in proc.stdout


def test_the_progress_bar_counts_every_step(capsys):
    """Between two reads of the losses (log_every_steps) the bar still moves: an ETA from the first step."""
    from hydra import compose, initialize_config_dir

    from normbench.identity import register_resolvers
    from normbench.run import build_parts
    from normbench.trainer import LoopState
    from normbench.validate import validate

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF)):
        cfg = compose(config_name="config", overrides=[*QUICK, "trainer.log_every_steps=25"])
    parts = build_parts(cfg, validate(cfg, device="cpu"))
    parts.trainer.settings.progress = True
    criterion = parts.trainer.criterion

    def slow_criterion(*args):  # steps slower than tqdm's 0.1 s between redraws
        time.sleep(0.15)
        return criterion(*args)

    parts.trainer.criterion = slow_criterion
    parts.trainer.train_steps(1, LoopState(), 4)
    shown = capsys.readouterr().err
    assert "1/4" in shown and "3/4" in shown, shown


@pytest.mark.slow
def test_an_interrupted_single_run_says_how_to_continue_it_and_that_does(tmp_path):
    release = tmp_path / "release"
    args = [*QUICK, "trainer.epochs=2", "+trainer.fault=wait", "+trainer.fault_epoch=2",
            f"+trainer.fault_file={release}"]
    proc = subprocess.Popen([sys.executable, str(TRAIN), *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not Path(f"{release}.waiting").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    (run_dir,) = (tmp_path / "outputs" / "default").iterdir()
    hint = f"run the same command with hydra.run.dir={run_dir} to continue"
    assert proc.returncode == 130 and err.splitlines()[-1] == f"normbench: interrupted by SIGINT; {hint}"
    assert f"{hint} it" in err
    release.touch()  # the fault lets the continued run through
    again = run_train([*args, f"hydra.run.dir={run_dir}"], tmp_path)
    assert "resuming" in again.stdout and "from its epoch-1 checkpoint" in again.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_epoch"] == 1
