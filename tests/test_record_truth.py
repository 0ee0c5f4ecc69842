"""The record is the truth: under kills at exact points (NORMBENCH_KILL_AT, the process signals itself),
lost or wrong index entries, unusable checkpoints, a full disk, a read-only run dir, SIGTERM and Ctrl-C,
nothing recorded is lost, nothing done is trained again, and the sweep goes on or ends in one line."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, TRAIN, run_train, wandb_inspect

from normbench.checkpoint import load_checkpoint, save_checkpoint
from normbench.faults import KILL_AT_ENV
from normbench.sweep.index import SweepState
from normbench.trainer import LoopState

BASE = ["-m", *TINY, "logger=none"]
SWEEP = Path("multirun") / "default"


def sweep(cwd: Path, args: list[str], kill: str | None = None, check: bool = True,
          env: dict | None = None) -> subprocess.CompletedProcess:
    return run_train([*BASE, *args], cwd, env_extra={**({KILL_AT_ENV: kill} if kill else {}), **(env or {})},
                     check=check, timeout=300)


def records(sweep_dir: Path) -> dict[str, tuple[Path, dict]]:
    """{norm choice: (run dir, summary)} of every record under the sweep dir."""
    found = {}
    for path in sweep_dir.rglob("summary.json"):
        summary = json.loads(path.read_text())
        found[summary["choices"]["norm"]] = (path.parent, summary)
    return found


def closing_line(proc: subprocess.CompletedProcess) -> str:
    return next(x for x in proc.stdout.splitlines() if x.startswith("sweep "))


def no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*.tmp") if ".normbench" not in p.parts]


# --------------------------------------------------------------------------------------------------
# a completed record is done, whatever the index says


@pytest.fixture(scope="module")
def killed_after_summary(tmp_path_factory):
    """A sweep killed (SIGKILL) after the first job wrote its completed summary, before the index update;
    then the same sweep again."""
    cwd = tmp_path_factory.mktemp("killed_after_summary")
    killed = sweep(cwd, ["norm=none,bn"], kill="summary_written", check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    before = records(cwd / SWEEP)
    again = sweep(cwd, ["norm=none,bn"])
    return cwd, killed, before, again


@pytest.mark.slow
def test_a_kill_between_summary_and_index_does_not_retrain_the_run(killed_after_summary):
    cwd, _, before, again = killed_after_summary
    (run_dir, summary), = before.values()
    assert summary["status"] == "completed"
    assert closing_line(again) == "sweep multirun/default: 1 completed / 0 diverged / 0 failed / 0 pruned / 1 skipped"
    assert f"the sweep index entry of {summary['identity']} was 'running'" in again.stderr
    after = records(cwd / SWEEP)
    assert after["none"] == (run_dir, summary)  # not trained again: the record is unchanged
    assert SweepState(cwd / SWEEP).get(summary["identity"])["status"] == "completed"


@pytest.mark.slow
def test_a_lost_or_unreadable_index_entry_is_rebuilt_from_the_records(killed_after_summary, tmp_path):
    shutil.copytree(killed_after_summary[0] / "multirun", tmp_path / "multirun")
    state = SweepState(tmp_path / SWEEP)
    before = records(tmp_path / SWEEP)
    lost, torn = before["none"][1]["identity"], before["bn"][1]["identity"]
    (state.index_dir / f"{lost}.json").unlink()
    (state.index_dir / f"{torn}.json").write_text('{"identity": "')
    proc = sweep(tmp_path, ["norm=none,bn"])
    assert closing_line(proc) == "sweep multirun/default: 0 completed / 0 diverged / 0 failed / 0 pruned / 2 skipped"
    assert f"the sweep index entry of {lost} was missing" in proc.stderr
    assert f"the sweep index entry of {torn} was unreadable" in proc.stderr
    assert records(tmp_path / SWEEP) == before
    assert state.get(lost)["status"] == state.get(torn)["status"] == "completed"


@pytest.mark.slow
def test_an_index_entry_pointing_at_another_runs_dir_is_not_followed(killed_after_summary, tmp_path):
    shutil.copytree(killed_after_summary[0] / "multirun", tmp_path / "multirun")
    state = SweepState(tmp_path / SWEEP)
    before = records(tmp_path / SWEEP)
    other_dir, other = before["none"]
    own_dir, own = before["bn"]
    kept = {p.name: p.read_bytes() for p in other_dir.iterdir() if p.is_file()}
    (own_dir / "summary.json").unlink()  # bn must train again...
    (own_dir / "checkpoint.pt").unlink()
    state.put(own["identity"], dir=other_dir, status="running")  # ...and its entry points at none's record
    proc = sweep(tmp_path, ["norm=bn"])
    assert closing_line(proc) == "sweep multirun/default: 1 completed / 0 diverged / 0 failed / 0 pruned / 0 skipped"
    assert f"points at {other_dir}, which holds run {other['identity']}: not used" in proc.stderr
    assert {p.name: p.read_bytes() for p in other_dir.iterdir() if p.is_file()} == kept
    after = records(tmp_path / SWEEP)
    assert after["none"] == (other_dir, other)
    # bn trains in this invocation's job dir (the name shows the keys swept now: norm is fixed here)
    bn_dir, bn = after["bn"]
    assert bn_dir != other_dir and bn["status"] == "completed" and bn["identity"] == own["identity"]
    assert torch.load(bn_dir / "checkpoint.pt", weights_only=True)["identity"] == own["identity"]


# --------------------------------------------------------------------------------------------------
# unusable checkpoints are set aside, never deleted, never block


class Malicious:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_a_malicious_checkpoint_is_set_aside_and_the_run_starts_from_scratch(tmp_path):
    args = ["norm=bn", "trainer.epochs=2"]
    killed = sweep(tmp_path, args, kill="checkpoint_saved@1", check=False)
    assert killed.returncode == -signal.SIGKILL
    (run_dir, _), = records(tmp_path / SWEEP).values()
    marker = tmp_path / "pwned"
    torch.save({"identity": "x", "model": Malicious(marker)}, run_dir / "checkpoint.pt")
    evil = (run_dir / "checkpoint.pt").read_bytes()
    proc = sweep(tmp_path, args)
    no_traceback(proc)
    assert not marker.exists()
    warnings = [x for x in proc.stderr.splitlines() if "checkpoint.pt" in x]
    assert len(warnings) == 1 and "kept as checkpoint.pt.corrupt-" in warnings[0], proc.stderr
    assert "weights_only" not in proc.stderr
    kept, = run_dir.glob("checkpoint.pt.corrupt-*")
    assert kept.read_bytes() == evil
    summary = records(tmp_path / SWEEP)["bn"][1]
    assert summary["status"] == "completed" and summary["epochs_done"] == 2
    assert summary["resumed_from_epoch"] is None


def _parts(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler, "generator": torch.Generator()}


def _other_shape(path: Path) -> None:
    parts = _parts()
    parts["model"] = torch.nn.Linear(4, 2)
    parts["optimizer"] = torch.optim.SGD(parts["model"].parameters(), lr=0.1)
    save_checkpoint(path, identity="me", state=LoopState(epochs_done=1), **parts)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not a dict", "another identity", "another shape"])
def test_an_unusable_checkpoint_is_kept_aside_and_not_used(tmp_path, capsys, damage):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, identity="me", state=LoopState(epochs_done=3, step=9), **_parts())
    good = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 100)
    elif damage == "not a dict":
        torch.save([1, 2], path)
    elif damage == "another identity":
        save_checkpoint(path, identity="someone else", state=LoopState(epochs_done=3), **_parts())
    else:
        _other_shape(path)
    damaged = path.read_bytes()
    fresh = _parts(seed=1)
    weights = fresh["model"].weight.detach().clone()
    if damage == "another shape":
        from normbench.checkpoint import UnusableCheckpoint

        with pytest.raises(UnusableCheckpoint):
            load_checkpoint(path, identity="me", **fresh)
    else:
        assert load_checkpoint(path, identity="me", **fresh) is None
        assert torch.equal(fresh["model"].weight, weights)  # nothing restored from it
    assert not path.exists() and not (tmp_path / ".checkpoint.pt.tmp").exists()
    kept, = tmp_path.glob("checkpoint.pt.*-*")
    assert kept.read_bytes() == damaged
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the run starts from scratch" in err and "weights_only" not in err
    # the same checkpoint, intact, resumes the run
    path.write_bytes(good)
    state = load_checkpoint(path, identity="me", **_parts(seed=2))
    assert (state.epochs_done, state.step) == (3, 9)


# --------------------------------------------------------------------------------------------------
# a full disk and a read-only run dir


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path, leave: int = 0) -> None:
    """Fill the filesystem of `path` (a filler file) until at most `leave` bytes are free."""
    with open(path, "ab") as handle:
        for chunk in (1 << 20, 1 << 16, 1 << 12):
            while os.statvfs(path).f_bavail * os.statvfs(path).f_frsize - chunk >= leave:
                try:
                    handle.write(b"\0" * chunk)
                    handle.flush()
                except OSError:
                    break


@pytest.mark.slow
def test_a_full_disk_fails_the_run_in_one_line_and_the_sweep_goes_on(tmp_path):
    with tmpfs(tmp_path / "disk", "48m") as disk:
        first = sweep(disk, ["norm=none"])
        assert "1 completed" in closing_line(first)
        done = records(disk / SWEEP)["none"]
        fill(disk / "filler", leave=400_000)  # room for a config and a summary, not for a checkpoint
        proc = sweep(disk, ["norm=none,bn"])
        no_traceback(proc)
        assert closing_line(proc) == "sweep multirun/default: 0 completed / 0 diverged / 1 failed / 0 pruned / 1 skipped"
        failed = [x for x in proc.stderr.splitlines() if x.startswith("normbench: job")]
        assert len(failed) == 1 and "No space left on device" in failed[0], proc.stderr
        after = records(disk / SWEEP)
        assert after["none"] == done
        assert after["bn"][1]["status"] == "failed" and "No space left" in after["bn"][1]["error"]
        assert temp_files(disk) == []
        # a re-run in which every job would be skipped works on a disk with no byte free
        fill(disk / "filler2")
        again = sweep(disk, ["norm=none"])
        no_traceback(again)
        assert closing_line(again) == "sweep multirun/default: 0 completed / 0 diverged / 0 failed / 0 pruned / 1 skipped"


@pytest.mark.slow
def test_a_read_only_run_dir_fails_that_run_in_one_line_and_the_sweep_goes_on(tmp_path):
    if shutil.which("chattr") is None:
        pytest.skip("no chattr here")
    killed = sweep(tmp_path, ["norm=bn", "trainer.epochs=2"], kill="checkpoint_saved@1", check=False)
    assert killed.returncode == -signal.SIGKILL
    (run_dir, running), = records(tmp_path / SWEEP).values()
    frozen = subprocess.run(["chattr", "+i", str(run_dir)], capture_output=True, text=True, check=False)
    if frozen.returncode != 0:
        pytest.skip(f"chattr +i is not supported here: {frozen.stderr.strip()}")
    try:
        proc = sweep(tmp_path, ["norm=bn,none", "trainer.epochs=2"])
    finally:
        subprocess.run(["chattr", "-i", str(run_dir)], check=False)
    no_traceback(proc)
    assert closing_line(proc) == "sweep multirun/default: 1 completed / 0 diverged / 1 failed / 0 pruned / 0 skipped"
    lines = [x for x in proc.stderr.splitlines() if x.startswith("normbench:")]
    assert len(lines) == 1 and "its record could not be written (PermissionError" in lines[0], proc.stderr
    assert records(tmp_path / SWEEP)["bn"] == (run_dir, running)  # untouched (it could not be written)
    assert SweepState(tmp_path / SWEEP).get(running["identity"])["status"] == "failed"
    assert temp_files(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# SIGTERM and Ctrl-C


@pytest.mark.slow
def test_sigterm_records_interrupted_closes_wandb_and_a_resumed_run_that_fails_keeps_its_epochs(tmp_path,
                                                                                              wandb_env):
    args = ["logger=wandb", "norm=bn", "trainer.epochs=3", "+trainer.fault=raise", "+trainer.fault_epoch=2"]
    proc = sweep(tmp_path, args, kill="checkpoint_saved@1:TERM", check=False)
    assert proc.returncode == 143
    no_traceback(proc)
    assert closing_line(proc).endswith("/ 0 skipped / 1 interrupted")
    (run_dir, summary), = records(tmp_path / SWEEP).values()
    assert summary["status"] == "interrupted" and summary["epochs_done"] == 1
    assert summary["error"] == "interrupted by SIGTERM"
    wandb_summary = wandb_inspect(next(run_dir.glob("wandb/offline-run-*")))
    assert json.dumps(wandb_summary).count('"interrupted"') >= 1  # the W&B run was closed with it
    # the re-run continues it from its checkpoint and fails in epoch 2: one epoch done, not zero
    again = sweep(tmp_path, args, check=False)
    assert "1 failed" in closing_line(again)
    summary = records(tmp_path / SWEEP)["bn"][1]
    assert summary["status"] == "failed" and summary["resumed_from_epoch"] == 1 and summary["epochs_done"] == 1


@pytest.mark.slow
def test_ctrl_c_records_interrupted_and_ends_the_sweep_with_its_closing_line(tmp_path):
    proc = sweep(tmp_path, ["norm=none,bn", "trainer.epochs=2"], kill="checkpoint_saved@1:INT", check=False)
    assert proc.returncode == 130
    no_traceback(proc)
    assert closing_line(proc) == ("sweep multirun/default: 0 completed / 0 diverged / 0 failed / 0 pruned / "
                                  "0 skipped / 1 interrupted (1 of 2 jobs did not report)")
    (_, summary), = records(tmp_path / SWEEP).values()
    assert summary["status"] == "interrupted" and summary["error_type"] == "SIGINT"
    assert summary["epochs_done"] == 1


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killing_a_joblib_sweep_leaves_no_workers_behind(tmp_path, sig):
    args = [*BASE, "norm=none,bn", "trainer.epochs=500", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(TRAIN), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sweep_dir = tmp_path / SWEEP
    try:
        deadline = time.monotonic() + 180
        while len(list(sweep_dir.glob("*/checkpoint.pt"))) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.05)  # waiting for both workers to be training, not for a guessed time
        workers = [s["pid"] for _, s in records(sweep_dir).values()]
        assert len(workers) == 2 and proc.pid not in workers
        proc.send_signal(sig)
        proc.wait(60)
        deadline = time.monotonic() + 40
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in workers if _alive(pid)], "orphaned workers"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if sig == signal.SIGTERM:
        assert proc.returncode == 143
        assert "Traceback" not in proc.stderr.read()
    statuses = {s["status"] for _, s in records(sweep_dir).values()}
    assert statuses == {"interrupted"}


# --------------------------------------------------------------------------------------------------
# an Optuna worker killed and restarted at once


@pytest.mark.slow
def test_a_restarted_optuna_worker_requeues_its_dead_trial_at_once(tmp_path):
    import optuna
    from optuna.trial import TrialState

    args = ["search=optuna_tpe", "hydra.sweeper.n_trials=1", "hydra.sweeper.sampler.seed=0",
            "model=vgg_a_light", "trainer.epochs=2"]
    killed = sweep(tmp_path, args, kill="checkpoint_saved@1", check=False)
    assert killed.returncode == -signal.SIGKILL
    storage = f"sqlite:///{tmp_path / SWEEP / 'optuna.db'}"
    trial, = optuna.load_study(study_name="default-optuna_tpe", storage=storage).get_trials()
    assert trial.state == TrialState.RUNNING  # with a fresh heartbeat: the grace period has not passed
    assert trial.system_attrs["normbench:owner"]["host"] == socket.gethostname()
    sweep(tmp_path, args)  # at once
    trials = optuna.load_study(study_name="default-optuna_tpe", storage=storage).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].params == trials[0].params  # the same trial, re-queued
    (_, summary), = records(tmp_path / SWEEP).values()
    assert summary["status"] == "completed" and summary["resumed_from_epoch"] == 1


def test_temp_files_a_killed_writer_left_are_removed_before_the_dir_is_used_again(tmp_path):
    from normbench.record import remove_temp_files

    for name in (".checkpoint.pt.tmp", ".summary.json.k3j2.tmp", "checkpoint.pt", "summary.json"):
        (tmp_path / name).write_text("x")
    (tmp_path / ".hydra").mkdir()
    assert sorted(remove_temp_files(tmp_path)) == [".checkpoint.pt.tmp", ".summary.json.k3j2.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hydra", "checkpoint.pt", "summary.json"]
