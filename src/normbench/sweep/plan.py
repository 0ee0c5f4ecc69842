"""The planning command: what a sweep will do, before anything runs.

    python bench/plan.py -m +experiment=vgg_losses seed=0,1,2

takes the same arguments as bench/train.py, composes the multirun config with Hydra, expands the grid
exactly as Hydra's basic sweeper does (its own override parser and `split_arguments`), composes each
job's config the way the launcher does (`load_sweep_config`), and looks each job's identity up in the
sweep dir's index (`.normbench/index/`). It prints how many runs the sweep makes, how many are done,
how many will run (and how many of those continue from a checkpoint), and an estimate of the time
left from the recorded times of finished runs. Nothing is trained and nothing is written.
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from normbench.record import CHECKPOINT, DONE, Status
from normbench.sweep.identity import run_identity
from normbench.sweep.index import SweepState, done_statuses
from normbench.sweep.pruning import pruning_on

CONF = Path(__file__).resolve().parents[3] / "conf"


def expand_grid(params: dict, task: list[str], config_loader=None) -> list[list[str]]:
    """The jobs' override lists, as hydra's BasicSweeper makes them from hydra.sweeper.params plus
    the command line's overrides (the command line wins for a key in both)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    arguments = [f"{k}={v}" for k, v in (params or {}).items()] + list(task)
    parser = OverridesParser.create(config_loader=config_loader)
    return BasicSweeper.split_arguments(parser.parse_overrides(arguments), None)[0]


def sweep_arguments(master: DictConfig) -> tuple[dict, list[str]]:
    """hydra.sweeper.params and the command line's overrides of a composed multirun config."""
    params = OmegaConf.select(master, "hydra.sweeper.params", default=None)
    params = OmegaConf.to_container(params, resolve=False) if params is not None else {}
    task = list(OmegaConf.to_container(master.hydra.overrides.task, resolve=False))
    return params, task


@dataclass
class DirPlan:
    sweep_dir: str
    runs: int = 0
    done: dict = field(default_factory=lambda: defaultdict(int))
    to_run: int = 0
    resume: int = 0
    duplicates: int = 0
    finished_times: list = field(default_factory=list)

    @property
    def n_done(self) -> int:
        return sum(self.done.values())


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours >= 48:
        return f"{hours / 24:.1f} days"
    return f"{hours}:{minutes:02d}:{secs:02d}"


def plan(argv: list[str], config_dir: Path | None = None, out=sys.stdout) -> int:
    """Print the plan for `bench/train.py ARGV`; returns an exit status."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path, get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from normbench.sweep.resolvers import register

    register()
    args = get_args_parser().parse_args(argv)
    config_dir = Path(args.config_dir or config_dir or CONF).absolute()
    config_name = args.config_name or "config"
    previous_hydra_cfg = HydraConfig.instance().cfg
    GlobalHydra.instance().clear()
    hydra = Hydra.create_main_hydra2("train", create_config_search_path(str(config_dir)))
    try:
        master = hydra.compose_config(config_name=config_name, overrides=list(args.overrides),
                                      run_mode=RunMode.MULTIRUN, with_log_configuration=False)
        HydraConfig.instance().set_config(master)
        sweeper = OmegaConf.select(master, "hydra.sweeper._target_", default="") or ""
        if not sweeper.endswith("BasicSweeper"):
            return _plan_other_sweeper(master, sweeper, out)
        jobs = expand_grid(*sweep_arguments(master), hydra.config_loader)
        n_jobs = _parallel_jobs(master)
        if not jobs:
            print(f"plan {master.hydra.sweep.dir}: the sweep expands to zero runs; nothing to do", file=out)
            return 0
        plans: dict[str, DirPlan] = {}
        states: dict[str, SweepState] = {}
        seen: set[tuple[str, str]] = set()
        for overrides in jobs:
            job_cfg = hydra.config_loader.load_sweep_config(master, list(overrides))
            HydraConfig.instance().set_config(job_cfg)
            sweep_dir = str(job_cfg.hydra.sweep.dir)
            training = _without_hydra(job_cfg)
            identity = run_identity(training)
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
            entry = state.cached.get(identity)
            if entry and entry.get("status") in done_statuses(pruning_on(training)):
                dir_plan.done[entry["status"]] += 1
            else:
                dir_plan.to_run += 1
                if entry and entry.get("dir") and (state.run_dir(entry) / CHECKPOINT).exists():
                    dir_plan.resume += 1
        for dir_plan in plans.values():
            _print_dir_plan(dir_plan, n_jobs, out)
        return 0
    finally:
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = previous_hydra_cfg


def _without_hydra(cfg: DictConfig) -> DictConfig:
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def _load_index(state: SweepState, dir_plan: DirPlan) -> None:
    """Read the sweep dir's index once (without writing one when it is missing)."""
    if state.index_dir.is_dir():
        entries = {e["identity"]: e for e in state.entries() if e.get("identity")}
    else:
        entries = state.scan_records()
    state.cached = entries
    # the time of a full run: completed runs' times; only without any, the other finished runs'
    # (diverged, pruned and failed runs stop early and would make the estimate too short)
    for statuses in ((Status.COMPLETED,), (*DONE, Status.PRUNED, Status.FAILED)):
        dir_plan.finished_times = [float(e["time_s"]) for e in entries.values()
                                   if e.get("status") in statuses and isinstance(e.get("time_s"), (int, float))]
        if dir_plan.finished_times:
            break


