"""The loggers beside W&B: TensorBoard event files read back with TensorBoard's own reader (the record's
metric names, steps and values, the hparams), several loggers at once with the best model as a W&B artifact,
a resumed run's events each once, and metrics.csv equal to metrics.jsonl."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import CONF, TINY, run_train, wandb_inspect
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from normbench.job import run_job
from normbench.record import read_rows

PROBED = ["probe=grad_similarity", "probe.interval=2", "trainer.epochs=2", "trainer.log_every_steps=1"]


def events(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def scalars(accumulator: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(event.step, pytest.approx(event.value)) for event in accumulator.Scalars(tag)]


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("tensorboard")
    with initialize_config_dir(config_dir=str(CONF)):
        cfg = compose(config_name="config", overrides=[*TINY, "logger=tensorboard", *PROBED])
    run_job(cfg, output_dir=run_dir)
    return run_dir


def test_tensorboard_event_files_hold_the_records_metrics_at_their_steps(tensorboard_run):
    board, summary = events(tensorboard_run), json.loads((tensorboard_run / "summary.json").read_text())
    epochs, steps = read_rows(tensorboard_run / "metrics.jsonl"), read_rows(tensorboard_run / "steps.jsonl")
    probes = read_rows(tensorboard_run / "probes.jsonl")
    assert len(epochs) == 2 and len(steps) == 8 and probes
    for key in ("train/loss", "train/acc", "val/loss", "val/acc", "lr", "epoch", "throughput/img_s"):
        assert scalars(board, key) == [(row["step"], row[key]) for row in epochs], key
    assert scalars(board, "step/loss") == [(row["step"], row["train/loss"]) for row in steps]
    assert scalars(board, "step/lr") == [(row["step"], row["lr"]) for row in steps]
    probe_keys = [key for key in probes[0] if key.startswith("probe/")]
    for key in probe_keys:
        assert scalars(board, key) == [(row["step"], row[key]) for row in probes if key in row], key
    assert scalars(board, "test/acc") == [(8, summary["metrics"]["test/acc"])]  # once, at the last step
    assert len(board.Scalars("val/acc")) == 2 and board.Tags()["images"] == ["filters"]
    plugin = board.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(plugin["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["norm"].string_value == "bn" and hparams["batch_size"].number_value == 16
    assert hparams["identity"].string_value == summary["identity"]
    experiment = plugin_data_pb2.HParamsPluginData.FromString(plugin["_hparams_/experiment"]).experiment
    assert "test/acc" in {info.name.tag for info in experiment.metric_infos}


def test_metrics_csv_is_metrics_jsonl_as_a_table(tensorboard_run):
    table = pd.read_csv(tensorboard_run / "metrics.csv")
    rows = pd.read_json(tensorboard_run / "metrics.jsonl", lines=True)
    pd.testing.assert_frame_equal(table, rows, check_dtype=False)
    assert list(table.columns)[:2] == ["epoch", "step"] and len(table) == 2


@pytest.mark.slow
def test_a_resumed_runs_event_files_hold_each_step_once(tmp_path):
    """A run that fails in epoch 2 after two logged steps, twice (the re-run resumes from epoch 1's
    checkpoint): the second attempt purges the first's events after that checkpoint."""
    args = ["-m", *TINY, "logger=tensorboard", "trainer.epochs=2", "trainer.log_every_steps=1",
            "+trainer.fault=raise", "+trainer.fault_epoch=2", "+trainer.fault_step=3"]
    for _ in range(2):
        run_train(args, tmp_path)
    run_dir, = (p.parent for p in (tmp_path / "multirun").rglob("summary.json"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["resumed_from_epoch"] == 1
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 2
    steps = read_rows(run_dir / "steps.jsonl")
    assert [row["step"] for row in steps] == [1, 2, 3, 4, 5, 6]
    assert scalars(events(run_dir), "step/loss") == [(row["step"], row["train/loss"]) for row in steps]


@pytest.mark.slow
def test_wandb_and_tensorboard_at_once_with_the_best_model_as_an_artifact(tmp_path, wandb_env):
    run_train([*TINY, "logger=[wandb,tensorboard]", "logger.log_model=true", "trainer.epochs=2",
               "hydra.run.dir=run"], tmp_path)
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    wandb_dir = next(run_dir.glob("wandb/offline-run-*"))
    inspected = wandb_inspect(wandb_dir)["summary"]
    assert inspected["val/acc"] == pytest.approx(summary["metrics"]["val/acc"])
    assert inspected["best_epoch"] == summary["best_epoch"] and inspected["test_on"] == "last"
    assert scalars(events(run_dir), "val/acc") == [(r["step"], r["val/acc"])
                                                   for r in read_rows(run_dir / "metrics.jsonl")]
    records = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json",
                              str(wandb_dir)], capture_output=True, text=True, timeout=120, check=True)
    artifacts = [json.loads(line)["artifact"] for line in records.stdout.splitlines() if '"artifact"' in line]
    artifact, = [a for a in artifacts if a.get("type") == "model"]
    assert artifact["name"] == f"model-{summary['wandb_run_id']}" and "best" in artifact["aliases"]
    file, = artifact["manifest"]["contents"]
    assert file["path"] == "best.pt" and int(file["size"]) == (run_dir / "best.pt").stat().st_size
    assert json.loads(artifact["metadata"])["epoch"] == summary["best_epoch"]
