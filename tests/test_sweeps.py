"""Grid sweeps end to end, through real `bench/train.py -m` subprocesses on tiny synthetic runs: a preset's
grid completes, re-running skips by identity without touching finished records, the planning command's
numbers before and after a partial sweep, failure isolation (an injected exception, an injected real
out-of-memory, a real divergence), median-stopping pruning, a zero-run sweep, and joblib jobs running in
parallel processes with their share of the CPU."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from conftest import CONF, ROOT, TINY, run_train

from normbench.plan import plan

BASE = [*TINY, "logger=none"]


def sweep_line(proc) -> str:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("sweep ")]
    assert len(lines) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    return lines[0]


def records(sweep_dir: Path) -> dict[str, dict]:
    """Every summary.json under the sweep dir, by run dir name (all must parse)."""
    found = {}
    for path in sweep_dir.rglob("summary.json"):
        found[path.parent.name] = json.loads(path.read_text())
    return found


def fault_of(record: dict) -> str:
    return next(o for o in record["overrides"] if o.startswith("+trainer.fault="))


def plan_output(args: list[str], cwd: Path, monkeypatch) -> str:
    monkeypatch.chdir(cwd)
    out = io.StringIO()
    assert plan(args, config_dir=CONF, out=out) == 0
    return out.getvalue()


@pytest.mark.slow
def test_preset_grid_completes_reruns_skip_and_plan_counts(tmp_path, monkeypatch):
    preset = ["+experiment=vgg_dropout", *BASE]
    sweep_dir = tmp_path / "multirun" / "vgg_dropout"

    before = plan_output(["-m", *preset], tmp_path, monkeypatch)
    assert "plan multirun/vgg_dropout: 4 runs, 0 done, 4 to run" in before
    assert "estimated time left: unknown" in before

    # a partial sweep: the command line narrows the preset's grid to half of it
    proc = run_train(["-m", *preset, "model.dropout=0.0"], tmp_path)
    assert sweep_line(proc) == ("sweep multirun/vgg_dropout: 2 completed / 0 diverged / 0 failed / "
                                "0 pruned / 0 skipped")
    partial = records(sweep_dir)
    assert len(partial) == 2 and all(r["status"] == "completed" for r in partial.values())

    middle = plan_output(["-m", *preset], tmp_path, monkeypatch)
    assert "4 runs, 2 done (2 completed), 2 to run" in middle
    assert "estimated time left: 0:00:" in middle and "mean of 2 finished runs" in middle

    # the whole preset: the two finished runs are skipped by identity, the other two run
    proc = run_train(["-m", *preset], tmp_path)
    assert sweep_line(proc).endswith("2 completed / 0 diverged / 0 failed / 0 pruned / 2 skipped")
    full = records(sweep_dir)
    assert len(full) == 4 and all(r["status"] == "completed" for r in full.values())
    assert {(r["choices"]["norm"], r["choices"]["dropout"]) for r in full.values()} == {
        ("none", 0.0), ("bn", 0.0), ("none", 0.5), ("bn", 0.5)}
    assert len({r["identity"] for r in full.values()}) == 4
    for name, record in partial.items():
        assert full[name] == record  # untouched, finished_at included
    # the run records' files (Hydra's own .hydra/, job log and multirun.yaml are Hydra's to rewrite)
    mtimes = {p: p.stat().st_mtime_ns for run in sweep_dir.glob("*/summary.json")
              for p in run.parent.iterdir()
              if p.is_file() and p.name != "train.log"}
    assert len(mtimes) >= 4 * 5

    # the same command again: everything is skipped and no record file is rewritten
    proc = run_train(["-m", *preset], tmp_path)
    assert sweep_line(proc).endswith("0 completed / 0 diverged / 0 failed / 0 pruned / 4 skipped")
    assert proc.stdout.count("normbench: skipped") == 4
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert records(sweep_dir) == full

    after = plan_output(["-m", *preset], tmp_path, monkeypatch)
    assert "4 runs, 4 done (4 completed), 0 to run" in after
    assert "estimated time left: none" in after
    # adding seeds: the seed-0 runs are the ones already done
    seeded = plan_output(["-m", *preset, "seed=0,1"], tmp_path, monkeypatch)
    assert "8 runs, 4 done (4 completed), 4 to run" in seeded


@pytest.mark.slow
def test_failures_are_recorded_and_the_sweep_goes_on(tmp_path):
    """2 learning rates (one diverges for real) x 3 faults (none, an exception, a real failed
    allocation), the faults in epoch 2 after epoch 1 was checkpointed."""
    proc = run_train(["-m", *BASE, "norm=none", "trainer.epochs=2", "optimizer.lr=0.01,1e4",
                      "+trainer.fault=none,raise,oom", "+trainer.fault_epoch=2"], tmp_path)
    # lr 1e4 makes the loss non-finite within epoch 1, before the epoch-2 faults fire: 3 diverged
    assert sweep_line(proc) == ("sweep multirun/default: 1 completed / 3 diverged / 2 failed / "
                                "0 pruned / 0 skipped")
    found = {(r["choices"]["lr"], fault_of(r)): r for r in records(tmp_path / "multirun").values()}
    assert len(found) == 6
    ok, boom, oom = (found[(0.01, f"+trainer.fault={k}")] for k in ("none", "raise", "oom"))
    assert ok["status"] == "completed" and ok["epochs_done"] == 2
    assert boom["status"] == "failed" and boom["error_type"] == "RuntimeError"
    assert "fault injected by trainer.fault=raise at epoch 2, step 1" in boom["error"]
    assert boom["epochs_done"] == 1 and boom["finished_at"]
    assert oom["status"] == "failed" and oom["error_type"] == "OutOfMemoryError"
    assert "MemoryError" in oom["error"] and "trainer.fault=oom" in oom["error"]
    diverged = found[(1e4, "+trainer.fault=none")]
    assert diverged["status"] == "diverged" and diverged["diverged_epoch"] == 1
    assert diverged["objective"] == 1.0
    assert {found[(1e4, f"+trainer.fault={k}")]["status"] for k in ("raise", "oom")} == {"diverged"}
    assert "the sweep goes on" in proc.stderr
    # a single (non -m) run that raises is recorded, then exits non-zero
    single = run_train([*BASE, "+trainer.fault=raise", "hydra.run.dir=single"], tmp_path, check=False)
    assert single.returncode not in (0, 2)
    summary = json.loads((tmp_path / "single" / "summary.json").read_text())
    assert summary["status"] == "failed" and "trainer.fault=raise" in summary["error"]


@pytest.mark.slow
def test_median_pruning_stops_a_clearly_worse_run(tmp_path):
    """Sequential jobs: two good learning rates finish, then a useless one (lr 1e-6) is compared with
    them from epoch 2 and stopped."""
    args = ["-m", *BASE, "norm=bn", "batch_size=32", "trainer.max_steps_per_epoch=12", "trainer.epochs=3",
            "optimizer.lr=0.05,0.02,1e-6", "pruning=median", "pruning.min_runs=2", "pruning.warmup_epochs=1"]
    proc = run_train(args, tmp_path)
    assert sweep_line(proc).endswith("2 completed / 0 diverged / 0 failed / 1 pruned / 0 skipped")
    by_lr = {r["choices"]["lr"]: r for r in records(tmp_path / "multirun").values()}
    assert by_lr[0.05]["status"] == by_lr[0.02]["status"] == "completed"
    pruned = by_lr[1e-6]
    assert pruned["status"] == "pruned" and pruned["epochs_done"] < 3
    assert pruned["pruning"]["peers"] == 2 and pruned["pruning"]["best_error"] > pruned["pruning"]["median"]
    lines = (tmp_path / "multirun" / "default").glob("*/metrics.jsonl")
    assert sorted(len(p.read_text().splitlines()) for p in lines) == [pruned["epochs_done"], 3, 3]
    # pruning is not part of a run's identity: without it (the default) the re-run skips the two
    # completed runs and continues the pruned one from its checkpoint to the end
    rerun = run_train([a for a in args if not a.startswith("pruning")], tmp_path)
    assert sweep_line(rerun).endswith("1 completed / 0 diverged / 0 failed / 0 pruned / 2 skipped")
    resumed = next(r for r in records(tmp_path / "multirun").values() if r["choices"]["lr"] == 1e-6)
    assert resumed["status"] == "completed" and resumed["resumed_from_epoch"] == pruned["epochs_done"]
    run_dir = next(p.parent for p in (tmp_path / "multirun").rglob("summary.json")
                   if json.loads(p.read_text())["choices"]["lr"] == 1e-6)
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


@pytest.mark.slow
def test_zero_run_sweep_says_so(tmp_path, monkeypatch):
    proc = run_train(["-m", *BASE, "seed=range(0,0)"], tmp_path)
    assert sweep_line(proc) == ("sweep multirun/default: no runs "
                                "(the sweep expands to zero jobs; nothing was launched)")
    assert plan_output(["-m", *BASE, "seed=range(0,0)"], tmp_path, monkeypatch).strip() == (
        "plan multirun/default: the sweep expands to zero runs; nothing to do")


@pytest.mark.slow
def test_joblib_jobs_run_in_parallel_with_their_share_of_the_cpu(tmp_path):
    """hydra/launcher=joblib n_jobs=2: two worker processes at once, each with cores // 2 threads
    (trainer.threads=0 means: split the cores between the jobs)."""
    args = ["-m", *BASE, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "trainer.threads=0",
            # runs of a few seconds, so that they overlap even when one worker starts a little later
            "norm=none,bn", "batch_size=32", "trainer.max_steps_per_epoch=24", "trainer.epochs=3"]
    proc = run_train(args, tmp_path)
    assert sweep_line(proc).endswith("2 completed / 0 diverged / 0 failed / 0 pruned / 0 skipped")
    runs = list(records(tmp_path / "multirun").values())
    assert len(runs) == 2
    assert len({r["pid"] for r in runs}) == 2
    first, second = sorted(runs, key=lambda r: r["started_ts"])
    assert second["started_ts"] < first["finished_ts"], "the two jobs did not overlap in time"
    cores = len(os.sched_getaffinity(0))
    assert [r["threads"] for r in runs] == [max(1, cores // 2)] * 2
    assert {r["job_num"] for r in runs} == {0, 1}
    assert all(r["device"] == "cpu" for r in runs)


@pytest.mark.parametrize("n_gpus, job, expected", [(1, 3, "cuda"), (4, 0, "cuda:0"), (4, 5, "cuda:1")])
def test_job_number_picks_the_gpu(monkeypatch, n_gpus, job, expected):
    import torch

    from normbench import device as app

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n_gpus)
    expected_device = expected if n_gpus > 1 else "auto"  # one GPU: every job keeps auto (shares it)
    assert app.placement("auto", 0, job, 1) == (expected_device, 0)
    assert app.placement("cuda:2", 0, job, 1)[0] == "cuda:2"  # an explicit device is kept
    assert app.placement("auto", 0, None, 1)[0] == "auto"      # a single run is not placed
    monkeypatch.setattr(app, "cpu_count", lambda: 16)
    assert app.placement("cpu", 0, job, 4) == ("cpu", 4)
    assert app.placement("cpu", 2, job, 4) == ("cpu", 2)


@pytest.mark.slow
def test_each_job_config_is_composed_once_and_is_the_jobs_own(tmp_path):
    """Hydra's sweeper checks a batch by composing every job, and the basic launcher composed each again;
    normbench's basic sweeper hands its composition on: a traced multirun of four jobs composes four
    configs, and each job still runs its own (its record holds its seed and batch size)."""
    from normbench.perf.phases import COMPOSE, trace

    sweep = tmp_path / "sweep"
    events = trace(ROOT / "bench" / "train.py", ["-m", *BASE, "seed=0,1", "batch_size=8,16",
                                                  f"hydra.sweep.dir={sweep}"], tmp_path)
    assert sum(e[0] == COMPOSE for e in events) == 4
    configs = sorted((read_yaml(p)["seed"], read_yaml(p)["batch_size"]) for p in sweep.rglob("config.yaml")
                     if p.parent.name != ".hydra")
    assert configs == [(0, 8), (0, 16), (1, 8), (1, 16)]
    hydra = read_yaml(next(sweep.rglob(".hydra/hydra.yaml")))["hydra"]
    assert hydra["sweeper"]["_target_"].endswith("ComposeOnceBasicSweeper")


def read_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())
