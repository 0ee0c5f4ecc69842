"""Section ``fixed_cost``: process start to the first finished training step of a tiny ``bench/train.py``
run against bare ``import torch`` and a minimal PyTorch training process, and its start-up phase by phase.
The first step's time is read from the run record (docs/PERFORMANCE.md says why that is exact)."""

from __future__ import annotations

import functools
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

from normbench.perf.common import PerfPaths, PerfSettings, alternate, paired_ratio, run_process
from normbench.perf.phases import timeline, trace
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

    bare = functools.partial(run_process, [py, "-c", "import torch"], workdir)
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


def bench_fixed_cost(s: PerfSettings, paths: PerfPaths, device: torch.device, workdir: Path) -> dict:
    train = paths.train_script
    if train is None or not Path(train).exists():
        return {"skipped": f"{train or 'bench/train.py'} not found"}
    device_arg = [f"trainer.device={device}"]
    out = _single_runs(s, Path(train), device_arg, workdir)
    # one tiny run's start-up, phase by phase: its first epoch trains one step, so the training steps end
    # with the first step
    breakdown_run = [*TINY, *device_arg, f"hydra.run.dir={workdir / 'run-breakdown'}"]
    out["breakdown"] = timeline(trace(Path(train), breakdown_run, workdir))
    return out
