"""The Hydra job: what bench/train.py runs for one configuration, alone or as one job of a sweep.

The record is the truth: a summary.json that says this identity is done is never trained again nor
overwritten, whatever the index says, and a dir holding another identity's record or checkpoint is never
written to. With the basic sweeper a run that fails is recorded and the sweep goes on.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, read_write

from normbench.checkpoint import checkpoint_identity
from normbench.device import launcher_jobs, placement
from normbench.errors import NormbenchError, fail, one_line, warn
from normbench.faults import free_memory, is_out_of_memory, kill_point
from normbench.identity import run_identity, run_name, seedless_identity, swept_keys_from_env
from normbench.interrupts import (
    EXIT_CODES,
    MAIN_PID_ENV,
    ignore_further_interrupts,
    is_launcher_worker,
    pass_on_ctrl_c,
    raise_on_sigterm,
    signal_name,
    signals_held,
    watch_parent,
)
from normbench.pruning import MedianStoppingPruner, Pruner
from normbench.record import (
    CHECKPOINT,
    SUMMARY,
    Status,
    read_summary,
    remove_temp_files,
    set_aside_damaged_summary,
    write_rejected,
    write_skipped_pointer,
)
from normbench.run import TAG_GROUPS, WORST_OBJECTIVE, Run, RunInfo
from normbench.schema import PruningConf
from normbench.sweep.index import SKIPPED, SWEEP_ID_ENV, SweepState, done_statuses, sibling_dir
from normbench.sweep.objectives import job_objectives, job_return
from normbench.sweep.optuna_support import ENV_STUDY, ENV_TRIAL_NUMBER, trial_pruner
from normbench.validate import RunSpec, validate

SUBMITIT_ENV = "SUBMITIT_FOLDER"   # set by submitit in the processes of its jobs (SLURM tasks)
HYDRA_FILES = ".hydra"  # the job's config.yaml, hydra.yaml and overrides.yaml, as Hydra writes them
RUN_LOCK = ".normbench-run.lock"  # held by the live single run whose dir holds it
_CLAIMED: list = []  # the open lock of this process's run dir
RERUN = {"hint": "run the same command"}  # how to continue this process's interrupted run (cli's last line)


@dataclass
class JobInfo(RunInfo):
    """The run's RunInfo and what the sweep needs of the job."""
    sweep_dir: Path | None = None     # multirun only: the sweep's root dir (holds .normbench/)
    isolate: bool = False             # record a failing run and go on (basic sweeper) instead of raising
    unrecorded: str | None = None     # why the run's record could not be written (a full disk, ...)
    device: str | None = None         # the device this job trains on (trainer.device, or placed)
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
        env_set = hydra_cfg.job.get("env_set") or {}
        if ENV_TRIAL_NUMBER in env_set:
            info.optuna = {"study": env_set.get(ENV_STUDY), "trial": int(env_set[ENV_TRIAL_NUMBER])}
        info.name = run_name(info.overrides, swept_keys_from_env(), (info.optuna or {}).get("trial"))
        if hydra_cfg.mode == RunMode.MULTIRUN:
            info.sweep_dir = Path(hydra_cfg.sweep.dir).absolute()
            info.job_num = hydra_cfg.job.get("num")
            n_jobs = launcher_jobs(hydra_cfg.get("launcher"))
            sweeper = (hydra_cfg.get("sweeper") or {}).get("_target_")
    info.isolate = info.sweep_dir is not None and str(sweeper).endswith("BasicSweeper")
    for group in TAG_GROUPS:
        info.choices.setdefault(group, _group_name(cfg.get(group)))
    info.choices.update(batch_size=cfg.get("batch_size"), seed=cfg.get("seed"),
                        lr=OmegaConf.select(cfg, "optimizer.lr"),
                        dropout=OmegaConf.select(cfg, "model.dropout"),
                        epochs=OmegaConf.select(cfg, "trainer.epochs"))
    info.device, info.threads = placement(cfg.trainer.device, cfg.trainer.threads, info.job_num, n_jobs)
    return info


