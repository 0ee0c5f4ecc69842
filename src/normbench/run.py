"""One training run: its parts built from a validated config, trained, and recorded.

It knows nothing of sweeps: the job (normbench.job) decides where the run's record goes, whether it runs
at all, and what happens when it fails. `build_parts` is the one place that builds a run's data, model,
batch stream, optimizer, scheduler and trainer; the benchmarks (normbench.perf) use it too.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import os
import platform
import random
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from normbench import fused_launch
from normbench.checkpoint import UnusableCheckpoint, load_checkpoint, read_best, save_best, save_checkpoint
from normbench.data import BatchStream, DataBundle, load_data
from normbench.device import compile_model
from normbench.faults import FaultyStream
from normbench.filters import filter_grid, first_conv_weight
from normbench.loggers import ConsoleSink, FanOut, TensorBoardSink, WandbSink, final_line, wandb_mode
from normbench.models import build_model, count_parameters
from normbench.optim import LR_REF_BATCH, build_optimizer, build_scheduler
from normbench.record import (
    BEST,
    CHECKPOINT,
    CONFIG,
    PROBES,
    SEEDLESS_IDENTITY,
    STEPS,
    SUMMARY,
    WANDB_FILES,
    WANDB_RUN_ID,
    WANDB_URL,
    RecordSink,
    Status,
    atomic_write_json,
    atomic_write_text,
    learned_threshold,
    now_iso,
    read_rows,
    read_summary,
)
from normbench.trainer import LoopState, Trainer, convergence_epoch
from normbench.validate import RunSpec

WORST_OBJECTIVE = 1.0  # validation error of a run that diverged or failed: worse than any real run
TAG_GROUPS = ("data", "model", "norm", "activation", "loss", "optimizer", "scheduler", "probe")


# --------------------------------------------------------------------------------------------------------
# the parts


@dataclass
class RunParts:
    data: DataBundle
    model: nn.Module                 # as built (checkpoints and the filter image read it)
    generator: torch.Generator       # the batch order and augmentation (checkpointed)
    stream: BatchStream | FaultyStream
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    trainer: Trainer                 # trains model, or its compiled version


def build_parts(cfg: DictConfig, spec: RunSpec, sink=None,
                on_data: Callable[[DataBundle], None] | None = None) -> RunParts:
    """Data, model, batch stream, optimizer, scheduler and trainer of one run, on `spec.device`, seeded
    by `spec.seed`. `sink` receives the trainer's metrics (default: none; it can be set later).
    `on_data` is called once the data is on the device, before anything else is built."""
    device, allowed = spec.device, spec.allowed_targets
    random.seed(spec.seed)
    np.random.seed(spec.seed % 2**32)
    torch.manual_seed(spec.seed)
    data = load_data(cfg.data, device, allowed, input_size=spec.input_size, pipeline=spec.data)
    if on_data is not None:
        on_data(data)
    model = build_model(cfg.model, num_classes=data.num_classes, in_channels=data.channels,
                        image_size=spec.input_size, norm=spec.norm.make, activation=spec.activation,
                        allowed_targets=allowed)
    layout = torch.channels_last if spec.channels_last else torch.preserve_format
    model = model.to(device, memory_format=layout)
    generator = torch.Generator(device=device)
    generator.manual_seed(spec.seed)
    stream = BatchStream(data.train, spec.batch_size, data.mean, data.std, augment=spec.data.augment,
                         crop_padding=spec.data.crop_padding, flip=spec.data.flip,
                         resize_to=spec.input_size if spec.input_size != data.image_size else None,
                         channels_last=spec.channels_last, drop_last=spec.trainer.drop_last,
                         generator=generator)
    if spec.trainer.fault not in (None, "none"):
        stream = FaultyStream(stream, spec.trainer, device)
    reference = cfg.optimizer.get(LR_REF_BATCH)  # Goyal et al.'s linear rule: lr x batch_size / reference
    scale = spec.batch_size / reference if reference else 1.0
    optimizer = build_optimizer(cfg.optimizer, model, allowed, scale)
    settings, batches = spec.settings, len(stream)
    scheduler = build_scheduler(cfg.scheduler, optimizer, settings.total_steps(batches),
                                settings.steps_per_epoch(batches), allowed, scale)
    trained = compile_model(model) if spec.trainer.compile else model  # compiled code reused across runs
    trainer = Trainer(trained, spec.criterion, optimizer, scheduler, data, stream, settings,
                      sink if sink is not None else FanOut(), list(spec.probes), device)
    return RunParts(data, model, generator, stream, optimizer, scheduler, trainer)


# --------------------------------------------------------------------------------------------------------
# the run


@dataclass
class RunInfo:
    """What the job tells the run: where its record goes and what to call it."""
    output_dir: Path | None          # the run's record dir
    identity: str = ""
    seedless_identity: str = ""
    choices: dict = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    name: str = "default"            # the W&B run's name
    job_num: int | None = None       # multirun only: Hydra's job number
    optuna: dict | None = None       # {"study": ..., "trial": ...} for an Optuna trial (into the W&B config)
    threads: int = 0                 # torch CPU threads (0: trainer.threads, else torch's default)


class RunMemory:
    """One run's own peak memory, the data excluded, from a reset made once its data is on the device (how
    on each device: docs/training.md, "Peak memory"): jobs of a sweep share a process, whose peak only grows
    from job to job. MPS has no peak counter: its allocation at the end minus that at the reset."""

    def __init__(self, device: torch.device, in_sweep: bool = False):
        self.device, self.in_sweep = device, in_sweep
        self.baseline: float | None = None
        self.file_baseline: float | None = None
        self.data_mb: float | None = None  # the three splits on the device, reported separately

    _modules_frozen = 0  # len(sys.modules) at the last gc.freeze of this process

    def collect(self) -> None:
        """In a sweep job, before its data is loaded: the garbage of the jobs before it (a single run has
        none). After modules were imported (the first job's; W&B's, in it) what survives is frozen, so that
        a collection walks only what jobs allocated since: 1 ms, not 0.3-0.6 s for all (40 ms for W&B's)."""
        if not self.in_sweep:
            return
        _import_early(2)
        gc.collect()
        if len(sys.modules) != RunMemory._modules_frozen:
            gc.freeze()
            RunMemory._modules_frozen = len(sys.modules)

    def start(self, data: DataBundle) -> None:
        self.data_mb = sum(t.numel() * t.element_size() for split in (data.train, data.val, data.test)
                           for t in (split.images, split.labels)) / 2**20
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device) / 2**20
        elif self.device.type == "mps":
            self.baseline = torch.mps.driver_allocated_memory() / 2**20
        else:
            _import_early(1)
            if self.in_sweep and sys.platform.startswith("linux"):
                with contextlib.suppress(OSError, AttributeError):  # not glibc
                    ctypes.CDLL(None).malloc_trim(0)
            self.baseline = _reset_rss_peak()
            self.file_baseline = _proc_status_mb("RssFile")

    def peak_mb(self) -> float | None:
        if self.baseline is None:
            return None
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self.baseline
        if self.device.type == "mps":
            return torch.mps.driver_allocated_memory() / 2**20 - self.baseline
        peak, paged_in = _proc_status_mb("VmHWM"), 0.0
        if peak is None:
            return None
        file_now = _proc_status_mb("RssFile")
        if file_now is not None and self.file_baseline is not None:
            paged_in = max(file_now - self.file_baseline, 0.0)
        return max(peak - self.baseline - paged_in, 0.0)


