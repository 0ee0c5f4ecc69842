"""run_job(cfg): validate > seed > device > data > model > loss > optimizer > scheduler > loop > record."""

from __future__ import annotations

import os
import platform
import random
import resource
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from normbench.activations import activation_factory
from normbench.checkpoint import load_checkpoint, save_checkpoint
from normbench.data import BatchStream, load_data
from normbench.device import compile_model, resolve_channels_last, resolve_device, resolve_precision
from normbench.errors import NormbenchError
from normbench.faults import FaultyStream, fault_spec, free_memory, is_out_of_memory
from normbench.filters import filter_grid, first_conv_weight
from normbench.loggers import ConsoleSink, FanOut, WandbSink, wandb_mode
from normbench.losses import build_criterion
from normbench.models import build_model, count_parameters
from normbench.norms import NormSpec
from normbench.optim import build_optimizer, build_scheduler
from normbench.placement import launcher_jobs, placement
from normbench.record import (
    CHECKPOINT,
    SEEDLESS_IDENTITY,
    SUMMARY,
    RecordSink,
    atomic_write_json,
    atomic_write_text,
    read_summary,
)
from normbench.sweep.identity import job_dirname, run_identity, seedless_identity
from normbench.sweep.index import SWEEP_ID_ENV, SweepState, done_statuses
from normbench.sweep.pruning import build_pruner, check_pruning, pruning_on
from normbench.trainer import LoopSettings, LoopState, Trainer, convergence_epoch
from normbench.validate import validate

GROUPS = ("data", "model", "norm", "activation", "loss", "optimizer", "scheduler", "probe")
WORST_OBJECTIVE = 1.0  # validation error of a run that diverged: worse than any real run


NO_OUTPUT_DIR = "no output dir: run through bench/train.py or pass output_dir"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


@dataclass
class JobInfo:
    output_dir: Path | None
    choices: dict = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    name: str = "default"
    multirun: bool = False
    sweep_dir: Path | None = None     # multirun only: the sweep's root dir (holds .normbench/)
    job_num: int | None = None        # multirun only: Hydra's job number
    n_jobs: int = 1                   # jobs the launcher runs at the same time (joblib's n_jobs)
    isolate: bool = False             # record a failing run and go on (basic sweeper) instead of raising
    device: str | None = None         # the device this job trains on (trainer.device, or placed)
    threads: int = 0                  # torch CPU threads for this job (0: torch's default)
    reported: bool = field(default=False, repr=False)


