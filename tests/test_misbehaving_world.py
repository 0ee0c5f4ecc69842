"""Nothing recorded is lost and nothing waits when the world misbehaves: single runs that share a dir (two
started in the same second, or one pointed at a finished run), W&B credentials with no server to reach.
Real processes, real W&B offline runs."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CONF, TINY, TRAIN, run_train
from hydra import compose, initialize_config_dir
from test_record_truth import tmpfs
from test_report import write_run

from normbench.job import claim_run_dir
from normbench.plan import main as plan_main
from normbench.plan import plan
from normbench.report import cli as report

SINGLE = [*TINY, "trainer.epochs=2", "logger=none"]
SWEEP_DIR = Path("multirun") / "default"
LONG = "n" * 300  # an experiment_name longer than a dir name may be


def _files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_single_runs_sharing_a_dir_each_keep_their_own_record(tmp_path, capfd):
    # two runs started in the same second resolve the same outputs/<name>/<time> dir: the same literal
    # dir makes that collision certain
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, str(TRAIN), *SINGLE, f"seed={seed}", "hydra.run.dir=out/same"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True,
                              umask=0o027)  # a team's umask: the group may read
             for seed in (1, 2)]
    outs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs
    runs = {json.loads((d / "summary.json").read_text())["identity"]: d for d in (tmp_path / "out").iterdir()}
    assert len(runs) == 2 and tmp_path / "out" / "same" in runs.values()
    for identity, run_dir in runs.items():
        epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert epochs == [1, 2]
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
        assert run_dir.name in ("same", f"same.{identity}")
        modes = {p.name: p.stat().st_mode & 0o777 for p in run_dir.iterdir() if p.is_file()}
        assert set(modes.values()) == {0o640}, modes  # the record as the user's umask says, not 0600
    warnings = [line for _, err in outs for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "out/same is in use by another run: this run is recorded in" in warnings[0]

    # a third run pointed at a completed run of another identity: a sibling dir, one warning, the
    # completed record (and Hydra's .hydra/ files in it) untouched
    done = tmp_path / "out" / "same"
    before, owner = _files(done), json.loads((done / "summary.json").read_text())["identity"]
    proc = run_train([*SINGLE, "seed=3", f"hydra.run.dir={done}"], tmp_path)
    (new,) = set((tmp_path / "out").iterdir()) - set(runs.values())
    identity = json.loads((new / "summary.json").read_text())["identity"]
    assert new.name == f"same.{identity}" and identity not in runs
    assert [line for line in proc.stderr.splitlines() if "warning" in line] == [
        f"normbench: warning: {done} holds the record of run {owner}: this run is recorded in {new}"]
    assert _files(done) == before
    # the same identity again, pointed at its own completed record: beside it, too
    with initialize_config_dir(config_dir=str(CONF)):
        cfg = compose("config", [*SINGLE, "seed=3", f"hydra.run.dir={new}"], return_hydra_config=True)
    claim_run_dir(cfg)
    assert cfg.hydra.run.dir == f"{new}.{identity}"
    assert "holds the completed record of this run" in capfd.readouterr().err


@pytest.mark.slow
def test_wandb_credentials_but_no_server_logs_offline_without_waiting(tmp_path, wandb_env, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")  # logger.mode=auto decides
    with socket.create_server(("127.0.0.1", 0)) as server:
        url = f"http://127.0.0.1:{server.getsockname()[1]}"  # closed once the block ends
    start = time.perf_counter()
    proc = run_train([*TINY, "hydra.run.dir=run"], tmp_path,
                     env_extra={"WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": url})
    elapsed = time.perf_counter() - start
    assert [line for line in proc.stderr.splitlines() if "warning" in line] == [
        (f"normbench: warning: W&B credentials are configured but {url} is not reachable ([Errno 111] "
         "Connection refused): logging offline (`wandb sync` uploads the run later)")]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["wandb_url"] is None
    assert Path(summary["wandb_dir"]).name.startswith("offline-run-") and elapsed < 60


def _held_run(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """A single run held at epoch 2 (the `wait` fault), in its own process group, like a terminal's."""
    tmp_path.mkdir()
    release = tmp_path / "release"
    proc = subprocess.Popen([sys.executable, str(TRAIN), *SINGLE, "hydra.run.dir=run", "+trainer.fault=wait",
                             "+trainer.fault_epoch=2", f"+trainer.fault_file={release}"],
                            cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not Path(f"{release}.waiting").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    return proc, tmp_path / "run"


@pytest.mark.slow
def test_sighup_is_an_interrupt_and_ctrl_c_mashed_still_ends_in_130_with_its_closing_line(tmp_path):
    proc, run_dir = _held_run(tmp_path / "hup")  # the terminal is closed
    os.killpg(proc.pid, signal.SIGHUP)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 129 and "Traceback" not in err, err
    assert err.splitlines()[-1] == "normbench: interrupted by SIGHUP; run the same command to continue"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["error"] == "interrupted by SIGHUP"

    proc, run_dir = _held_run(tmp_path / "int")
    while proc.poll() is None:  # Ctrl-C, again and again until the process is gone
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.02)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.splitlines()[-1] == "normbench: interrupted by SIGINT; run the same command to continue"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"