def _import_early(count: int) -> None:
    """Import the first `count` modules a run imports late, before its memory baseline: torch._dynamo,
    then torchvision.utils (the filter image, drawn after the peak is read): only in a sweep, whose later
    jobs would otherwise measure from another baseline; a single run keeps it off its start-up path."""
    for module in ("torch._dynamo", "torchvision.utils")[:count]:
        with contextlib.suppress(ImportError):
            importlib.import_module(module)


def _proc_status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":")), None)
    except OSError:
        return None


def _reset_rss_peak() -> float | None:
    """Reset the process's RSS high-water mark to the current RSS (Linux); the RSS in MiB, or None."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    rss, hwm = _proc_status_mb("VmRSS"), _proc_status_mb("VmHWM")
    if rss is None or hwm is None or hwm > rss + 1.0:  # the reset did not take
        return None
    return rss


def versions() -> dict:
    found = {"python": platform.python_version()}
    for package in ("normbench", "torch", "torchvision", "hydra-core", "wandb", "optuna"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


class Run:
    """One training run and its record; `execute()` returns the validation error."""

    def __init__(self, cfg: DictConfig, spec: RunSpec, info: RunInfo):
        self.cfg, self.spec, self.info = cfg, spec, info
        self.run_dir = info.output_dir
        self.identity = info.identity
        self.pruner = None  # the job's: should_stop(epoch, val_error) -> bool, asked after each epoch
        self.started = time.perf_counter()
        self.summary = {
            "status": Status.RUNNING, "identity": info.identity, SEEDLESS_IDENTITY: info.seedless_identity,
            "experiment": cfg.experiment_name, "choices": info.choices, "overrides": info.overrides,
            "metrics": {}, "objective": None, "epochs_done": 0, "diverged_epoch": None, "error": None,
            "device": str(spec.device), "started_at": now_iso(), "finished_at": None, "versions": versions(),
            # where and how this job ran (parallel launchers: several jobs at once)
            "host": socket.gethostname(), "pid": os.getpid(), "job_num": info.job_num,
            "threads": None, "resumed_from_epoch": None, "started_ts": time.time(), "finished_ts": None,
            # early stopping, best.pt and the weights the test metrics come from
            "stop_reason": None, "stopped_epoch": None, "best_epoch": None, "test_on": spec.trainer.test_on,
            "tested_epoch": None,
        }
        self.record: RecordSink | None = None
        self.wandb: WandbSink | None = None
        self.tensorboard: TensorBoardSink | None = None
        self.keeps_best = spec.trainer.checkpoint or spec.trainer.test_on == "best" or spec.logger.log_model
        self.history: list[dict] = []
        self.memory = RunMemory(spec.device, in_sweep=info.job_num is not None)

    def execute(self) -> float:
        self._claim_device()
        self.memory.collect()
        parts = build_parts(self.cfg, self.spec, on_data=self.memory.start)
        self.summary["data_dir"] = parts.data.folder  # the files really read (data.root is where to look)
        peak = parts.optimizer.param_groups[0].get("max_lr")  # one-cycle's, scaled as the lr is
        self.summary["metrics"].update({"model/params": count_parameters(parts.model),
                                        "optimizer/lr_effective": parts.optimizer.defaults["lr"],
                                        **({"scheduler/max_lr_effective": peak} if peak else {})})
        try:
            state = load_checkpoint(self.run_dir / CHECKPOINT, identity=self.identity, model=parts.model,
                                    optimizer=parts.optimizer, scheduler=parts.scheduler,
                                    generator=parts.generator)
        except UnusableCheckpoint:  # set aside, and the parts may be half restored: from scratch
            parts, state = build_parts(self.cfg, self.spec), None
        self._open_sinks(resumed=state)
        parts.trainer.sink = FanOut(*self.sinks.sinks, ConsoleSink(self.spec.settings.epochs))
        if state is not None:
            self.summary["resumed_from_epoch"] = self.summary["epochs_done"] = state.epochs_done
            self._keep_best(parts, state)  # the attempt may have been killed between checkpoint and best.pt
            if isinstance(parts.stream, FaultyStream):
                parts.stream.current_epoch = state.epochs_done
                parts.stream.resumed = True
            print(f"normbench: resuming {self.identity} from its epoch-{state.epochs_done} checkpoint "
                  f"in {self.run_dir}", flush=True)
        state = fused_launch.train(parts.trainer, state, on_epoch_end=lambda s: self._after_epoch(parts, s))
        self.history = state.history
        self._final_metrics(parts, state)
        objective = WORST_OBJECTIVE if state.status == Status.DIVERGED else 1.0 - state.best_val_acc
        self.summary.update(status=state.status, epochs_done=state.epochs_done, objective=objective,
                            diverged_epoch=state.diverged_epoch, best_epoch=state.best_epoch,
                            stop_reason=state.stop_reason,
                            stopped_epoch=state.epochs_done if state.stop_reason else None)
        return objective

    @property
    def sinks(self) -> FanOut:
        """The record and the trackers that are on (the console is the trainer's alone)."""
        return FanOut(self.record, self.wandb, self.tensorboard)

    def _claim_device(self) -> None:
        device = self.spec.device
        if device.type == "cuda":
            if device.index is not None:
                torch.cuda.set_device(device)
            torch.backends.cudnn.benchmark = True
        threads = self.info.threads or self.spec.trainer.threads
        if threads:
            torch.set_num_threads(threads)
        self.summary["threads"] = torch.get_num_threads()

    def _after_epoch(self, parts: RunParts, state: LoopState) -> bool:
        """Checkpoint, then ask the pruner (if any) whether to stop: True means pruned."""
        self.summary["epochs_done"] = state.epochs_done
        if self.spec.trainer.checkpoint:
            save_checkpoint(self.run_dir / CHECKPOINT, identity=self.identity, model=parts.model,
                            optimizer=parts.optimizer, scheduler=parts.scheduler, generator=parts.generator,
                            state=state)
        self._keep_best(parts, state)
        if self.pruner is None:
            return False
        last = state.history[-1]
        stop = bool(self.pruner.should_stop(last["epoch"], 1.0 - last["val/acc"]))
        if stop:
            self.summary["pruning"] = getattr(self.pruner, "last_decision", None)
        return stop

    def _keep_best(self, parts: RunParts, state: LoopState) -> None:
        """best.pt after the checkpoint, when the epoch just done is the best so far."""
        if self.keeps_best and state.history and state.best_epoch == state.epochs_done:
            save_best(self.run_dir / BEST, identity=self.identity, model=parts.model, row=state.history[-1])

    def _test(self, parts: RunParts, state: LoopState) -> None:
        """The test metrics of the last epoch's weights, or of best.pt's (trainer.test_on=best); best.pt as
        the W&B model artifact (logger.log_model)."""
        log_model = self.wandb is not None and self.spec.logger.log_model
        load = self.spec.trainer.test_on == "best" and state.best_epoch != state.epochs_done  # else in memory
        best = read_best(self.run_dir / BEST, identity=self.identity, epoch=state.best_epoch) \
            if load or log_model else None
        self.summary["tested_epoch"] = state.epochs_done
        if load:
            if best is None:
                raise RuntimeError(f"{self.run_dir / BEST} does not hold epoch {state.best_epoch}'s weights")
            parts.model.load_state_dict(best["model"])
            self.summary["tested_epoch"] = best["epoch"]
        metrics = self.summary["metrics"]
        metrics["test/loss"], metrics["test/acc"] = parts.trainer.evaluate(parts.data.test)
        if best is not None and log_model:
            self.wandb.log_model(self.run_dir / BEST, {"epoch": best["epoch"], "val/acc": best["val/acc"]})

    def _final_metrics(self, parts: RunParts, state: LoopState) -> None:
        metrics = self.summary["metrics"]
        if state.status != Status.DIVERGED:
            self._test(parts, state)
        if state.history:
            last = state.history[-1]
            metrics.update({k: last[k] for k in ("train/loss", "train/acc", "val/loss", "val/acc")})
            metrics["throughput/img_s"] = float(np.mean([r["throughput/img_s"] for r in state.history]))
        metrics.update({"train/steps": state.step, "train/images": state.images})
        metrics["val/best_acc"] = state.best_val_acc
        planned = self.spec.settings.epochs * self.spec.settings.steps_per_epoch(len(parts.stream))
        self.summary["cut_by_max_steps"] = (state.status == Status.COMPLETED and state.stop_reason is None
                                            and state.step < planned)
        learned = learned_threshold(parts.data.num_classes, int(parts.data.val.labels.numel()))
        metrics["convergence/epoch"] = convergence_epoch(state.history, learned_above=learned)
        metrics["memory/peak_mb"] = self.memory.peak_mb()
        metrics["memory/data_mb"] = self.memory.data_mb
        metrics["time/train_s"] = state.train_time_s
        weight = first_conv_weight(parts.model)
        if weight is not None:
            self.sinks.log_images({"filters": filter_grid(weight)})

    def _open_sinks(self, resumed: LoopState | None) -> None:
        cfg = self.cfg
        previous = read_summary(self.run_dir)  # an earlier attempt's record of this run, if any
        atomic_write_text(self.run_dir / CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
        self.record = RecordSink(self.run_dir, append=resumed is not None)
        if resumed is not None:
            self.record.truncate_to(resumed.step, resumed.history)
        if self.spec.logger.wandb:
            self._open_wandb(previous, resumed)
        if self.spec.logger.tensorboard:
            hparams = {**self.info.choices, "identity": self.identity}
            self.tensorboard = TensorBoardSink(self.run_dir, hparams, resumed.step if resumed else None)
        self.record.log_summary(self.summary)

    def _open_wandb(self, previous: dict | None, resumed: LoopState | None) -> None:
        """The W&B run of this record: the earlier attempt's (same id) when there is one, which then
        gets the record's rows again (W&B keeps the steps it lacks)."""
        cfg, info, logger = self.cfg, self.info, self.spec.logger
        config = OmegaConf.to_container(cfg, resolve=True)
        config.update(choices=info.choices, identity=info.identity)
        if info.optuna:
            config["optuna"] = dict(info.optuna)
        tags = [f"{k}:{v}" for k, v in info.choices.items() if k in TAG_GROUPS] + list(logger.tags)
        same_run = previous is not None and previous.get("identity") == info.identity
        run_id = previous.get(WANDB_RUN_ID) if same_run else None
        # WANDB_DIR, when set, is where W&B keeps its files; else the record dir
        files_dir = None if os.environ.get("WANDB_DIR") else self.run_dir
        self.wandb = WandbSink(project=logger.project, entity=logger.entity, group=cfg.experiment_name,
                               name=info.name, tags=tags, config=config, run_dir=files_dir,
                               mode=wandb_mode(logger.mode), run_id=run_id)
        self.summary.update({WANDB_RUN_ID: self.wandb.run_id, WANDB_URL: self.wandb.url,
                             WANDB_FILES: str(self.wandb.files_dir)})
        if resumed is not None:
            self.wandb.replay(read_rows(self.run_dir / STEPS), list(resumed.history),
                              read_rows(self.run_dir / PROBES))

    def finish(self, status: Status | None = None, error: str | None = None, error_type: str | None = None,
               write_without_record: bool = False) -> None:
        """Write the final summary and close the W&B run. `write_without_record`: a sweep job that failed
        before its record was opened still leaves a failed summary.json (a single run leaves nothing)."""
        if status:
            self.summary["status"] = status
        self.summary["error"] = error
        if error_type:
            self.summary["error_type"] = error_type
        self.summary["finished_at"] = now_iso()
        self.summary["finished_ts"] = time.time()
        self.summary["metrics"]["time/total_s"] = time.perf_counter() - self.started
        try:
            self.sinks.log_summary(self.summary)
            if self.record is None and write_without_record:
                atomic_write_json(self.run_dir / SUMMARY, self.summary)
        finally:  # the trackers are closed even when the record cannot be written
            for tracker in (self.wandb, self.tensorboard):
                if tracker is not None:
                    tracker.finish(failed=self.summary["status"] in (Status.FAILED, Status.INTERRUPTED))
        if self.record is not None or write_without_record:
            print(final_line(self.summary, self.run_dir, self.wandb), flush=True)
