"""The two README commands end to end, as a user runs them, with W&B offline and read back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import TINY, run_train, wandb_inspect

from normbench.record import learned_threshold

WANDB_TINY = [o for o in TINY]  # logger stays at its default: wandb (offline: no credentials)


def _records(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("summary.json"))


def _wandb_history(run_dir: Path) -> list[dict]:
    import subprocess
    import sys

    wandb_bin = Path(sys.executable).parent / "wandb"
    proc = subprocess.run([str(wandb_bin), "leet", "inspect", "--json", str(run_dir)], capture_output=True,
                          text=True, timeout=120, check=True)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return [r["history"]["item"] for r in records if r.get("type") == "history"]


@pytest.mark.slow
def test_single_run_trains_and_records(tmp_path, wandb_env):
    proc = run_train(["model=vgg_a", "norm=bn", "loss=focal", *WANDB_TINY, "trainer.epochs=2"], tmp_path)
    assert "model" in proc.stdout and "norm" in proc.stdout  # the config tree is printed
    runs = _records(tmp_path / "outputs")
    assert len(runs) == 1
    run = runs[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["choices"]["model"] == "vgg_a" and summary["choices"]["norm"] == "bn"
    assert summary["choices"]["loss"] == "focal"
    for key in ("test/loss", "test/acc", "val/best_acc", "model/params", "memory/peak_mb", "memory/data_mb",
                "time/total_s"):
        assert summary["metrics"][key] is not None, key
    # four tiny steps may not learn: then there is no convergence epoch (normbench.record.learned_threshold)
    learned = summary["metrics"]["val/best_acc"] > learned_threshold(10, 128)
    assert (summary["metrics"]["convergence/epoch"] is not None) == learned
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert set(epochs[0]) >= {"train/loss", "train/acc", "val/loss", "val/acc", "time/epoch_s",
                              "throughput/img_s"}
    config = yaml.safe_load((run / "config.yaml").read_text())
    # the record holds the complete loss settings: the schema's defaults with the option's gamma
    assert config["loss"] == {"name": "focal", "gamma": 2.0, "l1": 0.0, "l2": 0.0, "smoothing": 0.0}
    assert (run / "filters.png").stat().st_size > 0

    wandb_runs = list(run.glob("wandb/offline-run-*"))
    assert len(wandb_runs) == 1
    recorded = wandb_inspect(wandb_runs[0])
    assert recorded["state"] == "finished" and recorded["exit_code"] == 0
    assert recorded["project"] == "normbench"
    assert recorded["config"]["choices"]["loss"] == "focal"
    assert recorded["config"]["loss"]["gamma"] == 2
    assert {"model:vgg_a", "norm:bn", "loss:focal"} <= set(recorded["tags"])
    assert recorded["summary"]["test/acc"] == summary["metrics"]["test/acc"]
    assert recorded["summary"]["filters"]["_type"] == "image-file"


@pytest.mark.slow
def test_multirun_grid_records_every_job(tmp_path, wandb_env):
    tiny = [o for o in WANDB_TINY if not o.startswith("batch_size")]
    # a 3 x 2 grid: every job of a two-key cross product, a one- and a two-digit batch size in the names
    run_train(["-m", "norm=bn,ln,gn", "batch_size=8,64", *tiny], tmp_path, timeout=900)
    sweep = tmp_path / "multirun" / "default"
    runs = _records(sweep)
    assert len(runs) == 6
    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    assert all(s["status"] == "completed" for s in summaries)
    assert len({s["identity"] for s in summaries}) == 6
    grid = {(s["choices"]["norm"], s["choices"]["batch_size"]) for s in summaries}
    assert grid == {(n, b) for n in ("bn", "ln", "gn") for b in (8, 64)}
    configs = {(r / "config.yaml").read_text() for r in runs}
    assert len(configs) == 6

    for run, summary in zip(runs, summaries):
        wandb_runs = list(run.glob("wandb/offline-run-*"))
        assert len(wandb_runs) == 1, run  # one W&B run per job
        recorded = wandb_inspect(wandb_runs[0])
        assert recorded["state"] == "finished"
        assert recorded["config"]["norm"]["name"] == summary["choices"]["norm"]
        assert recorded["config"]["batch_size"] == summary["choices"]["batch_size"]
        assert recorded["config"]["choices"]["norm"] == summary["choices"]["norm"]
        assert f"norm:{summary['choices']['norm']}" in recorded["tags"]
        assert recorded["summary"]["val/best_acc"] == summary["metrics"]["val/best_acc"]
        assert recorded["summary"]["status"] == "completed"
        # named after the swept values first (norm, batch_size), short
        swept = f"norm={summary['choices']['norm']},batch_size={summary['choices']['batch_size']},"
        assert run.name.startswith(swept) and len(run.name) <= 80, run.name
        assert recorded["name"].startswith(swept) and len(recorded["name"]) <= 60, recorded["name"]
        assert recorded["run_id"] == summary["wandb_run_id"]
    history = _wandb_history(next(runs[0].glob("wandb/offline-run-*")))
    epoch_rows = [h for h in history if "val/acc" in h]
    step_rows = [h for h in history if "step/loss" in h]
    assert [h["epoch"] for h in epoch_rows] == [1]
    assert len(step_rows) == 4 and all("step/lr" in h for h in step_rows)


@pytest.mark.slow
def test_failing_job_still_closes_its_wandb_run(tmp_path, wandb_env):
    proc = run_train([*WANDB_TINY, "trainer.epochs=2", "+trainer.fault=raise", "+trainer.fault_epoch=2"],
                     tmp_path, check=False)
    assert proc.returncode != 0
    runs = _records(tmp_path / "outputs")
    assert len(runs) == 1
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["status"] == "failed" and "RuntimeError" in summary["error"]
    assert summary["epochs_done"] == 1
    recorded = wandb_inspect(next(runs[0].glob("wandb/offline-run-*")))
    assert recorded["state"] in ("finished", "failed", "crashed") and recorded["exit_code"] == 1
    assert recorded["summary"]["status"] == "failed"
    assert recorded["summary"]["epochs_done"] == 1
    # the run's last line (before Hydra's traceback on stderr)
    files = next(runs[0].glob("wandb/offline-run-*")).relative_to(tmp_path)
    assert proc.stdout.strip().splitlines()[-1] == (
        f"normbench: failed (RuntimeError)  test/acc -  record {runs[0].relative_to(tmp_path)}  "
        f"W&B offline run {summary['wandb_run_id']}: wandb sync {files}")
