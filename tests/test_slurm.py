"""normbench's `hydra/launcher=slurm` on a real one-node SLURM cluster (tests/slurm_cluster.py, started
with scripts/slurm_one_node.sh): a job array, a requeue mid-run, a timeout through submitit's
checkpointing, and an Optuna search whose workers are array tasks. Skipped where SLURM cannot run.

Runs stop at exact points with the `wait` fault (`+trainer.fault=wait`): the run appends a line to
`<file>.waiting` when it reaches epoch 2 (its epoch-1 checkpoint written) and holds there until
`<file>` exists, so the test interrupts it at that point instead of guessing with sleeps.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, TRAIN
from omegaconf import OmegaConf

from normbench.errors import ConfigError
from normbench.faults import FaultyStream, check_fault
from normbench.schema import TrainerConf, parse

SLURM = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.mem_gb=null",
         "hydra.launcher.cpus_per_task=1", "hydra.launcher.array_parallelism=2",
         "hydra.launcher.timeout_min=10",
         "logger=none"]


def start_sweep(args: list[str], cwd: Path, cluster) -> subprocess.Popen:
    env = {**os.environ, **cluster.env, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1",
           "WANDB_MODE": "disabled"}
    # the jobs start in the submitting dir: a relative PYTHONPATH (PYTHONPATH=src) would not reach them
    env["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve())
                                        for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)
    return subprocess.Popen([sys.executable, str(TRAIN), "-m", *SLURM, *TINY, *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, cluster, timeout: float = 180) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError("sweep timed out:"
                             f"\n{out[-5000:]}\n{cluster.queue()}\n{cluster.logs()}") from None
    return out


def wait_for(predicate, what: str, proc: subprocess.Popen, timeout: float = 120, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended while waiting for {what}:\n{proc.stdout.read()[-5000:]}")
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def arrivals(marker: Path) -> list[list[str]]:
    """The `wait` fault's lines: pid, SLURM restart count, where."""
    return [line.split() for line in marker.read_text().splitlines()] if marker.exists() else []


def submitted_job_id(sweep: Path) -> str:
    """The SLURM job id of a one-job sweep (submitit's folder is named after it)."""
    folders = [p.name for p in (sweep / ".submitit").iterdir() if p.is_dir() and p.name != "%j"]
    return folders[0] if len(folders) == 1 else ""


def results(sweep: Path) -> list:
    """What Hydra collected: the JobReturn of each task, from submitit's result pickles."""
    rows = []
    for path in sorted((sweep / ".submitit").rglob("*_result.pkl")):
        outcome, value = pickle.loads(path.read_bytes())
        rows.append((outcome, value))
    return rows


def summaries(sweep: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep.rglob("summary.json"))]


def test_wait_fault_needs_its_release_file():
    cfg = OmegaConf.create({"trainer": {"fault": "wait", "fault_epoch": 2}})
    with pytest.raises(ConfigError, match="trainer.fault_file"):
        check_fault(parse("trainer", TrainerConf, cfg.trainer))
    cfg.trainer.fault_file = "/tmp/go"
    check_fault(parse("trainer", TrainerConf, cfg.trainer))
    assert FaultyStream([], parse("trainer", TrainerConf, cfg.trainer), "cpu").file == "/tmp/go"


def test_skips_with_a_reason_where_slurm_cannot_run(monkeypatch):
    import slurm_cluster

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "needs root" in slurm_cluster.unavailable_reason()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert "apt-get install slurm-wlm munge" in slurm_cluster.unavailable_reason()
    with pytest.raises(slurm_cluster.Unavailable, match="not installed"), slurm_cluster.one_node_cluster():
        pass


