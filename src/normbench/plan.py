"""The planning command (bench/plan.py): what a sweep will do, before anything runs. It composes the
jobs as bench/train.py -m does, looks each identity up in the sweep dir's index and estimates the time
left from the finished runs of the same size (`SIZE_KEYS`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from hydra import initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from normbench.errors import NormbenchError, fail
from normbench.identity import register_resolvers, run_identity, sweep_arguments
from normbench.preflight import check_launch, preset_spelling
from normbench.record import CHECKPOINT, DONE, Status, read_config
from normbench.sweep.index import SweepState, done_statuses, sibling_dir
from normbench.validate import validate

JOB_NAME = "train"  # hydra.job.name of bench/train.py's jobs
# What makes one epoch of a run take as long as another's (the seed, norm or lr hardly matter);
# runs that agree on these are "of the same size", and their time per epoch is what a plan uses.
SIZE_KEYS = ("model._target_", "model.width", "model.input_size", "data._target_", "data.num_train",
             "data.num_test", "data.val_size", "data.image_size", "batch_size", "trainer.max_steps_per_epoch",
             "trainer.max_eval_batches", "trainer.eval_batch_size", "probe.name", "probe.interval",
             "trainer.max_steps")
EPOCHS_KEY = "trainer.epochs"


def expand_grid(params: dict, task: list[str], config_loader=None) -> list[list[str]]:
    """The jobs' override lists, as Hydra's BasicSweeper makes them (the command line wins)."""
    arguments = [f"{k}={v}" for k, v in (params or {}).items()] + list(task)
    parser = OverridesParser.create(config_loader=config_loader)
    [jobs] = BasicSweeper.split_arguments(parser.parse_overrides(arguments), max_batch_size=None)
    return jobs


def _lookup(data: dict, key: str):
    for part in key.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def run_size(config: dict) -> str:  # SIZE_KEYS' values in a resolved config
    return json.dumps([_lookup(config, k) for k in SIZE_KEYS], default=str)


@dataclass
class Finished:  # a finished run of the sweep dir, for the estimate
    size: str
    epochs: int | None       # configured
    epochs_done: int
    time_s: float
    status: str


def estimate(size: str, epochs: int | None, finished: list[Finished]) -> tuple[float, int] | None:
    """(seconds, runs it is based on): the mean time of the completed runs of this size and epochs, else
    the mean time per epoch of any of its size times `epochs`; None without any."""
    same = [f for f in finished if f.size == size]
    exact = [f.time_s for f in same if f.status == Status.COMPLETED and f.epochs == epochs]
    if exact:
        return statistics.fmean(exact), len(exact)
    per_epoch = [f.time_s / f.epochs_done for f in same if f.epochs_done > 0]
    if per_epoch and epochs:
        return statistics.fmean(per_epoch) * epochs, len(per_epoch)
    return None


@dataclass
class DirPlan:
    sweep_dir: str
    runs: int = 0
    done: dict = field(default_factory=lambda: defaultdict(int))
    to_run: int = 0
    resume: int = 0
    duplicates: int = 0
    finished: list = field(default_factory=list)   # Finished runs of the sweep dir
    estimates: list = field(default_factory=list)  # seconds, for each run to go that has one
    basis: set = field(default_factory=set)        # the sizes the estimates come from
    unknown: int = 0                               # runs to go with no finished run of their size


def format_duration(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours / 24:.1f} days" if hours >= 48 else f"{hours}:{minutes:02d}:{secs:02d}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="plan.py", description="Plan a sweep of bench/train.py: how many runs it makes, how many are "
        "done, how many will run and how long they take. Nothing is trained or written.",
        epilog="The time left is estimated from the sweep dir's finished runs of the same size (model, "
        "width, input size, data, batch size, steps and eval batches per epoch, probes), scaled to each "
        "run's epochs; runs with no finished run of their size are not guessed at. Examples: "
        "plan.py -m +experiment=vgg_losses seed=0,1,2; plan.py -m norm=bn,ln,gn batch_size=8,16,32,64")
    parser.add_argument("-m", "--multirun", action="store_true",
                        help="as in bench/train.py -m (a plan is of a multirun)")
    parser.add_argument("-cd", "--config-dir", help="the config dir (default: the repository's conf/)")
    parser.add_argument("-cn", "--config-name", default="config", help="the primary config (default: config)")
    parser.add_argument("overrides", nargs="*", help="the sweep's overrides, as for bench/train.py -m")
    return parser.parse_args(argv)


@contextmanager
def hydra_session(config_dir: Path) -> Iterator[None]:
    """Hydra initialised as bench/train.py's; the global Hydra state restored afterwards."""
    register_resolvers()
    previous_hydra_cfg = HydraConfig.instance().cfg
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(Path(config_dir).absolute()), job_name=JOB_NAME):
            yield
    finally:
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = previous_hydra_cfg


