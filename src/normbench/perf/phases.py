"""Where a job's time goes, phase by phase, in real ``bench/train.py`` processes: the benchmark's own
instrumentation (the product has no timing hooks). ``python -m normbench.perf.phases START OUT TRAIN
ARGS...`` runs TRAIN with ARGS after wrapping the functions in PHASES, and writes to OUT each call's
phase, start, end and exclusive seconds (the wrapped calls inside it excluded), from START (the parent's
clock at launch). Sections ``jobs`` (``bench_jobs``) and ``fixed_cost`` (its start-up timeline) use it."""

from __future__ import annotations

import functools
import itertools
import json
import os
import pkgutil
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from normbench.perf.common import PerfPaths, PerfSettings, child_env, run_process

# phase = a wrapped function (module:attribute), patched where its callers look it up
PHASES = [line.split(" = ") for line in """
compose the config (Hydra) = hydra._internal.config_loader_impl:ConfigLoaderImpl.load_sweep_config
compose the run's config (Hydra) = hydra._internal.config_loader_impl:ConfigLoaderImpl.load_configuration
Hydra job set-up (dirs, logging) = hydra._internal.core_plugins.basic_launcher:run_job
job: identity, sweep index, run set-up = normbench.job:run_job
validate = normbench.job:validate
config tree = normbench.job:print_config_tree
gc / memory baseline = normbench.run:RunMemory.collect
gc / memory baseline = normbench.run:RunMemory.start
data = normbench.run:load_data
model build = normbench.run:build_model
optimizer, trainer = normbench.run:build_parts
checkpoint = normbench.run:load_checkpoint
checkpoint = normbench.run:save_checkpoint
W&B init = normbench.loggers:WandbSink.__init__
record open = normbench.run:Run._open_sinks
training steps = normbench.trainer:Trainer.train_steps
validation = normbench.trainer:Trainer.end_epoch
test, final metrics = normbench.run:Run._final_metrics
record writing = normbench.run:Run.finish
W&B finish = normbench.loggers:WandbSink.finish
sweep bookkeeping = normbench.job:record_in_sweep
""".strip().splitlines()]
TRAIN, COMPOSE, OTHER = "training steps", "compose the config (Hydra)", "other (launcher, between jobs)"
JOB = "Hydra job set-up (dirs, logging)"   # one call per job of the multirun: its outermost phase
# The tiny sweep job: batch 8, width 0.125, 100 steps on synthetic data, W&B offline.
JOB_ARGS = ["data=synthetic", "data.num_train=928", "data.num_test=128", "+debug=quick", "batch_size=8",
            "trainer.max_steps_per_epoch=100", "logger=wandb", "logger.mode=offline"]


def _wrap(events: list, stack: list, start: float, phase: str, fn):
    @functools.wraps(fn)
    def traced(*args, **kwargs):
        began, inner = time.time(), [0.0]
        stack.append(inner)
        try:
            return fn(*args, **kwargs)
        finally:
            stack.pop()
            took = time.time() - began
            if stack:
                stack[-1][0] += took
            events.append([phase, began - start, began - start + took, took - inner[0]])
    return traced


def install(events: list, start: float) -> None:
    """Wrap every function of PHASES; each call appends [phase, start s, end s, exclusive s] to `events`."""
    stack: list = []
    for phase, target in PHASES:
        owner_name, name = re.fullmatch(r"(.+)[.:](\w+)", target).groups()
        owner = pkgutil.resolve_name(owner_name)
        setattr(owner, name, _wrap(events, stack, start, phase, getattr(owner, name)))


def main(argv: list[str]) -> None:
    import runpy

    start, out, train = float(argv[0]), Path(argv[1]), argv[2]
    events: list = [["import torch", 0.0, time.time() - start, time.time() - start]]
    install(events, start)
    events.append(["imports", events[0][2], time.time() - start, time.time() - start - events[0][2]])
    sys.argv = argv[2:]
    try:
        runpy.run_path(train, run_name="__main__")
    finally:
        events.append(["exit", time.time() - start, time.time() - start, 0.0])
        out.write_text(json.dumps(events))