def job_info(cfg: DictConfig, output_dir: str | Path | None = None, require_output_dir: bool = True) -> JobInfo:
    """What Hydra knows about this job (output dir, group choices, overrides, sweep and launcher)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    choices: dict = {}
    sweep_dir, job_num, n_jobs, sweeper = None, None, 1, None
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        output_dir = output_dir or hydra_cfg.runtime.output_dir
        choices = {k: v for k, v in hydra_cfg.runtime.choices.items() if k in GROUPS}
        overrides = list(hydra_cfg.overrides.task)
        name = job_dirname(overrides)
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        if multirun:
            sweep_dir = Path(hydra_cfg.sweep.dir).absolute()
            job_num = hydra_cfg.job.get("num")
            n_jobs = launcher_jobs(hydra_cfg.get("launcher"))
            sweeper = (hydra_cfg.get("sweeper") or {}).get("_target_")
    else:
        overrides, name, multirun = [], "default", False
    if output_dir is None and require_output_dir:
        raise NormbenchError(NO_OUTPUT_DIR)
    for group in GROUPS:
        choices.setdefault(group, cfg[group].get("name") if group in cfg else None)
    choices.update(batch_size=cfg.batch_size, seed=cfg.seed, lr=cfg.optimizer.lr,
                   dropout=cfg.model.dropout, epochs=cfg.trainer.epochs)
    info = JobInfo(Path(output_dir) if output_dir is not None else None, choices, overrides, name, multirun,
                   sweep_dir, job_num, n_jobs, isolate=multirun and sweeper == BASIC_SWEEPER)
    info.device, info.threads = placement(cfg.trainer.device, cfg.trainer.threads, job_num, n_jobs)
    return info


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def versions() -> dict:
    found = {"python": platform.python_version()}
    for package in ("normbench", "torch", "torchvision", "hydra-core", "wandb", "optuna"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


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


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Run:
    """One training job and its record; `execute()` returns the validation error."""

    def __init__(self, cfg: DictConfig, info: JobInfo, sweep: SweepState | None = None,
                 identity: str | None = None):
        self.cfg, self.info, self.sweep = cfg, info, sweep
        self.run_dir = info.output_dir
        self.identity = identity or run_identity(cfg)
        self.started = time.perf_counter()
        self.summary = {
            "status": "running", "identity": self.identity, SEEDLESS_IDENTITY: seedless_identity(cfg),
            "experiment": cfg.experiment_name,
            "choices": info.choices, "overrides": info.overrides, "metrics": {}, "objective": None,
            "epochs_done": 0, "diverged_epoch": None, "error": None, "device": None,
            "started_at": now_iso(), "finished_at": None, "versions": versions(),
            # where and how this job ran (parallel launchers: several jobs at once)
            "host": socket.gethostname(), "pid": os.getpid(), "job_num": info.job_num,
            "threads": None, "resumed_from_epoch": None, "started_ts": time.time(), "finished_ts": None,
        }
        self.record: RecordSink | None = None
        self.wandb: WandbSink | None = None
        # Pruner protocol: should_stop(epoch, val_error) -> bool, called after each epoch.
        self.pruner = None
        self.history: list[dict] = []

    def execute(self) -> float:
        cfg = self.cfg
        device = resolve_device(self.info.device or cfg.trainer.device)
        self.summary["device"] = str(device)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
        threads = self.info.threads or cfg.trainer.threads
        if threads:
            torch.set_num_threads(threads)
        self.summary["threads"] = torch.get_num_threads()
        seed_everything(cfg.seed)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.cuda.reset_peak_memory_stats(device)
        data = load_data(cfg.data, device)

        norm = NormSpec.from_cfg(cfg.norm)
        model = build_model(cfg.model, norm, activation_factory(cfg.activation.name), data.num_classes)
        channels_last = resolve_channels_last(cfg.trainer.channels_last, device, norm.name)
        model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
        criterion = build_criterion(cfg.loss)
        generator = torch.Generator(device=device)
        generator.manual_seed(cfg.seed)
        resize_to = cfg.model.input_size if cfg.model.input_size != data.image_size else None
        stream = BatchStream(data.train, cfg.batch_size, data.mean, data.std, augment=cfg.data.augment,
                             crop_padding=cfg.data.crop_padding, flip=cfg.data.flip, resize_to=resize_to,
                             channels_last=channels_last, drop_last=True, generator=generator)
        settings = LoopSettings(
            epochs=cfg.trainer.epochs, max_steps_per_epoch=cfg.trainer.max_steps_per_epoch,
            max_eval_batches=cfg.trainer.max_eval_batches, eval_batch_size=cfg.trainer.eval_batch_size,
            log_every_steps=cfg.trainer.log_every_steps,
            amp_dtype=resolve_precision(cfg.trainer.precision, device), channels_last=channels_last,
            progress=sys.stderr.isatty())
        optimizer = build_optimizer(cfg.optimizer, model)
        steps_per_epoch = min(len(stream), settings.max_steps_per_epoch or len(stream))
        scheduler = build_scheduler(cfg.scheduler, optimizer, settings.epochs, steps_per_epoch)
        self.summary["metrics"]["model/params"] = count_parameters(model)

        checkpoint_path = self.run_dir / CHECKPOINT
        state = load_checkpoint(checkpoint_path, identity=self.identity, model=model, optimizer=optimizer,
                                scheduler=scheduler, generator=generator)
        self._open_sinks(resumed=state)
        if state is not None:
            self.summary["resumed_from_epoch"] = state.epochs_done
            print(f"normbench: resuming {self.identity} from its epoch-{state.epochs_done} checkpoint "
                  f"in {self.run_dir}", flush=True)
        fault, fault_epoch, fault_step = fault_spec(cfg)
        if fault != "none":
            stream = FaultyStream(stream, fault, fault_epoch, fault_step, device,
                                  state.epochs_done if state else 0)
        trained = compile_model(model) if cfg.trainer.compile else model  # compiled code reused across runs
        from normbench.probes import build_probes

        trainer = Trainer(trained, criterion, optimizer, scheduler, data, stream, settings,
                          FanOut(self.record, self.wandb, ConsoleSink(cfg.trainer.epochs)),
                          build_probes(cfg.probe), device)

        def after_epoch(loop_state: LoopState) -> bool:
            """Checkpoint, then ask the pruner (if any) whether to stop: True means pruned."""
            self.summary["epochs_done"] = loop_state.epochs_done
            if cfg.trainer.checkpoint:
                save_checkpoint(checkpoint_path, identity=self.identity, model=model, optimizer=optimizer,
                                scheduler=scheduler, generator=generator, state=loop_state)
            if self.pruner is None:
                return False
            last = loop_state.history[-1]
            stop = bool(self.pruner.should_stop(last["epoch"], 1.0 - last["val/acc"]))
            if stop:
                self.summary["pruning"] = getattr(self.pruner, "last_decision", None)
            return stop

        state = trainer.run(state, on_epoch_end=after_epoch)
        self.history = state.history
        metrics = self.summary["metrics"]
        if state.status != "diverged":
            metrics["test/loss"], metrics["test/acc"] = trainer.evaluate(data.test)
        if state.history:
            last = state.history[-1]
            metrics.update({k: last[k] for k in ("train/loss", "train/acc", "val/loss", "val/acc")})
            metrics["throughput/img_s"] = float(np.mean([r["throughput/img_s"] for r in state.history]))
        metrics["val/best_acc"] = state.best_val_acc
        metrics["convergence/epoch"] = convergence_epoch(state.history)
        metrics["memory/peak_mb"] = peak_memory_mb(device)
        metrics["time/train_s"] = state.train_time_s
        weight = first_conv_weight(model)
        if weight is not None:
            self.record_images({"filters": filter_grid(weight)})
        objective = WORST_OBJECTIVE if state.status == "diverged" else 1.0 - state.best_val_acc
        self.summary.update(status=state.status, epochs_done=state.epochs_done,
                            diverged_epoch=state.diverged_epoch, objective=objective)
        return objective

    def _open_sinks(self, resumed: LoopState | None) -> None:
        cfg = self.cfg
        atomic_write_text(self.run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        self.record = RecordSink(self.run_dir, append=resumed is not None)
        if resumed is not None:
            self.record.truncate_to(resumed.step, resumed.history)
        self.record.log_summary(self.summary)
        if cfg.logger.name == "wandb":
            config = OmegaConf.to_container(cfg, resolve=True)
            config.update(choices=self.info.choices, identity=self.identity)
            tags = [f"{k}:{v}" for k, v in self.info.choices.items() if k in GROUPS] + list(cfg.logger.tags)
            self.wandb = WandbSink(project=cfg.logger.project, entity=cfg.logger.entity,
                                   group=cfg.experiment_name, name=self.info.name, tags=tags, config=config,
                                   run_dir=self.run_dir, mode=wandb_mode(cfg.logger.mode))

    def record_images(self, images: dict) -> None:
        for sink in (self.record, self.wandb):
            if sink is not None:
                sink.log_images(images)

    def finish(self, status: str | None = None, error: str | None = None, error_type: str | None = None,
               write_without_record: bool = False) -> None:
        """Write the final summary. `write_without_record`: a sweep job that failed before its record
        was opened still leaves a failed summary.json (a single run leaves nothing: see run_job)."""
        if status:
            self.summary["status"] = status
        self.summary["error"] = error
        if error_type:
            self.summary["error_type"] = error_type
        self.summary["finished_at"] = now_iso()
        self.summary["finished_ts"] = time.time()
        self.summary["metrics"]["time/total_s"] = time.perf_counter() - self.started
        try:
            for sink in (self.record, self.wandb):
                if sink is not None:
                    sink.log_summary(self.summary)
            if self.record is None and write_without_record:
                atomic_write_json(self.run_dir / SUMMARY, self.summary)
            if self.wandb is not None:
                self.wandb.finish(failed=self.summary["status"] == "failed")
        finally:
            self._bookkeeping()

    def _bookkeeping(self) -> None:
        """Sweep jobs: index entry, finished curve (for the median pruner), journal line."""
        if self.sweep is None:
            return
        summary = self.summary
        try:
            self.sweep.put(self.identity, dir=self.run_dir, status=summary["status"],
                           objective=summary["objective"], epochs_done=summary["epochs_done"],
                           time_s=summary["metrics"].get("time/total_s"))
            if summary["status"] == "completed" and self.history:
                self.sweep.add_curve(self.identity, [1.0 - row["val/acc"] for row in self.history])
            journal(self.info, self.identity, summary["status"], summary["objective"], self.run_dir)
        except OSError as err:  # never hide the run's own outcome behind a bookkeeping error
            print(f"normbench: warning: could not update the sweep index: {err}", file=sys.stderr)


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


def one_line(exc: BaseException) -> str:
    return " ".join("".join(traceback.format_exception_only(exc)).split())


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


def run_job(cfg: DictConfig, output_dir: str | Path | None = None) -> float:
    """Train one configuration, record it, and return its validation error (what sweepers minimize).

    In a sweep (multirun) the job first looks its identity up in the sweep's index: a run of the same
    training config that already completed (or diverged) is not trained again, its recorded objective
    is returned. With the basic sweeper a run that raises or runs out of memory is recorded as failed
    and the sweep goes on (the job returns the worst objective); a single run re-raises.
    """
    info = job_info(cfg, output_dir, require_output_dir=False)
    if not info.isolate:
        return _run_job(cfg, info)
    try:
        return _run_job(cfg, info)
    except Exception as exc:  # noqa: BLE001 - failure isolation: the sweep goes on
        error = str(exc) if isinstance(exc, NormbenchError) else one_line(exc)
        kind = "out of memory" if is_out_of_memory(exc) else "failed"
        print(f"normbench: job {info.job_num} {kind}: {error} -- recorded, the sweep goes on",
              file=sys.stderr, flush=True)
        journal(info, None, "failed", WORST_OBJECTIVE, None, error)
    free_memory()
    return WORST_OBJECTIVE


def _run_job(cfg: DictConfig, info: JobInfo) -> float:
    validate(cfg)
    check_pruning(cfg)
    fault_spec(cfg)
    if info.output_dir is None:
        raise NormbenchError(NO_OUTPUT_DIR)
    if info.sweep_dir is None:
        return _train(cfg, info, None, run_identity(cfg))
    state = SweepState(info.sweep_dir)
    state.ensure_index()
    identity = run_identity(cfg)
    with state.lock(identity):
        done = state.done(identity, done_statuses(pruning_on(cfg)))
        if done is not None:
            objective = done.get("objective")
            objective = WORST_OBJECTIVE if objective is None else float(objective)
            run_dir = state.run_dir(done)
            print(f"normbench: skipped {identity}: already {done['status']} in {run_dir} "
                  f"(objective {objective:.4f})", flush=True)
            journal(info, identity, "skipped", objective, run_dir)
            return objective
        info.output_dir = choose_run_dir(state, identity, info.output_dir)
        state.put(identity, dir=info.output_dir, status="running", objective=None, pid=os.getpid(),
                  host=socket.gethostname())
        return _train(cfg, info, state, identity)


def _train(cfg: DictConfig, info: JobInfo, state: SweepState | None, identity: str) -> float:
    print_config_tree(cfg)
    run = Run(cfg, info, sweep=state, identity=identity)
    try:
        run.pruner = build_pruner(cfg, run.run_dir, info.sweep_dir, identity)
        objective = run.execute()
    except NormbenchError as err:
        # a single run leaves nothing for errors caught before the run started; a sweep job records them
        if run.record is not None or info.isolate:
            run.finish("failed", error=str(err), error_type=type(err).__name__, write_without_record=True)
        raise
    except BaseException as exc:
        error_type = "OutOfMemoryError" if is_out_of_memory(exc) else type(exc).__name__
        run.finish("failed", error=one_line(exc), error_type=error_type, write_without_record=info.isolate)
        raise
    run.finish()
    return objective


def main(cfg: DictConfig) -> float:
    """Hydra task function: user errors end in one line on stderr, exit status 2."""
    try:
        return run_job(cfg)
    except NormbenchError as err:
        print(f"normbench: {err}", file=sys.stderr)
        sys.exit(2)