@pytest.mark.slow
def test_job_array_sweep_completes_and_hydra_collects_every_objective(slurm_cluster, tmp_path):
    sweep = tmp_path / "sweep"
    started = time.monotonic()
    proc = start_sweep(["norm=bn,gn", f"hydra.sweep.dir={sweep}"], tmp_path, slurm_cluster)
    out = finish(proc, slurm_cluster)
    assert proc.returncode == 0, out[-5000:]
    # one array of two tasks, both through sbatch (the sbatch script names the array)
    sbatch = list((sweep / ".submitit").rglob("*_submission.sh"))
    assert sbatch and "#SBATCH --array=0-1%2" in sbatch[0].read_text()
    records = summaries(sweep)
    assert sorted(r["choices"]["norm"] for r in records) == ["bn", "gn"]
    assert all(r["status"] == "completed" for r in records), records
    assert all(r["host"] and r["pid"] != proc.pid for r in records)
    collected = results(sweep)
    assert [outcome for outcome, _ in collected] == ["success", "success"], collected
    objectives = sorted(job_return.return_value for _, job_return in collected)
    assert objectives == sorted(r["objective"] for r in records)
    assert re.search(r"2 completed / 0 diverged / 0 failed", out), out[-3000:]
    print(f"array sweep: {time.monotonic() - started:.1f} s (cluster up in {slurm_cluster.start_s:.1f} s)")


def held_run(tmp_path: Path, epochs: int = 3) -> tuple[list[str], Path, Path]:
    """A run of `epochs` epochs held at the start of epoch 2, after its epoch-1 checkpoint."""
    release = tmp_path / "release"
    # start_sweep puts TINY first: only what differs from it here
    args = [f"trainer.epochs={epochs}", "norm=bn", "+trainer.fault=wait", "+trainer.fault_epoch=2",
            f"+trainer.fault_file={release}"]
    return args, release, Path(f"{release}.waiting")


