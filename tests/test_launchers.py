"""Launcher configs (conf/hydra/launcher/): joblib and submitit_local run the jobs of a multirun in
parallel processes, slurm renders the sbatch array it would submit.

How "different processes" is checked: a `sitecustomize` module (written to a temp dir, put first on
PYTHONPATH, so every Python process of the multirun imports it at startup: the launching process,
submitit's job processes, joblib's workers) wraps Hydra's `run_job`, the function every launcher
calls to run one job, and records the pid and start/end time of each job. A launcher that silently
ran the jobs in-process, one after the other, would show the launching process's pid for every job
and intervals that do not overlap; the basic launcher is run as a control to show that the probe
tells them apart. (No Hydra callback is used for this: an entry point with an execution whitelist
would refuse a test-only callback target.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import fields
from pathlib import Path

import pytest
from conftest import CONF, TINY, TRAIN
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from hydra_plugins.hydra_joblib_launcher.config import JobLibLauncherConf
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
from omegaconf import OmegaConf

LAUNCHERS = CONF / "hydra" / "launcher"

PROBE = '''
"""Test probe from tests/test_launchers.py: records which process runs each Hydra job."""
import importlib.abc
import importlib.machinery
import json
import os
import sys
import time

_DIR = os.environ.get("NORMBENCH_PID_PROBE_DIR")


def _wrap(run_job):
    def probed_run_job(*args, **kwargs):
        config = kwargs["config"] if "config" in kwargs else args[2]
        start = time.time()
        try:
            return run_job(*args, **kwargs)
        finally:
            record = {"pid": os.getpid(), "ppid": os.getppid(), "start": start, "end": time.time(),
                      "overrides": list(config.hydra.overrides.task),
                      "output_dir": str(config.hydra.runtime.output_dir)}
            path = os.path.join(_DIR, "job-%d-%d.json" % (os.getpid(), time.monotonic_ns()))
            with open(path + ".tmp", "w") as f:
                json.dump(record, f)
            os.replace(path + ".tmp", path)
    return probed_run_job


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        module.run_job = _wrap(module.run_job)   # before any launcher does `from ... import run_job`


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "hydra.core.utils":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None:
            spec.loader = _Loader(spec.loader)
        return spec


if _DIR:
    sys.meta_path.insert(0, _Finder())
'''


def probe_env(tmp_path: Path) -> tuple[dict, Path]:
    """Environment that installs the probe, and the folder where it writes one JSON file per job."""
    probe_dir = tmp_path / "probe"
    records = tmp_path / "probe-records"
    probe_dir.mkdir(exist_ok=True)
    records.mkdir(exist_ok=True)
    (probe_dir / "sitecustomize.py").write_text(PROBE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(probe_dir), *filter(None, [env.get("PYTHONPATH")])])
    env.update(PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="1", NORMBENCH_PID_PROBE_DIR=str(records))
    return env, records


def run_multirun(args: list[str], cwd: Path, env: dict, timeout: int) -> tuple[int, str]:
    """Run `python ARGS`; returns the launching process's pid and its output (fails on error)."""
    proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"multirun timed out:\n{out[-5000:]}") from None
    assert proc.returncode == 0, out[-8000:]
    return proc.pid, out


def job_records(records: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in records.glob("job-*.json")), key=lambda r: r["start"])


def assert_separate_processes(records: Path, launcher_pid: int, n_jobs: int) -> list[dict]:
    jobs = job_records(records)
    assert len(jobs) == n_jobs, jobs
    pids = [j["pid"] for j in jobs]
    assert launcher_pid not in pids, f"jobs ran inside the launching process {launcher_pid}: {pids}"
    assert len(set(pids)) == n_jobs, f"jobs shared a process: {pids}"
    return jobs


def toy_app(tmp_path: Path, sleep_s: float) -> tuple[Path, Path]:
    """A tiny Hydra app with this repo's launcher configs: no torch, so it starts fast."""
    app_dir = tmp_path / "app"
    (app_dir / "conf" / "hydra").mkdir(parents=True)
    shutil.copytree(LAUNCHERS, app_dir / "conf" / "hydra" / "launcher")
    (app_dir / "conf" / "config.yaml").write_text("x: 0\n")
    app = app_dir / "app.py"
    app.write_text(textwrap.dedent(f"""
        import time
        import hydra

        @hydra.main(config_path="conf", config_name="config")
        def main(cfg):
            time.sleep({sleep_s})
            return float(cfg.x)

        if __name__ == "__main__":
            main()
    """))
    return app_dir, app