def print_config_tree(cfg: DictConfig) -> None:
    # Plain text leaves: rich.syntax's YAML highlighting imports pygments, a tenth of a second of start-up.
    from rich import print as rich_print
    from rich.text import Text
    from rich.tree import Tree

    tree = Tree("config", guide_style="dim")
    for key, value in cfg.items():
        branch = tree.add(str(key), style="bold")
        text = OmegaConf.to_yaml(value, resolve=True) if OmegaConf.is_config(value) else str(value)
        branch.add(Text(text.rstrip()))
    rich_print(tree)


def journal(info: JobInfo, identity: str | None, status: str, objective, run_dir: Path | None,
            error: str | None = None) -> None:
    """This job's outcome, for the summary line of the sweep invocation it belongs to."""
    sweep_id = os.environ.get(SWEEP_ID_ENV)
    if info.sweep_dir is None or not sweep_id or info.reported:
        return
    job = f"{info.job_num:06d}" if isinstance(info.job_num, int) else f"{identity}-{os.getpid()}"
    SweepState(info.sweep_dir).journal(sweep_id, job, quiet=info.unrecorded is not None, status=status,
                                       identity=identity, objective=objective,
                                       dir=str(run_dir) if run_dir else None, error=error)
    info.reported = True


def owner(run_dir: Path) -> str | None:
    """The identity a dir belongs to: its summary.json's, else its checkpoint's (None: nobody's)."""
    summary = read_summary(run_dir)
    if summary is not None and summary.get("identity"):
        return str(summary["identity"])
    if (run_dir / SUMMARY).exists():  # an unreadable summary: not ours to overwrite unless the checkpoint is
        return checkpoint_identity(run_dir / CHECKPOINT) or "unknown"
    return checkpoint_identity(run_dir / CHECKPOINT) if (run_dir / CHECKPOINT).exists() else None


def claim_run_dir(config: DictConfig) -> None:
    """Before Hydra makes a single run's dir (`${now:}` has 1-second resolution): lock it for this run,
    unless a live run holds it or it holds another identity's or a finished record: then, with one warning,
    the sibling `<dir>.<identity>` (`-2`, `-3`, ... after it), as in sweeps."""
    wanted = Path(str(config.hydra.run.dir)).absolute()
    try:
        identity = run_identity(OmegaConf.masked_copy(config, [k for k in config if k != "hydra"]))
    except Exception:  # noqa: BLE001 - a config the job reports in its own line (it validates first)
        identity = "run"
    candidate, n, first_reason = wanted, 1, None
    try:
        while (reason := _taken(candidate, identity)) is not None:
            first_reason, n = first_reason or reason, n + 1
            candidate = sibling_dir(wanted, identity + (f"-{n - 1}" if n > 2 else ""))
    except OSError:  # the dir cannot be made: Hydra says so in its own words
        return
    if first_reason is not None:
        warn(f"{wanted} {first_reason}: this run is recorded in {candidate}")
        with read_write(config.hydra.run):
            config.hydra.run.dir = str(candidate)


def _taken(run_dir: Path, identity: str) -> str | None:
    """Why `run_dir` cannot be this run's; None: it is, locked until this process exits."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / RUN_LOCK, "a")  # noqa: SIM115 - held open for the life of the process
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return "is in use by another run"
    except OSError:  # a filesystem without locks: unguarded
        pass
    found, summary = owner(run_dir), read_summary(run_dir) or {}
    finished = summary.get("status") in done_statuses(True)  # a single run goes beside its finished record
    reason = (f"holds the record of run {found}" if found not in (None, identity)
              else f"holds the {summary['status']} record of this run" if finished else None)
    if reason is None:
        _CLAIMED.append(handle)
    else:
        handle.close()
    return reason


def choose_run_dir(state: SweepState, identity: str, job_dir: Path) -> Path:
    """Where an earlier attempt of this identity left its record or checkpoint (a restarted job continues
    it), else the job's dir -- unless that holds another identity's (the same overrides after the config
    changed): then a sibling `<job dir>.<identity>`. An index entry pointing at another's is not followed."""
    entry = state.get(identity)
    if entry and entry.get("dir"):
        earlier = state.run_dir(entry)
        if earlier != job_dir:
            found = owner(earlier)
            if found == identity or (found is None and (earlier / CHECKPOINT).exists()):
                return earlier
            if found is not None:
                warn(f"the sweep index entry of {identity} points at {earlier}, which holds run {found}: "
                     "not used")
    found = owner(job_dir)
    if found is not None and found != identity:
        return sibling_dir(job_dir, identity)
    return job_dir


