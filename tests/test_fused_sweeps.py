"""hydra/launcher=fused through bench/train.py: a fused sweep's runs are whole runs (records, W&B runs,
the same identities as unfused runs: each kind of re-run skips the other's), jobs without fused code run
unfused in the same sweep, and a killed fused sweep resumes every unfinished run from its checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TRAIN, run_train, wandb_inspect

FASHION = Path("/usr/share/datasets/fashion-mnist")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not FASHION.is_dir(),
    reason=f"Fashion-MNIST is not installed in {FASHION} (apt-get install dataset-fashion-mnist)",
)]
BASE = [
    "data=fashion_mnist",
    f"data.root={FASHION}",
    "data.train_size=512",
    "data.val_size=128",
    "model=vgg_a",
    "model.width=0.125",
    "batch_size=16",
    "trainer.epochs=2",
    "trainer.max_steps_per_epoch=4",
    "trainer.max_eval_batches=2",
    "trainer.eval_batch_size=64",
    "trainer.threads=1",
    "trainer.log_every_steps=2",
    "trainer.device=cpu",
    "experiment_name=fz",
]
FUSED = ["hydra/launcher=fused", "hydra.launcher.max_fuse=4"]


def summaries(root: Path) -> dict[Path, dict]:
    return {
        p.parent: json.loads(p.read_text()) for p in sorted((root / "multirun" / "fz").glob("*/summary.json"))
    }


def steps_of(run_dir: Path) -> list[int]:
    return [
        json.loads(line)["step"]
        for line in (run_dir / "steps.jsonl").read_text().splitlines()
        if line.strip()
    ]


def losses_of(run_dir: Path) -> list[float]:
    return [json.loads(line)["train/loss"] for line in (run_dir / "steps.jsonl").read_text().splitlines()]


def test_fused_sweep_writes_whole_runs_and_reruns_skip_them(tmp_path, wandb_env):
    grid = ["seed=0,1", "optimizer=sgd_momentum,adam", "logger=wandb"]
    proc = run_train(["-m", *BASE, *FUSED, *grid], tmp_path, env_extra=wandb_env)
    assert "normbench: 4 runs train as one fused model" in proc.stdout
    runs = summaries(tmp_path)
    assert len(runs) == 4 and {s["status"] for s in runs.values()} == {"completed"}
    assert len({s["identity"] for s in runs.values()}) == 4 and len({s["pid"] for s in runs.values()}) == 1
    assert len({s["wandb_run_id"] for s in runs.values()}) == 4
    for run_dir, summary in runs.items():
        assert summary["epochs_done"] == 2 and 0 <= summary["objective"] <= 1
        assert steps_of(run_dir) == list(range(1, 9))
        assert (run_dir / "checkpoint.pt").exists() and summary["metrics"]["test/acc"] is not None
        seen = wandb_inspect(Path(summary["wandb_dir"]))  # each run its own W&B run, read back
        assert seen["run_id"] == summary["wandb_run_id"] and seen["state"] == "finished"
        assert seen["summary"]["val/acc"] == pytest.approx(summary["metrics"]["val/acc"])
    # the same grid unfused, in its own sweep: the first steps' losses within float32 rounding. Later steps
    # drift apart as two float32 runs whose convolutions sum in another order do (with SGD momentum by 1e-3
    # at step 3 on one of the CPUs this ran on, 1e-6 with Adam); tests/test_fused.py checks float64 equality
    alone = tmp_path / "alone"
    alone.mkdir()
    run_train(["-m", *BASE, *grid, "logger=none"], alone)
    by_identity = {s["identity"]: run_dir for run_dir, s in summaries(alone).items()}
    for run_dir, summary in runs.items():
        fused, unfused = (losses_of(d)[:2] for d in (run_dir, by_identity[summary["identity"]]))
        assert fused == pytest.approx(unfused, abs=5e-5)
    # re-runs of the fused sweep, fused and unfused, skip every run
    for launcher in (FUSED, []):
        again = run_train(["-m", *BASE, *launcher, *grid], tmp_path, env_extra=wandb_env)
        assert "0 completed / 0 diverged / 0 failed / 0 pruned / 4 skipped" in again.stdout + again.stderr
    assert summaries(tmp_path) == runs


def test_jobs_without_fused_code_run_unfused_in_the_same_sweep(tmp_path):
    proc = run_train(
        ["-m", *BASE, *FUSED, "model=alexnet_cifar", "norm=bn,lrn", "seed=0,1", "logger=none"], tmp_path
    )
    out = proc.stdout + proc.stderr
    assert out.count("2 job(s) run unfused, no fused code for: norm=lrn (2)") == 1
    assert out.count("normbench: 2 runs train as one fused model") == 1
    runs = summaries(tmp_path)
    assert len(runs) == 4 and {s["status"] for s in runs.values()} == {"completed"}
    assert sorted(s["choices"]["norm"] for s in runs.values()) == ["bn", "bn", "lrn", "lrn"]


def _rerun_completes_each_run_once(tmp_path, before: dict) -> dict:
    proc = run_train(["-m", *BASE, *FUSED, "seed=0,1,2", "logger=none"], tmp_path)
    after = summaries(tmp_path)
    assert len(after) == 3 and {s["status"] for s in after.values()} == {"completed"}, proc.stdout[-3000:]
    for run_dir, summary in after.items():
        assert steps_of(run_dir) == list(range(1, 9)), run_dir  # every step once
        assert summary["epochs_done"] == 2 and summary["identity"] == before[run_dir]["identity"]
    return after


def test_a_fused_sweep_killed_between_its_runs_checkpoints_resumes_each(tmp_path):
    """Killed right after the first run's epoch-1 checkpoint: the re-run resumes that run from it and
    trains the others from the start, catching them up, all fused."""
    args = ["-m", *BASE, *FUSED, "seed=0,1,2", "logger=none"]
    proc = run_train(args, tmp_path, env_extra={"NORMBENCH_KILL_AT": "checkpoint_saved@1"}, check=False)
    assert proc.returncode == -signal.SIGKILL
    before = summaries(tmp_path)
    assert len(before) == 3 and {s["status"] for s in before.values()} == {"running"}
    assert sum((d / "checkpoint.pt").exists() for d in before) == 1
    after = _rerun_completes_each_run_once(tmp_path, before)
    assert sorted(s["resumed_from_epoch"] or 0 for s in after.values()) == [0, 0, 1]


def test_a_fused_sweep_killed_mid_epoch_resumes_every_run(tmp_path):
    args = [*BASE, "trainer.max_steps_per_epoch=30", "trainer.epochs=2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(TRAIN), "-m", *args, *FUSED, "seed=0,1,2", "logger=none"],
        cwd=tmp_path,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            runs = summaries(tmp_path) if (tmp_path / "multirun").exists() else {}
            if len(runs) == 3 and all((d / "checkpoint.pt").exists() for d in runs):
                break  # every run is in epoch 2
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the sweep ended before it was killed in epoch 2"
    before = summaries(tmp_path)
    assert {s["status"] for s in before.values()} == {"running"}
    proc = run_train(["-m", *args, *FUSED, "seed=0,1,2", "logger=none"], tmp_path)
    assert "normbench: 3 runs train as one fused model" in proc.stdout
    for run_dir, summary in summaries(tmp_path).items():
        assert summary["status"] == "completed" and summary["resumed_from_epoch"] == 1
        assert steps_of(run_dir) == list(range(1, 61)), run_dir


def test_a_bad_max_fuse_is_one_line_before_anything_runs(tmp_path):
    proc = run_train(
        ["-m", *BASE, "hydra/launcher=fused", "hydra.launcher.max_fuse=0", "seed=0,1", "logger=none"],
        tmp_path,
        check=False,
    )
    assert proc.returncode == 2
    assert (
        "bad value hydra.launcher.max_fuse=0" in proc.stderr
        and "runs trained as one fused model" in proc.stderr
    )
    assert not (tmp_path / "multirun").exists()
