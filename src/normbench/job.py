"""The Hydra job: what bench/train.py runs for one configuration, alone or as one job of a sweep.

validate > (sweep: skip a run that is already done, pick its record dir, lock its identity) > the run
(normbench.run) > (sweep: index entry, curve for the median pruner, journal line). With the basic sweeper
a run that fails is recorded and the sweep goes on; a single run re-raises. User errors end in one line
on stderr and exit status 2.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from normbench.device import launcher_jobs, placement
from normbench.errors import NormbenchError
from normbench.faults import free_memory, is_out_of_memory
from normbench.record import CHECKPOINT, Status, read_summary
from normbench.run import TAG_GROUPS, WORST_OBJECTIVE, Run, RunInfo
from normbench.sweep.identity import job_dirname, run_identity, seedless_identity
from normbench.sweep.index import SKIPPED, SWEEP_ID_ENV, SweepState, done_statuses
from normbench.sweep.pruning import build_pruner
from normbench.validate import RunSpec, validate

NO_OUTPUT_DIR = "no output dir: run through bench/train.py or pass output_dir"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"  # a _target_ string, not an import


@dataclass
class JobInfo:
    output_dir: Path | None
    choices: dict = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    name: str = "default"
    sweep_dir: Path | None = None     # multirun only: the sweep's root dir (holds .normbench/)
    job_num: int | None = None        # multirun only: Hydra's job number
    isolate: bool = False             # record a failing run and go on (basic sweeper) instead of raising
    device: str | None = None         # the device this job trains on (trainer.device, or placed)
    threads: int = 0                  # torch CPU threads for this job (0: torch's default)
    reported: bool = field(default=False, repr=False)


def _group_name(node) -> str | None:
    """A group's option outside Hydra's runtime (compose API): its `name`, else its target's name."""
    if not OmegaConf.is_config(node):
        return None
    name = node.get("name") or node.get("_target_")
    return None if name is None else str(name).rsplit(".", 1)[-1]


def job_info(cfg: DictConfig, output_dir: str | Path | None = None) -> JobInfo:
    """What Hydra knows about this job (output dir, group choices, overrides, sweep and launcher)."""
    info = JobInfo(Path(output_dir) if output_dir is not None else None)
    n_jobs, sweeper = 1, None
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        info.output_dir = info.output_dir or Path(hydra_cfg.runtime.output_dir)
        info.choices = {k: v for k, v in hydra_cfg.runtime.choices.items() if k in TAG_GROUPS}
        info.overrides = list(hydra_cfg.overrides.task)
        info.name = job_dirname(info.overrides)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            info.sweep_dir = Path(hydra_cfg.sweep.dir).absolute()
            info.job_num = hydra_cfg.job.get("num")
            n_jobs = launcher_jobs(hydra_cfg.get("launcher"))
            sweeper = (hydra_cfg.get("sweeper") or {}).get("_target_")
    info.isolate = info.sweep_dir is not None and sweeper == BASIC_SWEEPER
    for group in TAG_GROUPS:
        info.choices.setdefault(group, _group_name(cfg.get(group)))
    info.choices.update(batch_size=cfg.get("batch_size"), seed=cfg.get("seed"),
                        lr=OmegaConf.select(cfg, "optimizer.lr"), dropout=OmegaConf.select(cfg, "model.dropout"),
                        epochs=OmegaConf.select(cfg, "trainer.epochs"))
    info.device, info.threads = placement(cfg.trainer.device, cfg.trainer.threads, info.job_num, n_jobs)
    return info


def print_config_tree(cfg: DictConfig) -> None:
    from rich import print as rich_print
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", guide_style="dim")
    for key, value in cfg.items():
        branch = tree.add(str(key), style="bold")
        text = OmegaConf.to_yaml(value, resolve=True) if OmegaConf.is_config(value) else str(value)
        branch.add(Syntax(text.rstrip(), "yaml", theme="ansi_dark", background_color="default"))
    rich_print(tree)


def one_line(exc: BaseException) -> str:
    return " ".join("".join(traceback.format_exception_only(exc)).split())


def journal(info: JobInfo, identity: str | None, status: str, objective, run_dir: Path | None,
            error: str | None = None) -> None:
    """This job's outcome, for the summary line of the sweep invocation it belongs to."""
    sweep_id = os.environ.get(SWEEP_ID_ENV)
    if info.sweep_dir is None or not sweep_id or info.reported:
        return
    job = f"{info.job_num:06d}" if isinstance(info.job_num, int) else f"{identity}-{os.getpid()}"
    SweepState(info.sweep_dir).journal(sweep_id, job, status=status, identity=identity, objective=objective,
                                       dir=str(run_dir) if run_dir else None, error=error)
    info.reported = True


def choose_run_dir(state: SweepState, identity: str, job_dir: Path) -> Path:
    """Where this identity's record lives: where an earlier attempt of it left its record or
    checkpoint (so a restarted job continues from it even in another job dir), else the job's own
    dir -- unless that holds the record of another identity (the same overrides after the config
    changed), which is never overwritten: then a sibling `<job dir>.<identity>`."""
    entry = state.get(identity)
    if entry and entry.get("dir"):
        earlier = state.run_dir(entry)
        summary = read_summary(earlier)
        if (earlier / CHECKPOINT).exists() or (summary and summary.get("identity") == identity):
            return earlier
    summary = read_summary(job_dir)
    if summary is not None and summary.get("identity") != identity:
        return job_dir.with_name(f"{job_dir.name}.{identity}")
    return job_dir