# --- config files vs. the plugins' schemas -------------------------------------------------------

def _compose_full(name: str, overrides: list[str]):
    with initialize_config_dir(str(CONF), job_name="launcher_test"):
        return compose(config_name="config", overrides=[f"hydra/launcher={name}", *overrides],
                       return_hydra_config=True)


@pytest.fixture(autouse=True)
def _resolvers():
    from normbench.identity import register_resolvers  # conf/config.yaml uses normbench's resolvers

    register_resolvers()


@pytest.mark.parametrize("name, schema", [("submitit_local", LocalQueueConf), ("joblib", JobLibLauncherConf)])
def test_shadowing_configs_spell_out_the_plugin_schema(name, schema):
    """These files shadow the plugins' configs of the same name, so they cannot extend them through
    a defaults list: they must carry every key of the schema, with valid types."""
    if not (CONF / "config.yaml").exists():
        pytest.skip("conf/config.yaml not written yet")
    node = _compose_full(name, []).hydra.launcher
    keys = set(node.keys())
    expected = {f.name for f in fields(schema)}
    assert keys == expected, f"missing {sorted(expected - keys)}, unknown {sorted(keys - expected)}"
    merged = OmegaConf.merge(OmegaConf.structured(schema), node)   # raises on a wrong type
    # the plugin's launcher, or normbench's subclass of it (a dead worker costs only its job)
    assert issubclass(get_class(merged._target_), get_class(schema()._target_))


def test_joblib_n_jobs_and_local_options_are_overridable():
    if not (CONF / "config.yaml").exists():
        pytest.skip("conf/config.yaml not written yet")
    assert _compose_full("joblib", ["hydra.launcher.n_jobs=5"]).hydra.launcher.n_jobs == 5
    local = _compose_full("submitit_local", ["hydra.launcher.timeout_min=5",
                                             "hydra.launcher.gpus_per_node=0"])
    assert local.hydra.launcher.timeout_min == 5 and local.hydra.launcher.gpus_per_node == 0


def test_slurm_config_renders_the_sbatch_array(tmp_path, monkeypatch):
    """Runs the real SlurmLauncher.launch up to the submission, with a fake srun on PATH, and reads
    back the sbatch script submitit would submit: every documented key reaches its #SBATCH flag."""
    if not (CONF / "config.yaml").exists():
        pytest.skip("conf/config.yaml not written yet")
    import submitit
    from hydra.core.plugins import Plugins
    from hydra.types import HydraContext
    from submitit.slurm.slurm import _make_sbatch_string

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")

    cfg = _compose_full("slurm", [
        "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=2", "hydra.launcher.cpus_per_task=6",
        "hydra.launcher.mem_gb=48", "hydra.launcher.timeout_min=90", "hydra.launcher.array_parallelism=3",
        "hydra.launcher.setup=['module load cuda','export FOO=1']", "hydra.launcher.account=lab",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ])
    # the defaults: the values documented in slurm.yaml
    defaults = _compose_full("slurm", []).hydra.launcher
    assert issubclass(get_class(defaults._target_), get_class(SlurmQueueConf._target_))
    assert defaults.gpus_per_node == 1 and defaults.array_parallelism >= 1 and defaults.timeout_min > 0
    for key in ("partition", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min", "array_parallelism",
                "setup"):
        assert key in defaults, key

    class Submitted(Exception):
        pass

    captured = {}
    real_auto = submitit.AutoExecutor

    def auto_executor(*args, **kwargs):
        executor = real_auto(*args, **kwargs)

        def map_array(fn, *iterables):
            n = len(list(zip(*iterables)))
            captured["sbatch"] = _make_sbatch_string(command="python -u -m submitit.core._submit x",
                                                     folder=executor.folder, map_count=n,
                                                     **executor._executor.parameters)
            raise Submitted

        executor.map_array = map_array
        return executor

    monkeypatch.setattr(submitit, "AutoExecutor", auto_executor)
    launcher = Plugins.instance().instantiate_launcher(
        hydra_context=HydraContext(config_loader=None, callbacks=None), task_function=lambda c: None,
        config=cfg)
    with pytest.raises(Submitted):
        launcher.launch([["norm=bn"], ["norm=ln"], ["norm=gn"], ["norm=none"], ["norm=lrn"]],
                        initial_job_idx=0)
    sbatch = captured["sbatch"]
    for flag in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2", "#SBATCH --cpus-per-task=6",
                 "#SBATCH --mem=48GB", "#SBATCH --time=90", "#SBATCH --array=0-4%3", "#SBATCH --account=lab",
                 "#SBATCH --ntasks-per-node=1"):
        assert flag in sbatch, f"{flag} not in:\n{sbatch}"
    assert "module load cuda\nexport FOO=1" in sbatch
    assert str(tmp_path / "sweep" / ".submitit") in sbatch