def run_pruner(spec: PruningConf, sweep_dir: Path | None, identity: str) -> Pruner | None:
    """What may stop this job's run early: its Optuna trial's pruner, else the grid rule `pruning.name`
    (a single run has no peers); None: nothing."""
    pruner = trial_pruner()
    if pruner is not None:
        return pruner
    if spec.name == "none" or sweep_dir is None:
        return None
    return MedianStoppingPruner(SweepState(sweep_dir).curves_dir, identity, spec.warmup_epochs, spec.min_runs)


def record_in_sweep(state: SweepState, info: JobInfo, run: Run) -> None:
    """The finished run in the sweep's bookkeeping: index entry, curve (median pruner), journal line."""
    summary = run.summary
    quiet = info.unrecorded is not None  # the job's one line already names the disk's problem
    try:
        state.put(run.identity, dir=run.run_dir, status=summary["status"], objective=summary["objective"],
                  epochs_done=summary["epochs_done"], time_s=summary["metrics"].get("time/total_s"))
        if summary["status"] == Status.COMPLETED and run.history:
            state.add_curve(run.identity, [1.0 - row["val/acc"] for row in run.history])
    except OSError as err:  # never hide the run's own outcome behind a bookkeeping error
        if not quiet:
            warn(f"could not update the sweep index: {err}")
    kill_point("index_updated")
    journal(info, run.identity, summary["status"], summary["objective"], run.run_dir)


def run_job(cfg: DictConfig, output_dir: str | Path | None = None) -> float | tuple[float | None, ...]:
    """Train one configuration (or skip it, done), record it, and return its validation error, or the
    sweeper's named objectives (normbench.sweep.objectives); a failure: see the module's docstring."""
    info = job_info(cfg, output_dir)
    raise_on_sigterm()
    watch_parent()
    try:
        return _run_job(cfg, info)
    except Exception as exc:  # with failure isolation (basic sweeper) the sweep goes on
        error = journal_unreported(info, exc)  # e.g. a failed config check in an Optuna sweep
        if not info.isolate:
            raise
        kind = "out of memory" if is_out_of_memory(exc) else "failed"
        recorded = ("recorded" if info.unrecorded is None
                    else f"its record could not be written ({info.unrecorded})")
        print(f"normbench: job {info.job_num} {kind}: {error} -- {recorded}, the sweep goes on",
              file=sys.stderr, flush=True)
    free_memory()
    return WORST_OBJECTIVE


def journal_unreported(info: JobInfo, exc: BaseException) -> str:
    """A sweep job that failed before its run started: a journal line, and `rejected.json` with the reason
    in its job dir when that holds no record (the report lists it among the skipped records)."""
    error = str(exc) if isinstance(exc, NormbenchError) else one_line(exc)
    if info.sweep_dir is None or info.reported:
        return error
    journal(info, None, Status.FAILED, WORST_OBJECTIVE, info.output_dir, error)
    if info.output_dir is not None and read_summary(info.output_dir) is None:
        try:
            write_rejected(info.output_dir, error=error, error_type=type(exc).__name__,
                           overrides=info.overrides)
        except OSError:
            pass
    return error


