"""W&B the way its users work: a killed and resumed run is one W&B run with every epoch, job dirs and
W&B runs have short names with the swept values first, every run ends with one console line, and a
W&B Sweep agent's command drives bench/train.py. Real offline W&B runs, read back with `wandb leet`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, TINY, TRAIN, run_train, wandb_inspect

from normbench.identity import MAX_DIRNAME, MAX_RUN_NAME, job_dirname, run_name, swept_keys
from normbench.loggers import WandbSink


def leet_history(wandb_run: Path) -> list[dict]:
    """Every history row of an offline W&B run, read with W&B's own reader."""
    wandb_bin = Path(sys.executable).parent / "wandb"
    proc = subprocess.run([str(wandb_bin), "leet", "inspect", "--json", str(wandb_run)], capture_output=True,
                          text=True, timeout=120, check=True)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return [r["history"]["item"] for r in records if r.get("type") == "history"]


def last_line(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout.strip().splitlines()[-1]


# --------------------------------------------------------------------------------------------------
# resume


@pytest.mark.slow
def test_killed_and_resumed_run_is_one_wandb_run_with_every_epoch(tmp_path, wandb_env):
    """The job SIGKILLs itself in epoch 2 (after epoch 1's checkpoint); the same command again resumes
    it. W&B: one run id, and the resumed attempt's run holds epochs 1-3 and every step once."""
    args = ["-m", *TINY, "trainer.epochs=3", "norm=bn", "+trainer.fault=kill", "+trainer.fault_epoch=2",
            "+trainer.fault_step=2"]
    killed = run_train(args, tmp_path, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    (record,) = [p.parent for p in (tmp_path / "multirun" / "default").glob("*/summary.json")]
    first = json.loads((record / "summary.json").read_text())
    assert first["status"] == "running" and len((record / "metrics.jsonl").read_text().splitlines()) == 1
    run_id = first["wandb_run_id"]

    again = run_train(args, tmp_path)
    assert f"from its epoch-1 checkpoint in {record}" in again.stdout
    summary = json.loads((record / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_epoch"] == 1
    assert summary["wandb_run_id"] == run_id and summary["wandb_url"] is None
    attempts = sorted(record.glob("wandb/offline-run-*"))
    assert len(attempts) == 2 and all(a.name.endswith(f"-{run_id}") for a in attempts)  # no other id
    assert Path(summary["wandb_dir"]) == attempts[-1]

    recorded = wandb_inspect(record / "wandb")  # the W&B dir: its latest run, the resumed attempt
    assert recorded["run_id"] == run_id and recorded["state"] == "finished" and recorded["exit_code"] == 0
    assert recorded["summary"]["status"] == "completed" and recorded["summary"]["epoch"] == 3
    assert recorded["summary"]["test/acc"] == summary["metrics"]["test/acc"]
    history = leet_history(attempts[-1])
    epochs = [row for row in history if "val/acc" in row]
    local = [json.loads(line) for line in (record / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in epochs] == [1, 2, 3]
    assert [row["val/acc"] for row in epochs] == [row["val/acc"] for row in local]
    steps = [row["step"] for row in history if "step/loss" in row]
    assert steps == list(range(1, 13))  # 3 epochs x 4 steps, each once, at W&B step = training step
    assert all(row["_step"] == row["step"] for row in history if "step" in row)
    lines = again.stdout.strip().splitlines()  # the run's last line, the sweep's table, the sweep's line
    job_line = next(line for line in reversed(lines) if line.startswith("normbench: "))
    assert job_line.startswith("normbench: completed  test/acc ") and lines[-1].startswith("sweep ")
    assert f"W&B offline run {run_id}: wandb sync {attempts[-1].relative_to(tmp_path)}" in job_line


def test_probe_rows_and_a_replayed_record_land_at_their_steps(tmp_path, wandb_env):
    """As the trainer logs them (a probe at its step, the step rows at the next logging point, the epoch
    row last), and again through `replay` into a resumed run: each step once, the probes with them."""
    def sink(run_id=None):
        return WandbSink(project="p", entity=None, group="g", name="n", tags=[], config={}, run_dir=tmp_path,
                         mode="offline", run_id=run_id)

    steps = [{"step": s, "epoch": 1 + (s - 1) // 4, "lr": 0.1, "train/loss": 1.0 / s} for s in range(1, 9)]
    epochs = [{"epoch": e, "step": 4 * e, "val/acc": 0.1 * e} for e in (1, 2)]
    probes = [{"step": s, "epoch": 1 + (s - 1) // 4, "probe/grad_cos": 0.5} for s in (2, 6)]
    first = sink()
    for epoch in (0, 1):
        first.log_probe(probes[epoch])
        first.log_steps(steps[4 * epoch:4 * epoch + 4])
        first.log_epoch(epochs[epoch])
    first.finish()
    resumed = sink(first.run_id)
    resumed.replay(steps[:4], epochs[:1], probes[:1])
    resumed.log_probe(probes[1])
    resumed.log_steps(steps[4:])
    resumed.log_epoch(epochs[1])
    resumed.finish()
    assert resumed.run_id == first.run_id and resumed.files_dir != first.files_dir
    for run in (first, resumed):
        history = leet_history(run.files_dir)
        assert [row["_step"] for row in history] == list(range(1, 9))
        assert [row["step"] for row in history if "probe/grad_cos" in row] == [2, 6]
        assert [row["epoch"] for row in history if "val/acc" in row] == [1, 2]


# --------------------------------------------------------------------------------------------------
# names

LONG_FIXED = [o for o in TINY if not o.startswith("batch_size")] + ["logger=wandb", "trainer.device=cpu"]


def test_job_dir_and_wandb_names_put_swept_values_first_and_stay_short():
    names = {norm: job_dirname([*LONG_FIXED, f"norm={norm}", "batch_size=16"], ["norm", "batch_size"])
             for norm in ("bn", "gn")}
    assert names["bn"].startswith("norm=bn,batch_size=16,data=synthetic")
    assert names["gn"].startswith("norm=gn,batch_size=16,")
    assert all(len(n) <= MAX_DIRNAME for n in names.values())
    assert "logger" not in names["bn"] and "trainer.device" not in names["bn"]  # they change no numbers
    # cut names stay unique: the fixed overrides beyond the cut are in the hash
    other = job_dirname([*LONG_FIXED, "loss=focal", "norm=bn", "batch_size=16"],
                        ["norm", "batch_size"])
    assert other != names["bn"] and job_dirname([*LONG_FIXED, "norm=bn", "batch_size=16"],
                                                ["norm", "batch_size"]) == names["bn"]
    # few overrides: the name is all of them, no hash
    assert job_dirname(["norm=gn", "seed=1"], ["seed"]) == "seed=1,norm=gn"
    assert job_dirname(["norm=gn"], [], trial=7) == "trial-0007,norm=gn"

    name = run_name([*LONG_FIXED, "optimizer.lr=0.005", "norm=gn"], ["norm", "optimizer.lr"], trial=12)
    assert name.startswith("trial-0012,norm=gn,lr=0.005,data=synthetic,") and name.endswith("…")
    assert len(name) <= MAX_RUN_NAME


def test_swept_keys_come_from_the_command_line_and_the_sweeper_params():
    assert swept_keys({"loss": "ce,focal", "norm": "none,bn"}, ["norm=bn", "seed=0,1", "batch_size=8"]) == \
        ["loss", "seed"]  # norm=bn on the command line fixes it
    assert swept_keys({"optimizer.lr": "tag(log, interval(1e-4, 1e-1))"},
                      ["model=choice(vgg_a,alexnet)"]) == \
        ["optimizer.lr", "model"]


@pytest.mark.slow
def test_optuna_trials_show_their_number_and_study_in_dir_wandb_name_and_config(tmp_path, wandb_env):
    fixed = ["model=vgg_a_light", "activation=relu", "loss=ce", "optimizer=sgd", "optimizer.lr=0.01",
             "optimizer.weight_decay=0", "scheduler=constant", "model.dropout=0"]
    run_train(["-m", "search=optuna_random", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.seed=0",
               *TINY, *fixed], tmp_path)
    records = sorted(p.parent for p in (tmp_path / "multirun" / "default").glob("*/summary.json"))
    assert [r.name.split(",")[:2][0] for r in records] == ["trial-0000", "trial-0001"]
    for number, record in enumerate(records):
        summary = json.loads((record / "summary.json").read_text())
        assert record.name.startswith(f"trial-{number:04d},norm={summary['choices']['norm']},")
        recorded = wandb_inspect(record / "wandb")
        assert recorded["run_id"] == summary["wandb_run_id"]
        assert recorded["name"].startswith(f"trial-{number:04d},norm={summary['choices']['norm']},")
        assert recorded["config"]["optuna"] == {"study": "default-optuna_random", "trial": number}


# --------------------------------------------------------------------------------------------------
# the console's last line


@pytest.mark.slow
def test_a_run_without_wandb_ends_with_one_line_naming_status_accuracy_and_record(tmp_path):
    plain = run_train([*TINY, "logger=none"], tmp_path)
    (record,) = [p.parent for p in (tmp_path / "outputs").rglob("summary.json")]
    accuracy = json.loads((record / "summary.json").read_text())["metrics"]["test/acc"]
    assert last_line(plain) == (f"normbench: completed  test/acc {accuracy:.4f}  steps 4  images 64  "
                                f"record {record.relative_to(tmp_path)}  W&B off")
    # (an offline W&B run's line: the W&B Sweep test below; a failed run's: tests/test_cli.py)


# --------------------------------------------------------------------------------------------------
# W&B Sweeps


def agent_command(sweep_config: dict, run_id: str, args: dict, monkeypatch) -> tuple[list[str], dict]:
    """The command and environment `wandb agent` starts for one run of a sweep: W&B's own Agent builds
    them from the sweep config; only the process start is caught."""
    from wandb import wandb_agent

    started = {}

    class CaughtProcess:
        def __init__(self, command=None, env=None, **kwargs):
            started.update(command=command, env=env)

    monkeypatch.setattr(wandb_agent, "AgentProcess", CaughtProcess)
    monkeypatch.setenv("WANDB_SWEEP_ID", "offlinesweep")
    for name in ("WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH"):  # the agent sets them; restored afterwards
        monkeypatch.setenv(name, "")
    agent = wandb_agent.Agent(api=None, queue=None, sweep_id="offlinesweep")
    agent._sweep_command = sweep_config["command"]
    agent._command_run({"run_id": run_id, "program": sweep_config["program"],
                        "args": {key: {"value": value} for key, value in args.items()}})
    return started["command"], started["env"]


@pytest.mark.slow
def test_a_wandb_sweep_agent_command_drives_train_py_with_hydra_overrides(tmp_path, wandb_env, monkeypatch):
    sweep_config = yaml.safe_load((ROOT / "docs" / "wandb_sweep.yaml").read_text())
    assert sweep_config["command"] == ["${env}", "${interpreter}", "${program}", "${args_no_hyphens}"]
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "agent"))
    (tmp_path / "agent").mkdir()
    # one point of the sweep (the W&B server's choice), plus the tiny settings as fixed parameters
    point = {"norm": "gn", "batch_size": 16, "optimizer.lr": 0.0123, "trainer.epochs": 1}
    fixed = dict(o.split("=", 1) for o in TINY if not o.startswith(("batch_size", "trainer.epochs")))
    command, env = agent_command(sweep_config, "sweeprun1", {**point, **fixed}, monkeypatch)
    assert command[:3] == ["/usr/bin/env", "python", "bench/train.py"]
    assert command[3:7] == ["norm=gn", "batch_size=16", "optimizer.lr=0.0123", "trainer.epochs=1"]
    env = {**env, "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
           "PYTHONPATH": str(ROOT / "src")}
    # the agent runs from the project dir; here the program's path is made absolute so that the
    # outputs land in the test's temp dir
    proc = subprocess.run([*command[:2], str(TRAIN), *command[3:]], cwd=tmp_path, env=env,
                          capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = [p.parent for p in (tmp_path / "outputs").rglob("summary.json")]
    summary = json.loads((record / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["choices"]["norm"] == "gn"
    assert summary["choices"]["batch_size"] == 16 and summary["choices"]["lr"] == 0.0123
    assert summary["wandb_run_id"] == "sweeprun1"  # the agent's run id: W&B files it under the sweep
    (files,) = (tmp_path / "agent" / "wandb").glob("offline-run-*-sweeprun1")
    recorded = wandb_inspect(files)
    assert recorded["run_id"] == "sweeprun1" and recorded["state"] == "finished"
    # the agent sets WANDB_DIR: W&B's files go there, and the run's last line says where
    assert not (record / "wandb").exists() and Path(summary["wandb_dir"]) == files
    assert last_line(proc) == (f"normbench: completed  test/acc {summary['metrics']['test/acc']:.4f}  "
                               f"steps 4  images 64  "
                               f"record {record.relative_to(tmp_path)}  W&B offline run sweeprun1: "
                               f"wandb sync {files.relative_to(tmp_path)}")
    assert recorded["summary"]["val/best_acc"] == summary["metrics"]["val/best_acc"]  # the sweep's metric
    # W&B's config holds the sweep's values under the parameter names, normbench's config around them
    assert recorded["config"]["norm"] == "gn" and recorded["config"]["optimizer.lr"] == 0.0123
    assert recorded["config"]["optimizer"]["lr"] == 0.0123 and recorded["config"]["choices"]["norm"] == "gn"