@contextlib.contextmanager
def read_only_mount(path: Path):
    """`path` as a read-only bind mount of itself (needs root)."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot bind-mount here (needs root): {proc.stderr.strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.slow
def test_a_report_out_that_cannot_be_written_is_one_line_naming_path_and_errno(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for seed in (0, 1, 2):
        write_run(sweep, experiment="x", choices={"model": "vgg_a", "norm": "bn", "seed": seed}, test_acc=0.8,
                  filters=True)
    (tmp_path / "a-file").write_text("")

    def report_into(out: Path, errno: str) -> None:
        assert report.main([str(sweep), "--out", str(out)]) == 1
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(f"normbench: cannot write the report in {out}: {out}"), err
        assert err[0].endswith(f"[Errno {errno}")

    report_into(tmp_path / "a-file", "20] Not a directory")
    with read_only_mount(tmp_path / "ro") as ro:
        report_into(ro / "report", "30] Read-only file system")
    with tmpfs(tmp_path / "full", "48k") as full:
        report_into(full / "report", "28] No space left on device")
        assert list(full.rglob("*.tmp")) == []
    assert report.main([str(sweep), "--out", str(tmp_path / "fine")]) == 0  # the same records, a usable --out


ALIAS_BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))


def _hostile_sweep_dir(sweep: Path) -> dict[str, Path]:
    """A sweep dir whose files a hostile or broken world left: a FIFO named summary.json, a summary.json
    nested 200,000 deep (in the dir the next job uses), a symlink to /dev/zero, a YAML alias bomb as a
    record's config.yaml, a FIFO as a record's metrics.jsonl."""
    bad = {"fifo": sweep / "fifo" / "summary.json", "deep": sweep / "job" / "summary.json",
           "zero": sweep / "zero" / "summary.json"}
    for path in bad.values():
        path.parent.mkdir(parents=True)
    os.mkfifo(bad["fifo"])
    bad["deep"].write_text("[" * 200_000 + "]" * 200_000)
    bad["zero"].symlink_to("/dev/zero")
    for seed in (0, 1):
        write_run(sweep / "records", experiment="default",
                  choices={"model": "vgg_a", "norm": "bn", "seed": seed}, test_acc=0.8)
    bad["bomb"] = sweep / "records" / "0" / "config.yaml"
    bad["bomb"].write_text(ALIAS_BOMB)
    bad["metrics"] = sweep / "records" / "1" / "metrics.jsonl"
    bad["metrics"].unlink()
    os.mkfifo(bad["metrics"])
    return bad


@pytest.mark.slow
def test_hostile_files_in_a_sweep_dir_are_named_and_skipped_never_hang(tmp_path, capsys, monkeypatch):
    bad = _hostile_sweep_dir(tmp_path / "multirun" / "default")
    # the sweep: its index is built by a scan of every record, and its job's dir holds the deep file
    proc = run_train(["-m", *SINGLE, "hydra.sweep.subdir=job"], tmp_path, timeout=240)
    assert "Traceback" not in proc.stderr and "1 completed" in proc.stdout, proc.stderr[-3000:]
    warned = [line for line in proc.stderr.splitlines() if line.startswith("normbench: warning:")]
    for name in ("fifo", "deep", "zero"):
        assert any(str(bad[name]) in line for line in warned), (name, warned)
    (record,) = (tmp_path / "multirun" / "default").glob("job.*/summary.json")  # beside the unreadable one
    assert json.loads(record.read_text())["status"] == "completed"
    # the report: every hostile file named, the rest reported
    monkeypatch.chdir(tmp_path)
    assert report.main(["multirun/default", "--out", str(tmp_path / "report")]) == 0
    html = (tmp_path / "report" / "index.html").read_text()
    for name in ("fifo", "deep", "zero"):  # listed among the skipped records, with the file and why
        assert f"<code>{bad[name].parent}</code></td><td>malformed</td><td>{bad[name].name}" in html, name
    assert f"{bad['bomb'].parent}: config.yaml cannot be read (it has YAML aliases" in html
    assert f"{bad['metrics'].parent}: metrics.jsonl has 1 malformed line(s), ignored" in html
    # the plan, with no index to go by, scans the same dir
    shutil.rmtree(tmp_path / "multirun" / "default" / ".normbench" / "index")
    capsys.readouterr()
    out = io.StringIO()
    assert plan(["-m", *SINGLE, "hydra.sweep.subdir=job"], config_dir=CONF, out=out) == 0
    assert "1 run, 1 done (1 completed), 0 to run" in out.getvalue()
    warned = capsys.readouterr().err
    assert all(str(bad[name]) in warned for name in ("fifo", "deep", "zero")), warned

    # a damaged index entry: the plan predicts the skip the sweep then makes (from the record)
    identity = json.loads(record.read_text())["identity"]
    entry = tmp_path / "multirun" / "default" / ".normbench" / "index" / f"{identity}.json"
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.write_text(json.dumps({"identity": identity, "dir": 123, "status": "running"}))
    out = io.StringIO()
    assert plan(["-m", *SINGLE, "hydra.sweep.subdir=job"], config_dir=CONF, out=out) == 0
    assert "1 run, 1 done (1 completed), 0 to run" in out.getvalue()
    again = run_train(["-m", *SINGLE, "hydra.sweep.subdir=job"], tmp_path, timeout=240)
    assert "0 completed / 0 diverged / 0 failed / 0 pruned / 1 skipped" in again.stdout, again.stderr[-2000:]


@pytest.mark.parametrize("override,line", [
    ("batch_size=abc", "normbench: bad value batch_size='abc'"),
    ("experiment_name=../x", "normbench: bad value experiment_name='../x': must be one dir name"),
    (f"experiment_name={LONG}", f"normbench: bad value experiment_name='{LONG}': is 300 bytes long"),
])
def test_the_plan_refuses_what_train_refuses_in_the_same_line(override, line, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        plan_main(["-m", *SINGLE, override], config_dir=CONF)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(line), err
    assert not (tmp_path / "multirun").exists()  # nothing written


def test_a_too_long_experiment_name_is_one_line_before_any_dir(tmp_path):
    proc = run_train([*SINGLE, f"experiment_name={LONG}"], tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [(
        f"normbench: bad value experiment_name='{LONG}': is 300 bytes long: at most 255, since it becomes "
        "a dir name, e.g. experiment_name=bn_vs_gn")], proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_record_with_accuracies_outside_0_1_is_skipped_by_the_report_in_one_line(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for seed, acc in ((0, 0.8), (1, 0.81), (2, 87.5)):  # a percentage where a fraction belongs
        write_run(sweep, experiment="x", choices={"model": "vgg_a", "norm": "bn", "seed": seed}, test_acc=acc)
    assert report.main([str(sweep), "--out", str(tmp_path / "report")]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [(f"normbench: warning: {sweep / '2' / 'summary.json'} is skipped "
                                 "(summary.json metrics['test/acc'] is 87.5, not an accuracy in [0, 1])")]
    assert "read 3 run records" in out and "skipped 1 (1 malformed)" in out
    assert "| BN | 2 | 19.50 (20.00, 19.00) |" in (tmp_path / "report" / "report.md").read_text()  # 2 seeds


@pytest.mark.slow
def test_garbage_in_a_completed_summary_is_kept_aside_with_one_warning_and_the_run_re_finished(tmp_path):
    run_train(["-m", *SINGLE], tmp_path)
    (summary,) = (tmp_path / "multirun" / "default").glob("*/summary.json")
    garbage = b"\x00\x17garbage{" * 10
    summary.write_bytes(garbage)
    proc = run_train(["-m", *SINGLE], tmp_path)
    warned = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert len(warned) == 1 and warned[0].startswith(f"normbench: warning: {summary} cannot be read (")
    (kept,) = summary.parent.glob("summary.json.damaged-*")
    assert warned[0].endswith(f"; kept as {kept.name}, this run's record is written anew")
    assert kept.read_bytes() == garbage  # what was there is not lost
    assert json.loads(summary.read_text())["status"] == "completed"
    assert "resuming" in proc.stdout  # from its last checkpoint: not trained again


@pytest.mark.slow
@pytest.mark.parametrize("launcher, sig", [("joblib", signal.SIGKILL), ("joblib", signal.SIGTERM),
                                           ("submitit_local", signal.SIGKILL)],
                         ids=["joblib-SIGKILL", "joblib-SIGTERM", "submitit_local-SIGKILL"])
def test_a_dead_joblib_or_submitit_worker_costs_only_its_own_job(tmp_path, launcher, sig):
    # three jobs (joblib: on two workers; submitit: each its own process); the one that waits at epoch 2
    # has its worker killed there (the out-of-memory killer's SIGKILL, or a SIGTERM sent to that process)
    release = tmp_path / "never"
    workers = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else ["hydra.launcher.gpus_per_node=0"]
    args = ["-m", *SINGLE, f"hydra/launcher={launcher}", *workers, "+trainer.fault=wait",
            "+trainer.fault_epoch=2,8,9", f"+trainer.fault_file={release}"]
    proc = subprocess.Popen([sys.executable, str(TRAIN), *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 180
    while not Path(f"{release}.waiting").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    worker = int(Path(f"{release}.waiting").read_text().split()[0])
    os.kill(worker, sig)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    summaries = [json.loads(p.read_text()) for p in (tmp_path / SWEEP_DIR).glob("*/summary.json")]
    (killed,) = [s for s in summaries if s["pid"] == worker]
    others = [s for s in summaries if s["pid"] != worker]
    assert [s["status"] for s in others] == ["completed", "completed"], err[-3000:]
    closing = out.splitlines()[-1]
    if sig == signal.SIGKILL:  # submitit's local job, whose process was killed, ends without a result
        job_id = re.search(r"submitit job (\S+) ", killed["error"])
        cause = "SIGKILL" if launcher == "joblib" else f"submitit job {job_id[1]} finished without a result"
        assert launcher == "joblib" or (tmp_path / SWEEP_DIR / ".submitit" / job_id[1]).is_dir()
        assert killed["status"] == "failed" and killed["error"] == f"its worker process died ({cause})"
        assert closing == "sweep multirun/default: 2 completed / 0 diverged / 1 failed / 0 pruned / 0 skipped"
        assert f"normbench: job 0 failed: its worker process died ({cause}) -- recorded in" in err
    else:
        assert killed["status"] == "interrupted" and killed["error"] == "interrupted by SIGTERM"
        assert closing == ("sweep multirun/default: 2 completed / 0 diverged / 0 failed / 0 pruned / "
                           "0 skipped / 1 interrupted")


@pytest.mark.slow
def test_a_run_dir_on_a_read_only_mount_fails_its_job_in_one_line_and_the_sweep_goes_on(tmp_path):
    args = ["-m", *SINGLE, "norm=none,bn,gn", "hydra.sweep.subdir=job${hydra.job.num}"]
    with read_only_mount(tmp_path / SWEEP_DIR / "job1") as ro:  # where Hydra puts the second job
        proc = run_train(args, tmp_path)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == ("sweep multirun/default: "
                                            "2 completed / 0 diverged / 1 failed / 0 pruned / 0 skipped")
    assert [line for line in proc.stderr.splitlines() if line.startswith("normbench:")] == [
        (f"normbench: job 1 failed: OSError: [Errno 30] Read-only file system: '{ro / '.hydra'}' -- its "
         "record could not be written (OSError: Read-only file system), the sweep goes on")]
    for job in ("job0", "job2"):
        assert json.loads((tmp_path / SWEEP_DIR / job / "summary.json").read_text())["status"] == "completed"
        assert (tmp_path / SWEEP_DIR / job / "train.log").stat().st_size > 0
        assert "- norm=" in (tmp_path / SWEEP_DIR / job / ".hydra" / "overrides.yaml").read_text()


@pytest.mark.slow
def test_a_failed_job_ends_the_sweep_non_zero_only_when_max_failure_rate_asks(tmp_path):
    rate = "hydra.callbacks.sweep_summary.max_failure_rate"
    bad = run_train(["-m", *SINGLE, f"{rate}=2"], tmp_path, check=False)
    assert bad.returncode == 2 and bad.stderr.strip() == (f"normbench: bad value {rate}=2: a share of the "
                                                          "jobs, from 0 (any failure) to 1 (never)")
    assert not (tmp_path / "multirun").exists()
    args = ["-m", *SINGLE, "+trainer.fault=raise", "+trainer.fault_epoch=1,9"]  # the first job fails
    default = run_train(args, tmp_path)  # exit 0: the default, 1.0, never ends a sweep
    assert default.stdout.splitlines()[-1] == ("sweep multirun/default: "
                                               "1 completed / 0 diverged / 1 failed / 0 pruned / 0 skipped")
    strict = run_train([*args, f"{rate}=0"], tmp_path, check=False)  # the failed job runs again
    assert strict.returncode == 1, strict.stderr[-3000:]
    assert strict.stdout.splitlines()[-1] == ("sweep multirun/default: "
                                              "0 completed / 0 diverged / 1 failed / 0 pruned / 1 skipped")
    assert strict.stderr.splitlines()[-1] == f"normbench: 1 of 1 jobs failed, more than {rate}=0"