def save_hydra_files(cfg: DictConfig, info: JobInfo) -> None:
    """The job's `.hydra/` files, written here (hydra.output_subdir is null) so that a run dir that cannot
    be written fails the job, not the whole sweep."""
    if not HydraConfig.initialized() or info.output_dir is None:
        return
    hydra_cfg, folder = HydraConfig.instance().cfg, info.output_dir / HYDRA_FILES
    try:
        folder.mkdir(parents=True, exist_ok=True)
        overrides = hydra_cfg.hydra.overrides.task
        for name, node in (("config", cfg), ("hydra", hydra_cfg), ("overrides", overrides)):
            (folder / f"{name}.yaml").write_text(OmegaConf.to_yaml(node))
    except OSError as err:
        info.unrecorded = f"{type(err).__name__}: {err.strerror or err}"
        raise


def _run_job(cfg: DictConfig, info: JobInfo) -> float | tuple[float | None, ...]:
    save_hydra_files(cfg, info)
    spec = validate(cfg, device=info.device)
    if info.output_dir is None:
        raise NormbenchError("no output dir: run through bench/train.py or pass output_dir")
    objectives = job_objectives()  # checked before anything runs
    identity = run_identity(cfg)
    if info.sweep_dir is None:
        return _train(cfg, spec, info, None, identity, objectives)
    state = SweepState(info.sweep_dir)
    state.ensure_index()
    with state.lock(identity):
        statuses = done_statuses(spec.pruning.name != "none")
        done = state.done(identity, statuses) or state.recover(
            identity, statuses, [info.output_dir, sibling_dir(info.output_dir, identity)])
        if done is not None:
            objective = done.get("objective")
            objective = WORST_OBJECTIVE if objective is None else float(objective)
            run_dir = state.run_dir(done)
            print(f"normbench: skipped {identity}: already {done['status']} in {run_dir} "
                  f"(objective {objective:.4f})", flush=True)
            journal(info, identity, SKIPPED, objective, run_dir)
            if Path(run_dir).resolve() != Path(info.output_dir).resolve():
                with contextlib.suppress(OSError):  # a pointer only: a full disk must not fail the skip
                    write_skipped_pointer(info.output_dir, identity=identity, record=run_dir,
                                          status=done["status"])
            return job_return(objectives, read_summary(run_dir) or {}, objective)
        info.output_dir = choose_run_dir(state, identity, info.output_dir)
        remove_temp_files(info.output_dir)
        state.put(identity, dir=info.output_dir, status=Status.RUNNING, objective=None, pid=os.getpid(),
                  host=socket.gethostname())
        return _train(cfg, spec, info, state, identity, objectives)


def _train(cfg: DictConfig, spec: RunSpec, info: JobInfo, state: SweepState | None, identity: str,
           objectives: list[str] | None = None) -> float | tuple[float | None, ...]:
    print_config_tree(cfg)
    set_aside_damaged_summary(info.output_dir)
    info.identity, info.seedless_identity = identity, seedless_identity(cfg)
    run = Run(cfg, spec, info)
    try:
        run.pruner = run_pruner(spec.pruning, info.sweep_dir, identity)
        objective = run.execute()
    except NormbenchError as err:
        # a single run leaves nothing for errors caught before the run started; a sweep job records them
        if run.record is not None or info.isolate:
            _finish(run, state, info, Status.FAILED, str(err), type(err).__name__, write_without_record=True)
        raise
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Interrupted)
        name = signal_name(exc)
        with signals_held():
            _finish(run, state, info, Status.INTERRUPTED, f"interrupted by {name}", name,
                    write_without_record=info.isolate)
        if info.sweep_dir is None and not run_dir_given():  # the same command would start a new dir
            RERUN["hint"] = f"run the same command with hydra.run.dir={shlex.quote(str(run.run_dir))}"
        print(f"normbench: {identity} interrupted by {name} after {run.summary['epochs_done']} epoch(s); "
              f"recorded in {run.run_dir}; {RERUN['hint']} to continue it", file=sys.stderr, flush=True)
        if is_launcher_worker():  # the sweep process is gone or going: so does its worker
            sys.stdout.flush()
            os._exit(EXIT_CODES.get(name, 130))
        raise
    except SystemExit as exc:
        if not os.environ.get(SUBMITIT_ENV):
            _finish(run, state, info, Status.FAILED, one_line(exc), type(exc).__name__,
                    write_without_record=info.isolate)
            raise
        # submitit leaves this way after it requeued the job on SLURM's time-limit signal (SIGUSR2,
        # through the launcher's checkpoint): the run goes on in the job's next attempt
        with signals_held():
            _finish(run, state, info, Status.INTERRUPTED, "interrupted by SIGUSR2 (SLURM time limit): "
                    "requeued by submitit", "SIGUSR2", write_without_record=info.isolate)
        print(f"normbench: {identity} requeued at its time limit after {run.summary['epochs_done']} "
              f"epoch(s); it continues from its checkpoint when SLURM starts it again", file=sys.stderr,
              flush=True)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the requeue's SIGTERM must not cut the exit short
        raise
    except BaseException as exc:
        error_type = "OutOfMemoryError" if is_out_of_memory(exc) else type(exc).__name__
        _finish(run, state, info, Status.FAILED, one_line(exc), error_type, write_without_record=info.isolate)
        raise
    _finish(run, state, info)
    return job_return(objectives, run.summary, objective)