# --- real multiruns: a toy app (fast) ----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["submitit_local", "joblib", "basic"])
def test_toy_multirun_runs_jobs_in_parallel_processes(tmp_path, launcher):
    app_dir, app = toy_app(tmp_path, sleep_s=2.0)
    env, records = probe_env(tmp_path)
    sweep = tmp_path / "sweep"
    pid, _ = run_multirun([str(app), "-m", f"hydra/launcher={launcher}", "x=1,2", f"hydra.sweep.dir={sweep}"],
                          cwd=app_dir, env=env, timeout=300)
    if launcher == "basic":
        # control: the basic launcher runs the jobs in-process, one after the other; the probe sees it
        jobs = job_records(records)
        assert [j["pid"] for j in jobs] == [pid, pid]
        assert jobs[1]["start"] >= jobs[0]["end"]
        return
    a, b = assert_separate_processes(records, pid, 2)
    # ... and at the same time: each job sleeps 2 s, their intervals overlap
    assert b["start"] < a["end"], "the jobs ran one after the other"
    assert sorted(tuple(j["overrides"]) for j in (a, b)) == [("x=1",), ("x=2",)]
    if launcher == "submitit_local":
        job_dirs = [d for d in (sweep / ".submitit").iterdir() if d.is_dir() and d.name != "%j"]
        assert len(job_dirs) == 2, job_dirs          # one submitit job (own controller process) per run
        assert all(list(d.glob("*_result.pkl")) for d in job_dirs)


# --- real multiruns: the training entry point -----------------------------------------------------

# the tests' tiny run (small eval, one thread per job) with a wider model, 3 steps of 128 images
TRAIN_ARGS = [*TINY, "model=vgg_a_light", "model.width=0.25", "trainer.max_steps_per_epoch=3",
              "batch_size=128",
              "logger=none", "norm=none,bn"]


@pytest.mark.slow
@pytest.mark.skipif(not TRAIN.exists(), reason="bench/train.py not written yet")
@pytest.mark.parametrize("launcher", ["submitit_local", "joblib"])
def test_train_multirun_through_launcher(tmp_path, launcher):
    env, records = probe_env(tmp_path)
    env.update(WANDB_MODE="disabled")
    sweep = tmp_path / "sweep"
    pid, out = run_multirun([str(TRAIN), "-m", f"hydra/launcher={launcher}", *TRAIN_ARGS,
                             f"hydra.sweep.dir={sweep}"],
                            cwd=tmp_path, env=env, timeout=540)
    summaries = sorted(sweep.rglob("summary.json"))
    assert len(summaries) == 2, (summaries, out[-3000:])
    norms = set()
    for path in summaries:
        summary = json.loads(path.read_text())
        assert summary["status"] == "completed", summary
        norms.add(summary["choices"]["norm"])
    assert norms == {"none", "bn"}
    jobs = assert_separate_processes(records, pid, 2)
    assert {Path(j["output_dir"]).resolve() for j in jobs} == {p.parent.resolve() for p in summaries}
    if launcher == "submitit_local":
        logs = list((sweep / ".submitit").glob("*/*_log.out"))
        assert len(logs) == 2, logs
