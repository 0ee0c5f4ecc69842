"""Resume by identity: a sweep killed mid-run (SIGKILL to the whole process group) and started again ends
complete, with no run trained twice to completion, no half-written record, and the interrupted run
continued from its checkpoint even though the restarted job lands in another job dir. Plus the sweep
index, the per-identity lock and the median-stopping rule on their own."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, TRAIN

from normbench.job import choose_run_dir, run_pruner
from normbench.pruning import MedianStoppingPruner
from normbench.record import atomic_write_json
from normbench.sweep.index import SweepState

BASE = [*TINY, "logger=none"]


def summaries(root: Path) -> dict[Path, dict]:
    """Every summary.json under root; each must parse (no half-written record)."""
    return {p.parent: json.loads(p.read_text()) for p in root.rglob("summary.json")}


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sigkilled_sweep_resumes_from_checkpoints_without_redoing_finished_runs(tmp_path):
    epochs = 10
    args = ["-m", *BASE, f"trainer.epochs={epochs}", "norm=none,bn"]
    sweep_dir = tmp_path / "multirun" / "default"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(TRAIN), *args], cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = second = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            runs = {}
            for path in sweep_dir.glob("*/summary.json"):
                try:
                    runs[path.parent] = json.loads(path.read_text())
                except ValueError:  # must never happen: records are written atomically
                    raise AssertionError(f"half-written {path}") from None
            done = [d for d, s in runs.items() if s["status"] == "completed"]
            going = [d for d, s in runs.items() if s["status"] == "running" and (d / "checkpoint.pt").exists()]
            if done and going:
                first, second = done[0], going[0]
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert first is not None, "the sweep ended before one run completed while the other had a checkpoint"

    before = summaries(tmp_path)
    assert before[first]["status"] == "completed" and before[second]["status"] == "running"
    checkpointed = torch.load(second / "checkpoint.pt", weights_only=True)["epochs_done"]
    assert 1 <= checkpointed < epochs
    rows_before = metrics(second)[:checkpointed]

    # the same sweep plus a setting that changes every job's dir name but not what it computes: the
    # finished run is found by identity elsewhere, the killed one continues in its own dir
    again = subprocess.run([sys.executable, str(TRAIN), *args, "trainer.log_every_steps=2"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    line = next(x for x in again.stdout.splitlines() if x.startswith("sweep "))
    assert line == "sweep multirun/default: 1 completed / 0 diverged / 0 failed / 0 pruned / 1 skipped"
    assert f"resuming {before[second]['identity']} from its epoch-{checkpointed} checkpoint" in again.stdout

    after = summaries(tmp_path)
    assert set(after) == {first, second}, "a restarted job left a second record of the same run"
    assert after[first] == before[first]  # not trained again: finished_at and everything else unchanged
    resumed = after[second]
    assert resumed["status"] == "completed" and resumed["epochs_done"] == epochs
    assert resumed["resumed_from_epoch"] == checkpointed
    rows = metrics(second)
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))  # each epoch once
    assert rows[:checkpointed] == rows_before  # the epochs before the kill were not trained again
    steps = [json.loads(x)["step"] for x in (second / "steps.jsonl").read_text().splitlines()]
    assert steps == list(range(1, epochs * 4 + 1))
    index = SweepState(sweep_dir)
    assert {index.get(s["identity"])["status"] for s in after.values()} == {"completed"}


def test_index_is_rebuilt_from_records_and_checks_them(tmp_path):
    sweep = tmp_path / "sweep"
    for name, identity, status in (("a", "id_a", "completed"), ("b", "id_b", "running"), ("c/d", "id_c", "diverged")):
        atomic_write_json(sweep / name / "summary.json", {"identity": identity, "status": status, "objective": 0.25,
                                                          "metrics": {"time/total_s": 10.0}})
    state = SweepState(sweep)
    state.ensure_index()
    assert state.done("id_a")["dir"] == "a" and state.done("id_a")["objective"] == 0.25
    assert state.done("id_c")["dir"] == "c/d"
    assert state.done("id_b") is None and state.get("id_b")["status"] == "running"
    assert state.done("id_x") is None
    # an index entry whose record no longer says so is not trusted
    atomic_write_json(sweep / "a" / "summary.json", {"identity": "id_a", "status": "failed"})
    assert state.done("id_a") is None


def test_a_record_of_another_identity_is_never_overwritten(tmp_path):
    state = SweepState(tmp_path)
    job = tmp_path / "norm=bn"
    assert choose_run_dir(state, "new", job) == job
    atomic_write_json(job / "summary.json", {"identity": "old", "status": "completed"})
    assert choose_run_dir(state, "new", job) == tmp_path / "norm=bn.new"
    # an earlier attempt of the same identity elsewhere (with its checkpoint) is where the run continues
    earlier = tmp_path / "elsewhere"
    earlier.mkdir()
    (earlier / "checkpoint.pt").write_bytes(b"")
    state.put("new", dir=earlier, status="running")
    assert choose_run_dir(state, "new", job) == earlier


def _hold_lock(sweep: str, ready, seconds: float) -> None:
    with SweepState(sweep).lock("same"):
        ready.set()
        time.sleep(seconds)


def test_a_second_job_of_the_same_identity_waits_for_the_first(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path), ready, 0.5))
    holder.start()
    assert ready.wait(30)
    started = time.monotonic()
    with SweepState(tmp_path).lock("same"):
        waited = time.monotonic() - started
    holder.join()
    assert waited > 0.2
    with SweepState(tmp_path).lock("other"):  # other identities never wait
        pass


HOLD_AND_SLEEP = """
import sys, time
from normbench.sweep.index import SweepState
with SweepState(sys.argv[1]).lock("same"):
    print("locked", flush=True)
    time.sleep(600)