def record_in_sweep(state: SweepState, info: JobInfo, run: Run) -> None:
    """The finished run in the sweep's bookkeeping: index entry, curve (median pruner), journal line."""
    summary = run.summary
    try:
        state.put(run.identity, dir=run.run_dir, status=summary["status"], objective=summary["objective"],
                  epochs_done=summary["epochs_done"], time_s=summary["metrics"].get("time/total_s"))
        if summary["status"] == Status.COMPLETED and run.history:
            state.add_curve(run.identity, [1.0 - row["val/acc"] for row in run.history])
        journal(info, run.identity, summary["status"], summary["objective"], run.run_dir)
    except OSError as err:  # never hide the run's own outcome behind a bookkeeping error
        print(f"normbench: warning: could not update the sweep index: {err}", file=sys.stderr)


def run_job(cfg: DictConfig, output_dir: str | Path | None = None) -> float:
    """Train one configuration, record it, and return its validation error (what sweepers minimize).

    In a sweep (multirun) the job first looks its identity up in the sweep's index: a run of the same
    training config that already completed (or diverged) is not trained again, its recorded objective
    is returned. With the basic sweeper a run that raises or runs out of memory is recorded as failed
    and the sweep goes on (the job returns the worst objective); a single run re-raises.
    """
    info = job_info(cfg, output_dir)
    if not info.isolate:
        return _run_job(cfg, info)
    try:
        return _run_job(cfg, info)
    except Exception as exc:  # noqa: BLE001 - failure isolation: the sweep goes on
        error = str(exc) if isinstance(exc, NormbenchError) else one_line(exc)
        kind = "out of memory" if is_out_of_memory(exc) else "failed"
        print(f"normbench: job {info.job_num} {kind}: {error} -- recorded, the sweep goes on",
              file=sys.stderr, flush=True)
        journal(info, None, Status.FAILED, WORST_OBJECTIVE, None, error)
    free_memory()
    return WORST_OBJECTIVE


def _run_job(cfg: DictConfig, info: JobInfo) -> float:
    spec = validate(cfg, device=info.device, overrides=info.overrides)
    if info.output_dir is None:
        raise NormbenchError(NO_OUTPUT_DIR)
    identity = run_identity(cfg)
    if info.sweep_dir is None:
        return _train(cfg, spec, info, None, identity)
    state = SweepState(info.sweep_dir)
    state.ensure_index()
    with state.lock(identity):
        done = state.done(identity, done_statuses(spec.pruning["name"] != "none"))
        if done is not None:
            objective = done.get("objective")
            objective = WORST_OBJECTIVE if objective is None else float(objective)
            run_dir = state.run_dir(done)
            print(f"normbench: skipped {identity}: already {done['status']} in {run_dir} "
                  f"(objective {objective:.4f})", flush=True)
            journal(info, identity, SKIPPED, objective, run_dir)
            return objective
        info.output_dir = choose_run_dir(state, identity, info.output_dir)
        state.put(identity, dir=info.output_dir, status=Status.RUNNING, objective=None, pid=os.getpid(),
                  host=socket.gethostname())
        return _train(cfg, spec, info, state, identity)


def _train(cfg: DictConfig, spec: RunSpec, info: JobInfo, state: SweepState | None, identity: str) -> float:
    print_config_tree(cfg)
    run_info = RunInfo(run_dir=info.output_dir, identity=identity, seedless_identity=seedless_identity(cfg),
                       choices=info.choices, overrides=info.overrides, name=info.name, job_num=info.job_num,
                       threads=info.threads)
    run = Run(cfg, spec, run_info)
    try:
        run.pruner = build_pruner(cfg, run.run_dir, info.sweep_dir, identity)
        objective = run.execute()
    except NormbenchError as err:
        # a single run leaves nothing for errors caught before the run started; a sweep job records them
        if run.record is not None or info.isolate:
            _finish(run, state, info, Status.FAILED, str(err), type(err).__name__, write_without_record=True)
        raise
    except BaseException as exc:
        error_type = "OutOfMemoryError" if is_out_of_memory(exc) else type(exc).__name__
        _finish(run, state, info, Status.FAILED, one_line(exc), error_type, write_without_record=info.isolate)
        raise
    _finish(run, state, info)
    return objective


def _finish(run: Run, state: SweepState | None, info: JobInfo, status: Status | None = None,
            error: str | None = None, error_type: str | None = None, write_without_record: bool = False) -> None:
    try:
        run.finish(status, error, error_type, write_without_record)
    finally:
        if state is not None:
            record_in_sweep(state, info, run)


def main(cfg: DictConfig) -> float:
    """Hydra task function: user errors end in one line on stderr, exit status 2."""
    try:
        return run_job(cfg)
    except NormbenchError as err:
        print(f"normbench: {err}", file=sys.stderr)
        sys.exit(2)