def plan(argv: list[str], config_dir: str | Path, out=sys.stdout) -> int:
    args = parse_args(preset_spelling(argv))
    with hydra_session(Path(args.config_dir or config_dir)):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration(args.config_name, list(args.overrides), run_mode=RunMode.MULTIRUN)
        HydraConfig.instance().set_config(master)
        check_launch(master)  # what the sweep checks before it starts (its experiment_name: each job's)
        sweeper = OmegaConf.select(master, "hydra.sweeper._target_", default="") or ""
        if not sweeper.endswith("BasicSweeper"):
            return _plan_other_sweeper(master, sweeper, out)
        jobs = expand_grid(*sweep_arguments(master), loader)
        if not jobs:
            print(f"plan {master.hydra.sweep.dir}: the sweep expands to zero runs; nothing to do", file=out)
            return 0
        n_jobs = OmegaConf.select(master, "hydra.launcher.n_jobs", default=None)
        for dir_plan in _plan_jobs(master, jobs, loader).values():
            _print_dir_plan(dir_plan, n_jobs if isinstance(n_jobs, int) and n_jobs > 1 else 1, out)
        return 0


def _plan_jobs(master: DictConfig, jobs: list[list[str]], loader) -> dict[str, DirPlan]:
    """Each job composed as the launcher does and looked up in its sweep dir's index."""
    plans: dict[str, DirPlan] = {}
    states: dict[str, SweepState] = {}
    seen: set[tuple[str, str]] = set()
    for overrides in jobs:
        job_cfg = loader.load_sweep_config(master, list(overrides))
        HydraConfig.instance().set_config(job_cfg)
        sweep_dir = str(job_cfg.hydra.sweep.dir)
        training = OmegaConf.masked_copy(job_cfg, [k for k in job_cfg if k != "hydra"])
        spec = validate(training)  # the job's own check: a value train.py refuses, the plan refuses
        resolved = OmegaConf.to_container(training, resolve=True)
        identity = run_identity(resolved)
        if sweep_dir not in plans:
            plans[sweep_dir] = DirPlan(sweep_dir)
            states[sweep_dir] = SweepState(sweep_dir)
            _load_index(states[sweep_dir], plans[sweep_dir])
        dir_plan, state = plans[sweep_dir], states[sweep_dir]
        dir_plan.runs += 1
        if (sweep_dir, identity) in seen:  # the same training config twice in one grid
            dir_plan.duplicates += 1
            continue
        seen.add((sweep_dir, identity))
        # the job's own skip decision
        statuses = done_statuses(spec.pruning.name != "none")
        job_dir = Path(sweep_dir, str(job_cfg.hydra.sweep.subdir)).absolute()
        done = state.done_record(identity, statuses, [job_dir, sibling_dir(job_dir, identity)])
        entry = state.cached.get(identity)
        if done is not None:
            dir_plan.done[done[1]["status"]] += 1
        else:
            dir_plan.to_run += 1
            if entry and entry.get("dir") and (state.run_dir(entry) / CHECKPOINT).exists():
                dir_plan.resume += 1
            _estimate_job(dir_plan, resolved)
    return plans