"""


@pytest.mark.slow
def test_the_identity_lock_of_a_sigkilled_job_is_released(tmp_path):
    """A job killed with SIGKILL while it holds its identity's lock (a real process: no finaliser runs)
    leaves no stale lock: the next job of that identity gets it at once."""
    import threading

    holder = subprocess.Popen([sys.executable, "-c", HOLD_AND_SLEEP, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        acquired = threading.Event()

        def take() -> None:
            with SweepState(tmp_path).lock("same"):
                acquired.set()

        threading.Thread(target=take, daemon=True).start()
        assert not acquired.wait(1.0), "the lock was not held by the live process"
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
        assert acquired.wait(10), "the lock of the killed process was never released"
        assert holder.returncode == -signal.SIGKILL
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_median_stopping_rule(tmp_path):
    state = SweepState(tmp_path)
    for i, curve in enumerate(([0.8, 0.5, 0.4], [0.7, 0.6, 0.3], [0.9, 0.4, 0.35])):
        state.add_curve(f"peer{i}", curve)
    pruner = MedianStoppingPruner(state.curves_dir, "me", warmup_epochs=1, min_runs=3)
    assert not pruner.should_stop(1, 0.95)          # warm-up
    assert pruner.should_stop(2, 0.55)              # best 0.55 > median of (0.5, 0.6, 0.4) = 0.5
    assert pruner.last_decision == {"epoch": 2, "best_error": 0.55, "median": 0.5, "peers": 3}
    good = MedianStoppingPruner(state.curves_dir, "me", warmup_epochs=1, min_runs=3)
    # best so far 0.45 then 0.3, against peer medians 0.5 and 0.35
    assert not good.should_stop(1, 0.9) and not good.should_stop(2, 0.45) and not good.should_stop(3, 0.3)
    few = MedianStoppingPruner(state.curves_dir, "me", warmup_epochs=0, min_runs=4)
    assert not few.should_stop(2, 0.99)             # 3 peers < min_runs
    longer = MedianStoppingPruner(state.curves_dir, "me", warmup_epochs=0, min_runs=1)
    assert not longer.should_stop(4, 0.99)          # no peer reached epoch 4


def test_run_pruner_is_off_by_default_and_needs_a_sweep(tmp_path):
    from omegaconf import OmegaConf

    assert run_pruner(OmegaConf.create({"pruning": {"name": "none"}}), tmp_path, "me") is None
    median = OmegaConf.create({"pruning": {"name": "median", "warmup_epochs": 2, "min_runs": 5}})
    assert run_pruner(median, None, "me") is None  # a single run has no peers
    pruner = run_pruner(median, tmp_path, "me")
    assert isinstance(pruner, MedianStoppingPruner) and (pruner.warmup_epochs, pruner.min_runs) == (2, 5)