def _finish(run: Run, state: SweepState | None, info: JobInfo, status: Status | None = None,
            error: str | None = None, error_type: str | None = None,
            write_without_record: bool = False) -> None:
    """The final summary, then the sweep's bookkeeping. A record that cannot be written is said once (in
    the job's one line); a run that had finished but could not record it counts as failed."""
    write_error = None
    try:
        run.finish(status, error, error_type, write_without_record)
    except OSError as err:
        write_error = err
        info.unrecorded = f"{type(err).__name__}: {err.strerror or err}"
        if status is None:
            run.summary.update(status=Status.FAILED, error=one_line(err), error_type=type(err).__name__)
        if not info.isolate:
            print(f"normbench: could not write the record of {run.identity} in {run.run_dir}: "
                  f"{info.unrecorded}", file=sys.stderr, flush=True)
    else:
        kill_point("summary_written")
    if state is not None:
        record_in_sweep(state, info, run)
    if write_error is not None and status is None:
        raise write_error


def run_dir_given() -> bool:
    """Whether this single run's dir was named on the command line (else a new one each time)."""
    return HydraConfig.initialized() and any(o.startswith("hydra.run.dir=")
                                             for o in HydraConfig.get().overrides.hydra)


def release_run_dir() -> None:
    """A single run's lock goes, and its dir if that leaves it empty (a refused run leaves nothing)."""
    while _CLAIMED:
        handle = _CLAIMED.pop()
        handle.close()
        with contextlib.suppress(OSError):
            Path(handle.name).unlink()
            Path(handle.name).parent.rmdir()


def main(cfg: DictConfig) -> float:
    """Hydra task function: user errors end in one line on stderr, exit status 2."""
    try:
        return run_job(cfg)
    except NormbenchError as err:
        release_run_dir()
        fail(err)
    except OSError as err:
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the sweeper's to handle (the basic sweeper's jobs never get here)
        fail(one_line(err), status=1)


def cli(hydra_main) -> None:
    """bench/train.py's entry: SIGTERM and Ctrl-C end it without a traceback, status 130 (Ctrl-C), 143
    (SIGTERM) or 129 (SIGHUP); the job records the run `interrupted`, a sweep prints its closing line."""
    os.environ[MAIN_PID_ENV] = str(os.getpid())
    raise_on_sigterm()
    pass_on_ctrl_c()
    try:
        hydra_main()
    except KeyboardInterrupt as exc:
        name = signal_name(exc)
        ignore_further_interrupts(exiting=True)
        fail(f"interrupted by {name}; {RERUN['hint']} to continue", EXIT_CODES.get(name, 130))
