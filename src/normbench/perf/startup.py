"""Section ``fixed_cost``: process start to the first finished training step of ``bench/train.py`` with
tiny settings (logger=none), against bare ``python -c "import torch"`` and against a minimal PyTorch
training process (import torch, build an SGD optimizer, one step); and the per-job cost in a sequential
multirun of tiny jobs.

The first-step time comes from the run record, not from a hook in the loop: the tiny runs train one step
per epoch (``trainer.max_steps_per_epoch=1``) and log every step (``trainer.log_every_steps=1``), so the
record's ``steps.jsonl`` is written exactly once, at the logging point right after the first step (its
one device sync); the file's modification time is that moment. The minimal reference script is not
normbench's loop and writes its own timestamp.
"""

from __future__ import annotations

import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from normbench.perf.common import PerfPaths, PerfSettings, alternate, child_env, paired_ratio
from normbench.record import STEPS, read_rows

# The tests' tiny run (conf/debug/quick.yaml on small synthetic data, as tests/conftest.py's TINY) with one
# training step per epoch and a logging point after every step: steps.jsonl is written once, after step 1.
TINY = ["data=synthetic", "data.num_train=512", "data.num_test=128", "+debug=quick",
        "trainer.max_steps_per_epoch=1", "trainer.log_every_steps=1", "logger=none"]
# A minimal PyTorch training process; appends the time of its first step to the file named by argv[1].
MINIMAL_TORCH = ("import sys, time, torch\n"
                 "m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(),\n"
                 "                        torch.nn.Linear(8 * 30 * 30, 10))\n"
                 "o = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)\n"
                 "x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))\n"
                 "torch.nn.functional.cross_entropy(m(x), y).backward(); o.step()\n"
                 "open(sys.argv[1], 'a').write(f'{time.time()}\\n')\n")


# bench/train.py run with timestamps at the phases of its start-up: argv = start time, output file, the
# training script, its arguments. The phases are marked by wrapping two functions the job calls (this is
# the benchmark's instrumentation; the product has no timing hooks).
BREAKDOWN = ("import sys, time, json, runpy\n"
             "start, out, train = float(sys.argv[1]), sys.argv[2], sys.argv[3]\n"
             "marks = []\n"
             "mark = lambda name: marks.append((name, time.time() - start))\n"
             "import torch; mark('import torch')\n"
             "import hydra, omegaconf; mark('import hydra, omegaconf')\n"
             "import normbench.job, normbench.run; mark('import normbench')\n"
             "def traced(module, name, before, after):\n"
             "    fn = getattr(module, name)\n"
             "    def wrapper(*a, **k):\n"
             "        if before: mark(before)\n"
             "        result = fn(*a, **k); mark(after); return result\n"
             "    setattr(module, name, wrapper)\n"
             "traced(normbench.job, 'run_job', 'Hydra composed the config, run_job entered', 'run ended')\n"
             "traced(normbench.run, 'load_data', 'config printed, validated', 'data on the device')\n"
             "traced(normbench.run, 'build_model', 'memory baseline (imports torch._dynamo)', 'model built')\n"
             "traced(normbench.run, 'build_optimizer', None, 'optimizer, scheduler built')\n"
             "sys.argv = sys.argv[3:]\n"
             "try:\n"
             "    runpy.run_path(train, run_name='__main__')\n"
             "finally:\n"
             "    open(out, 'w').write(json.dumps(marks))\n")