def _parallel_jobs(master: DictConfig) -> int:
    n_jobs = OmegaConf.select(master, "hydra.launcher.n_jobs", default=None)
    if isinstance(n_jobs, int) and n_jobs > 1:
        return n_jobs
    return 1


def _print_dir_plan(p: DirPlan, n_jobs: int, out) -> None:
    done = ", ".join(f"{n} {status}" for status, n in sorted(p.done.items()))
    line = f"plan {p.sweep_dir}: {p.runs} run{'s' if p.runs != 1 else ''}, {p.n_done} done" + (f" ({done})" if done else "")
    line += f", {p.to_run} to run"
    if p.resume:
        line += f" ({p.resume} continue from a checkpoint)"
    if p.duplicates:
        line += f", {p.duplicates} duplicate(s) of another job's config"
    print(line, file=out)
    if p.to_run == 0:
        print("estimated time left: none, every run is done (re-running the sweep skips them all)", file=out)
    elif p.finished_times:
        mean = statistics.fmean(p.finished_times)
        left = mean * p.to_run / n_jobs
        parallel = f" / {n_jobs} parallel jobs" if n_jobs > 1 else ""
        print(f"estimated time left: {format_duration(left)} ({p.to_run} runs x {format_duration(mean)} "
              f"mean of {len(p.finished_times)} finished runs{parallel})", file=out)
    else:
        print("estimated time left: unknown (no finished runs in this sweep dir yet)", file=out)


def _plan_other_sweeper(master: DictConfig, sweeper: str, out) -> int:
    state = SweepState(master.hydra.sweep.dir)
    entries = list(state.entries()) if state.index_dir.is_dir() else list(state.scan_records().values())
    done = sum(1 for e in entries if e.get("status") in DONE)
    n_trials = OmegaConf.select(master, "hydra.sweeper.n_trials", default=None)
    name = sweeper.rsplit(".", 1)[-1] or "custom sweeper"
    trials = f"{n_trials} trials" if n_trials is not None else "its trials"
    print(f"plan {master.hydra.sweep.dir}: {name} chooses {trials} as it goes; {done} runs of this sweep "
          f"dir are done (a trial with the config of one of them is not trained again)", file=out)
    return 0


def main(argv: list[str] | None = None) -> int:
    from hydra.errors import HydraException

    from normbench.errors import NormbenchError

    try:
        return plan(sys.argv[1:] if argv is None else argv)
    except (HydraException, NormbenchError) as err:
        print(f"normbench plan: {err}", file=sys.stderr)
        return 2