def trace(train: Path, args: list[str], workdir: Path, env: dict | None = None, timeout: float = 900) -> list:
    """Run `train` with `args` under the tracer (in `workdir`); its events. Raises when it fails."""
    out, start = workdir / f"phases-{time.time_ns()}.json", time.time()
    run_process([sys.executable, "-m", "normbench.perf.phases", str(start), str(out),
                 str(Path(train).absolute()), *args], workdir, env, timeout)
    return json.loads(out.read_text())


def _train_share(events: list, begin: float, end: float) -> float:
    train = sum(e[3] for e in events if e[0] == TRAIN and begin <= e[1] < end)
    return 1.0 - train / (end - begin)


def job_phases(events: list, jobs: int) -> dict:
    """A multirun's events as per-job figures. The sweep's window runs from its first composition to the
    end of its last job; a job is the window over `jobs`, a phase its exclusive seconds summed over the
    window, over `jobs`. `outside`: the window's share outside the training steps (validation counts as
    outside); `outside_per_job`: each job's, from the end of the one before it."""
    job_calls = sorted((e for e in events if e[0] == JOB), key=lambda e: e[2])
    if len(job_calls) != jobs:
        raise RuntimeError(f"the multirun ran {len(job_calls)} jobs, expected {jobs}")
    first = min(e[1] for e in events if e[0] in (COMPOSE, JOB))
    last = job_calls[-1][2]
    totals: dict[str, float] = {}
    for phase, began, _, exclusive in events:
        if first <= began < last:
            totals[phase] = totals.get(phase, 0.0) + exclusive
    totals[OTHER] = (last - first) - sum(totals.values())
    ends = [first, *(e[2] for e in job_calls)]
    return {"jobs": jobs, "job_s": (last - first) / jobs,
            "phases": {phase: total / jobs for phase, total in totals.items()},
            "outside": _train_share(events, first, last),
            "outside_per_job": [_train_share(events, a, b) for a, b in itertools.pairwise(ends)],
            "start_s": first, "end_s": next(e[2] for e in events if e[0] == "exit") - last}


def timeline(events: list, upto: str = TRAIN) -> list[dict]:
    """A single run's start-up: each phase's end, seconds from process start, and its exclusive seconds,
    in order of their ends, up to the end of the first `upto` phase."""
    last = next(e[2] for e in events if e[0] == upto)
    return [{"phase": phase, "at_s": end, "phase_s": exclusive}
            for phase, _, end, exclusive in sorted(events, key=lambda e: e[2]) if end <= last]


def bench_jobs(s: PerfSettings, paths: PerfPaths, device: torch.device, workdir: Path) -> dict:
    """`s.sweep_rounds` multiruns of `s.sweep_jobs` tiny jobs (JOB_ARGS), each traced; per phase the
    median over the multiruns."""
    train = paths.train_script
    if train is None or not Path(train).exists():
        return {"skipped": f"{train or 'bench/train.py'} not found"}
    seeds = ",".join(str(i) for i in range(s.sweep_jobs))
    runs = []
    for n in range(s.sweep_rounds):
        events = trace(Path(train), ["-m", *JOB_ARGS, f"trainer.device={device}", f"seed={seeds}",
                                     f"hydra.sweep.dir={workdir / f'jobs-{n}'}", "experiment_name=perf"],
                       workdir, {**child_env(), "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
        runs.append(job_phases(events, s.sweep_jobs))
    median = {key: statistics.median(run[key] for run in runs) for key in ("job_s", "outside", "start_s")}
    later = [x for run in runs for x in run["outside_per_job"][1:]]
    phases = {p: statistics.median(run["phases"].get(p, 0.0) for run in runs) for p in runs[0]["phases"]}
    return {"jobs": s.sweep_jobs, "rounds": s.sweep_rounds, "args": JOB_ARGS, **median, "phases": phases,
            "outside_later_job": statistics.median(later) if later else None,
            "runs": runs, "load_avg": list(os.getloadavg())}


if __name__ == "__main__":
    main(sys.argv[1:])