def run_process(cmd: list[str], cwd: Path, timeout: float = 600) -> float:
    """Run `cmd` to its end; its wall-clock seconds. Raises RuntimeError when it fails."""
    start = time.time()
    proc = subprocess.run(cmd, check=False, cwd=cwd, env=child_env(), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return time.time() - start


def first_step_time(run_dir: Path) -> float:
    """Unix time at which the run in `run_dir` finished its first training step: the modification time
    of its steps.jsonl, which a run with the TINY settings writes exactly once, right after step 1."""
    path = Path(run_dir) / STEPS
    if not path.exists():
        raise RuntimeError(f"{run_dir} has no {STEPS}: the run recorded no training step")
    mtime = path.stat().st_mtime
    rows = read_rows(path)
    if [row.get("step") for row in rows] != [1]:
        raise RuntimeError(f"{path} holds steps {[row.get('step') for row in rows]}, expected exactly [1] "
                           "(one step per epoch, logged at every step)")
    return mtime


def _single_runs(s: PerfSettings, train: Path, device_arg: list[str], workdir: Path) -> dict:
    """Alternating rounds of: bare `import torch`, the minimal script, one tiny bench/train.py run."""
    py = sys.executable
    counter = itertools.count()
    totals: list[float] = []

    def bare() -> float:
        return run_process([py, "-c", "import torch"], workdir)

    def minimal() -> float:
        marker = workdir / f"first-step-minimal-{next(counter)}.txt"
        start = time.time()
        run_process([py, "-c", MINIMAL_TORCH, str(marker)], workdir)
        return float(marker.read_text().split()[0]) - start

    def first_step() -> float:
        run_dir = workdir / f"run-{next(counter)}"
        start = time.time()
        totals.append(run_process([py, str(train), *TINY, *device_arg, f"hydra.run.dir={run_dir}"], workdir))
        return first_step_time(run_dir) - start

    res = alternate({"bare": bare, "minimal": minimal, "first_step": first_step}, s.startup_rounds, warmup=0)
    return {
        "bare_import_torch_s": statistics.median(res["bare"]),
        "minimal_torch_step_s": statistics.median(res["minimal"]),
        "first_step_s": statistics.median(res["first_step"]),
        "tiny_run_total_s": statistics.median(totals),
        "ratio": paired_ratio(res["first_step"], res["bare"]),
        "ratio_vs_minimal": paired_ratio(res["first_step"], res["minimal"]),
        "rounds": s.startup_rounds, "runs": res, "tiny_overrides": TINY + device_arg,
    }


def startup_breakdown(train: Path, device_arg: list[str], workdir: Path) -> list[dict]:
    """One tiny run's start-up, phase by phase: seconds from process start to the end of each phase, and
    each phase's own share."""
    run_dir, marks_file = workdir / "run-breakdown", workdir / "breakdown.json"
    start = time.time()
    run_process([sys.executable, "-c", BREAKDOWN, str(start), str(marks_file), str(train), *TINY, *device_arg,
                 f"hydra.run.dir={run_dir}"], workdir)
    marks = [*json.loads(marks_file.read_text()), ("first training step done", first_step_time(run_dir) - start)]
    marks = sorted((m for m in marks if m[0] != "run ended"), key=lambda m: m[1])
    rows, previous = [], 0.0
    for name, at in marks:
        rows.append({"phase": name, "at_s": at, "phase_s": at - previous})
        previous = at
    return rows


def _multirun(s: PerfSettings, train: Path, device_arg: list[str], workdir: Path, bare_s: float) -> dict:
    """N tiny jobs in one sequential multirun (basic launcher); a job's cost = the gap between consecutive
    jobs' first steps (each job's steps.jsonl)."""
    sweep = workdir / "sweep"
    seeds = ",".join(str(i) for i in range(s.multirun_jobs))
    start = time.time()
    wall = run_process([sys.executable, str(train), "-m", *TINY, *device_arg, f"seed={seeds}",
                        f"hydra.sweep.dir={sweep}", "experiment_name=perf"], workdir)
    stamps = sorted(first_step_time(path.parent) for path in sweep.rglob(STEPS))
    if len(stamps) != s.multirun_jobs:
        raise RuntimeError(f"multirun of {s.multirun_jobs} jobs left {len(stamps)} records with {STEPS} in {sweep}")
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    per_job = statistics.median(gaps) if gaps else float("nan")
    return {"jobs": s.multirun_jobs, "wall_s": wall, "first_step_s": stamps[0] - start if stamps else None,
            "per_job_s": per_job, "gaps_s": gaps, "per_job_over_bare": per_job / bare_s}


def bench_fixed_cost(s: PerfSettings, paths: PerfPaths, device: torch.device, workdir: Path) -> dict:
    train = paths.train_script
    if train is None or not Path(train).exists():
        return {"skipped": f"{train or 'bench/train.py'} not found"}
    device_arg = [f"trainer.device={device}"]
    out = _single_runs(s, Path(train), device_arg, workdir)
    out["breakdown"] = startup_breakdown(Path(train), device_arg, workdir)
    out["multirun"] = _multirun(s, Path(train), device_arg, workdir, out["bare_import_torch_s"])
    return out