def _estimate_job(dir_plan: DirPlan, config: dict) -> None:
    size = run_size(config)
    epochs = _lookup(config, EPOCHS_KEY)
    found = estimate(size, epochs if isinstance(epochs, int) else None, dir_plan.finished)
    if found is None:
        dir_plan.unknown += 1
    else:
        dir_plan.estimates.append(found[0])
        dir_plan.basis.add(size)


def _load_index(state: SweepState, dir_plan: DirPlan) -> None:
    entries = state.cached = state.known_entries()
    for entry in entries.values():
        if entry.get("status") not in (*DONE, Status.PRUNED, Status.FAILED) or not entry.get("dir"):
            continue
        time_s, epochs_done = entry.get("time_s"), entry.get("epochs_done")
        if not isinstance(time_s, (int, float)) or not isinstance(epochs_done, int):
            continue
        try:
            config = read_config(state.run_dir(entry))
        except (OSError, ValueError):
            continue
        if config:
            epochs = _lookup(config, EPOCHS_KEY)
            dir_plan.finished.append(Finished(run_size(config), epochs if isinstance(epochs, int) else None,
                                              epochs_done, float(time_s), str(entry["status"])))


def _print_dir_plan(p: DirPlan, n_jobs: int, out) -> None:
    done = ", ".join(f"{n} {status}" for status, n in sorted(p.done.items()))
    line = (f"plan {p.sweep_dir}: {p.runs} run{'s' if p.runs != 1 else ''}, {sum(p.done.values())} done"
            f"{f' ({done})' if done else ''}, {p.to_run} to run")
    if p.resume:
        line += f" ({p.resume} continue from a checkpoint)"
    if p.duplicates:
        line += f", {p.duplicates} duplicate(s) of another job's config"
    print(line, file=out)
    if p.to_run == 0:
        print("estimated time left: none, every run is done (re-running the sweep skips them all)", file=out)
        return
    if not p.estimates:
        reason = ("no finished runs in this sweep dir yet" if not p.finished else
                  f"none of its {len(p.finished)} finished runs is of the same size: same model, width, "
                  "data, batch size, steps and eval batches per epoch")
        print(f"estimated time left: unknown ({reason})", file=out)
        return
    mean = statistics.fmean(p.estimates)
    left = sum(p.estimates) / n_jobs
    basis = sum(1 for f in p.finished if f.size in p.basis)
    parallel = f" / {n_jobs} parallel jobs" if n_jobs > 1 else ""
    line = (f"estimated time left: {'at least ' if p.unknown else ''}{format_duration(left)} "
            f"({len(p.estimates)} runs x {format_duration(mean)} mean of {basis} finished runs of the same "
            f"size{parallel})")
    if p.unknown:
        line += f"; {p.unknown} more run(s) have no finished run of their size to go by"
    print(line, file=out)


def _plan_other_sweeper(master: DictConfig, sweeper: str, out) -> int:
    entries = SweepState(master.hydra.sweep.dir).known_entries().values()
    done = sum(1 for e in entries if e.get("status") in DONE)
    n_trials = OmegaConf.select(master, "hydra.sweeper.n_trials", default=None)
    name = sweeper.rsplit(".", 1)[-1] or "custom sweeper"
    trials = f"{n_trials} trials" if n_trials is not None else "its trials"
    print(f"plan {master.hydra.sweep.dir}: {name} chooses {trials} as it goes; {done} runs of this sweep "
          f"dir are done (a trial with the config of one of them is not trained again)", file=out)
    return 0


def main(argv: list[str] | None = None, *, config_dir: str | Path) -> int:
    try:
        return plan(sys.argv[1:] if argv is None else argv, config_dir=config_dir)
    except (HydraException, NormbenchError) as err:
        fail(err)
