"""Early stopping, best.pt and trainer.test_on: a run whose validation accuracy cannot improve stops after
`patience` epochs and says so; best.pt holds the best validation epoch's weights (re-evaluated here), also
after a run killed at its best epoch resumes; test_on=best tests those weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONF, TINY, TRAIN
from hydra import compose, initialize_config_dir

from normbench.job import run_job
from normbench.record import Status
from normbench.run import build_parts
from normbench.trainer import LoopSettings, LoopState
from normbench.validate import validate

BASE = [*TINY, "logger=none"]
STILL = ["norm=none", "optimizer.lr=1e-12"]  # the weights barely move: validation accuracy cannot improve
# Measured on this config (CPU, one thread, deterministic): validation accuracy 0.133, 0.102, 0.195, 0.164,
# 0.141 over epochs 1-5 -- best at epoch 3, then two epochs without improvement.
LEARNS = ["optimizer=adam", "optimizer.lr=0.01"]


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF)):
        return compose(config_name="config", overrides=overrides)


def read(run_dir: Path) -> tuple[dict, list[dict]]:
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary, [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def evaluate_best(cfg, run_dir: Path) -> tuple[dict, float, float]:
    """best.pt's payload and its weights' validation and test accuracy, evaluated afresh."""
    best = torch.load(run_dir / "best.pt", weights_only=True)
    parts = build_parts(cfg, validate(cfg))
    parts.model.load_state_dict(best["model"])
    return best, parts.trainer.evaluate(parts.data.val)[1], parts.trainer.evaluate(parts.data.test)[1]


def test_early_stopping_stops_a_run_that_does_not_improve_and_records_why(tmp_path):
    run_job(compose_cfg([*BASE, *STILL, "trainer.epochs=8", "trainer.early_stopping.patience=2"]),
            output_dir=tmp_path)
    summary, rows = read(tmp_path)
    assert summary["status"] == "completed" and summary["epochs_done"] == 3
    stop = summary["stop_reason"], summary["stopped_epoch"], summary["best_epoch"]
    assert stop == ("early_stopping", 3, 1)
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert summary["test_on"] == "last" and summary["tested_epoch"] == 3


def test_early_stopping_is_off_by_default(tmp_path):
    run_job(compose_cfg([*BASE, *STILL, "trainer.epochs=4"]), output_dir=tmp_path)
    summary, rows = read(tmp_path)
    assert summary["epochs_done"] == 4 and len(rows) == 4
    assert summary["stop_reason"] is None and summary["stopped_epoch"] is None


def test_min_delta_counts_only_larger_improvements():
    state = LoopState(history=[{"epoch": e + 1, "val/acc": a} for e, a in enumerate([0.5, 0.55, 0.56, 0.57])])
    assert not state.stop_early(LoopSettings(epochs=9, patience=2, min_delta=0.0))
    assert state.status == Status.RUNNING
    assert state.stop_early(LoopSettings(epochs=9, patience=2, min_delta=0.02))  # 0.56, 0.57: < 0.55 + 0.02
    assert (state.status, state.stop_reason) == (Status.COMPLETED, "early_stopping")
    assert not LoopState(history=state.history).stop_early(LoopSettings(epochs=9, patience=0, min_delta=0.02))


def test_best_pt_holds_the_best_epoch_and_test_on_best_tests_it(tmp_path):
    cfg = compose_cfg([*BASE, *LEARNS, "trainer.epochs=5", "trainer.test_on=best"])
    run_job(cfg, output_dir=tmp_path)
    summary, rows = read(tmp_path)
    accuracies = [row["val/acc"] for row in rows]
    best_epoch = accuracies.index(max(accuracies)) + 1
    assert best_epoch < 5, "the config no longer has a best epoch before the last: pick another"
    best, val_acc, test_acc = evaluate_best(cfg, tmp_path)
    assert best["epoch"] == summary["best_epoch"] == summary["tested_epoch"] == best_epoch
    assert val_acc == pytest.approx(max(accuracies)) == pytest.approx(summary["metrics"]["val/best_acc"])
    assert test_acc == pytest.approx(summary["metrics"]["test/acc"]) and summary["test_on"] == "best"
    last = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]  # the last epoch's weights
    assert any(not torch.equal(last[k], best["model"][k]) for k in last)


@pytest.mark.slow
def test_a_run_killed_at_its_best_epoch_resumes_to_the_same_stop_and_best_pt(tmp_path):
    """Killed (SIGKILL) right after its best epoch's checkpoint, before best.pt: the resumed run writes
    best.pt from that checkpoint, counts patience on from the record, and ends as the uninterrupted run."""
    overrides = [*BASE, *LEARNS, "trainer.epochs=8", "trainer.early_stopping.patience=2",
                 "trainer.test_on=best"]
    run_job(compose_cfg(overrides), output_dir=tmp_path / "whole")
    whole, whole_rows = read(tmp_path / "whole")
    assert (whole["stop_reason"], whole["stopped_epoch"], whole["best_epoch"]) == ("early_stopping", 5, 3)

    sweep = ["-m", *overrides, "hydra.sweep.dir=multirun", "hydra.sweep.subdir=run"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NORMBENCH_KILL_AT": "checkpoint_saved@3"}
    killed = subprocess.run([sys.executable, str(TRAIN), *sweep], cwd=tmp_path, env=env, timeout=300,
                            capture_output=True, text=True, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_dir = tmp_path / "multirun" / "run"
    assert read(run_dir)[0]["status"] == "running"
    assert torch.load(run_dir / "best.pt", weights_only=True)["epoch"] == 1  # epoch 3's not written yet
    del env["NORMBENCH_KILL_AT"]
    again = subprocess.run([sys.executable, str(TRAIN), *sweep], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed, rows = read(run_dir)
    assert resumed["resumed_from_epoch"] == 3 and resumed["status"] == "completed"
    for key in ("stop_reason", "stopped_epoch", "best_epoch", "tested_epoch", "epochs_done"):
        assert resumed[key] == whole[key], key
    assert resumed["metrics"]["test/acc"] == pytest.approx(whole["metrics"]["test/acc"])
    assert [r["val/acc"] for r in rows] == pytest.approx([r["val/acc"] for r in whole_rows])
    best, whole_best = (torch.load(d / "best.pt", weights_only=True) for d in (run_dir, tmp_path / "whole"))
    assert best["epoch"] == whole_best["epoch"] == 3
    assert all(torch.equal(best["model"][k], v) for k, v in whole_best["model"].items())