def metrics_epochs(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_requeued_job_resumes_from_its_epoch_checkpoint_and_completes_once(slurm_cluster, tmp_path):
    """`scontrol requeue` (what preemption with PreemptMode=REQUEUE does): SLURM kills the running job
    and starts it again under the same job id; the run continues from its epoch-1 checkpoint."""
    started = time.monotonic()
    sweep = tmp_path / "sweep"
    args, release, marker = held_run(tmp_path)
    # start_sweep puts TINY first; the held run's own values come after it and win
    proc = start_sweep([*args, f"hydra.sweep.dir={sweep}"], tmp_path, slurm_cluster)
    wait_for(lambda: len(arrivals(marker)) == 1, "the run to reach epoch 2", proc)
    job_id = wait_for(lambda: submitted_job_id(sweep), "the job id", proc)
    slurm_cluster.run("scontrol", "requeue", job_id)
    requeued_at = time.monotonic()
    slurm_cluster.start_requeued_now(job_id)
    wait_for(lambda: len(arrivals(marker)) == 2, "the requeued run to reach epoch 2 again", proc)
    restart_s = time.monotonic() - requeued_at
    release.touch()
    out = finish(proc, slurm_cluster)
    assert proc.returncode == 0, out[-5000:]

    first, second = arrivals(marker)
    assert first[1] == "0" and second[1] == "1", (first, second)   # SLURM_RESTART_COUNT
    assert first[0] != second[0]                                      # a new process
    assert slurm_cluster.job(job_id)["Restarts"] == "1"
    [record] = summaries(sweep)
    assert record["status"] == "completed" and record["epochs_done"] == 3, record
    assert record["resumed_from_epoch"] == 1, record
    run_dir = next(sweep.rglob("summary.json")).parent
    assert metrics_epochs(run_dir) == [1, 2, 3]                       # each epoch trained and recorded once
    [(outcome, job_return)] = results(sweep)
    assert outcome == "success" and job_return.return_value == pytest.approx(record["objective"])
    assert "1 completed / 0 diverged / 0 failed" in out, out[-3000:]
    print(f"requeue: {time.monotonic() - started:.1f} s, back at epoch 2 {restart_s:.1f} s after the requeue")


@pytest.mark.slow
def test_timeout_requeues_through_submitit_checkpoint_up_to_max_num_timeout(slurm_cluster, tmp_path):
    """Over the time limit: SLURM sends SIGUSR2 `signal_delay_s` before it (sbatch --signal); submitit
    calls the launcher's `checkpoint` (a DelayedSubmission of the same job), requeues the job and
    counts a timeout; after `max_num_timeout` requeues the next timeout ends the job.

    The signal is delivered as SLURM delivers it (`scancel --signal=USR2`, to the job's steps) at an
    exact point, instead of waiting for SLURM's timer: that timer runs every 30 s, and with a 1-minute
    limit (SLURM's smallest) it fires at an unpredictable time, even at once, before Python has
    installed submitit's handler. With a limit under 50 minutes submitit classifies any SIGUSR2 as a
    timeout (its guaranteed walltime, min(0.8 T, T - 10 min), is not positive): `timeout_min=10`
    leaves a slow start room; `signal_delay_s=0` keeps SLURM's own signal off."""
    started = time.monotonic()
    sweep = tmp_path / "sweep"
    args, _release, marker = held_run(tmp_path)
    proc = start_sweep([*args, f"hydra.sweep.dir={sweep}", "hydra.launcher.signal_delay_s=0",
                        "hydra.launcher.max_num_timeout=1"],
                       tmp_path, slurm_cluster)
    wait_for(lambda: len(arrivals(marker)) == 1, "the run to reach epoch 2", proc)
    job_id = wait_for(lambda: submitted_job_id(sweep), "the job id", proc)
    assert slurm_cluster.job(job_id)["TimeLimit"] == "00:10:00"
    slurm_cluster.run("scancel", "--signal=USR2", job_id)
    slurm_cluster.start_requeued_now(job_id)                         # submitit requeued it
    wait_for(lambda: len(arrivals(marker)) == 2, "the requeued run to reach epoch 2 again", proc)
    slurm_cluster.run("scancel", "--signal=USR2", job_id)            # the second timeout: one too many
    out = finish(proc, slurm_cluster)
    assert proc.returncode == 0, out[-5000:]

    assert slurm_cluster.job(job_id)["Restarts"] == "1"                # requeued once, not twice
    log = "\n".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.err"))
    assert "this job is timed-out" in log and "DUE TO JOB REQUEUE" in log, log[-3000:]
    assert "timed-out too many times" in log, log[-3000:]
    # the first attempt recorded itself interrupted (not failed) on its way out
    assert "requeued at its time limit after 1 epoch(s)" in log, log[-3000:]
    [record] = summaries(sweep)
    # the second attempt resumed from the epoch-1 checkpoint, then ended at the second timeout
    assert record["resumed_from_epoch"] == 1, record
    assert record["status"] == "failed" and "timed-out too many times" in record["error"], record
    run_dir = next(sweep.rglob("summary.json")).parent
    assert (run_dir / "checkpoint.pt").exists()                         # kept: a re-run continues from it
    assert "0 completed / 0 diverged / 1 failed" in out, out[-3000:]
    print(f"timeout: {time.monotonic() - started:.1f} s")


@pytest.mark.slow
def test_optuna_workers_as_array_tasks_share_one_study_with_exactly_n_trials(slurm_cluster, tmp_path):
    """Two sweeper processes share one SQLite study; each launches its trials as SLURM array tasks,
    which open the study themselves (median pruner: every epoch's error is reported from the task)."""
    import optuna
    from optuna.trial import TrialState

    started = time.monotonic()
    n_trials = 4
    args = ["search=optuna_random", "hydra/sweeper/pruner=median", "model=vgg_a_light",
            f"hydra.sweeper.n_trials={n_trials}", "hydra.sweeper.n_jobs=2", "norm=bn", "activation=relu",
            "loss=ce", "scheduler=constant", "optimizer.weight_decay=0", "model.dropout=0"]
    procs = [start_sweep(args, tmp_path, slurm_cluster) for _ in range(2)]
    outs = [finish(proc, slurm_cluster, timeout=240) for proc in procs]
    for proc, out in zip(procs, outs):
        assert proc.returncode == 0, out[-5000:]

    db = tmp_path / "multirun" / "default" / "optuna.db"
    study = optuna.load_study(study_name="default-optuna_random", storage=f"sqlite:///{db}")
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == list(range(n_trials)), [(t.number, t.state) for t in trials]
    assert all(t.state == TrialState.COMPLETE for t in trials), [t.state for t in trials]
    sweep = tmp_path / "multirun" / "default"
    pickles = list((sweep / ".submitit").rglob("*_result.pkl"))
    assert len(pickles) == n_trials                                      # every trial ran as a SLURM task
    for trial in trials:
        record = json.loads((Path(trial.user_attrs["run_dir"]) / "summary.json").read_text())
        assert record["status"] == "completed"
        assert trial.value == pytest.approx(record["objective"])
        assert trial.intermediate_values == {1: pytest.approx(record["objective"])}  # reported by the task
        assert record["pid"] not in {p.pid for p in procs}
    print(f"optuna: {time.monotonic() - started:.1f} s")
