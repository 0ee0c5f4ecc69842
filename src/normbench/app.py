"""run_job(cfg): validate > seed > device > data > model > loss > optimizer > scheduler > loop > record."""

from __future__ import annotations

import platform
import random
import resource
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
from normbench.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from normbench.data import BatchStream, load_data
from normbench.device import resolve_channels_last, resolve_device, resolve_precision
from normbench.errors import NormbenchError
from normbench.filters import filter_grid, first_conv_weight
from normbench.identity import run_identity
from normbench.loop import LoopSettings, LoopState, Trainer, convergence_epoch
from normbench.losses import build_criterion
from normbench.models import build_model, count_parameters
from normbench.norms import NormSpec
from normbench.optim import build_optimizer, build_scheduler
from normbench.record import RecordSink, atomic_write_text
from normbench.tracking import FanOut, WandbSink, wandb_mode
from normbench.validate import validate

GROUPS = ("data", "model", "norm", "activation", "loss", "optimizer", "scheduler", "probe")
WORST_OBJECTIVE = 1.0  # validation error of a run that diverged: worse than any real run


@dataclass
class JobInfo:
    output_dir: Path
    choices: dict = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    name: str = "default"
    multirun: bool = False


def job_info(cfg: DictConfig, output_dir: str | Path | None = None) -> JobInfo:
    """What Hydra knows about this job (output dir, group choices, overrides)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    choices: dict = {}
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        output_dir = output_dir or hydra_cfg.runtime.output_dir
        choices = {k: v for k, v in hydra_cfg.runtime.choices.items() if k in GROUPS}
        overrides = list(hydra_cfg.overrides.task)
        name = hydra_cfg.job.override_dirname or "default"
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
    else:
        overrides, name, multirun = [], "default", False
    if output_dir is None:
        raise NormbenchError("no output dir: run through bench/train.py or pass output_dir")
    for group in GROUPS:
        choices.setdefault(group, cfg[group].get("name") if group in cfg else None)
    choices.update(batch_size=cfg.batch_size, seed=cfg.seed, lr=cfg.optimizer.lr,
                   dropout=cfg.model.dropout, epochs=cfg.trainer.epochs)
    return JobInfo(Path(output_dir), choices, overrides, name, multirun)


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

    def __init__(self, cfg: DictConfig, info: JobInfo):
        self.cfg, self.info = cfg, info
        self.run_dir = info.output_dir
        self.identity = run_identity(cfg)
        self.started = time.perf_counter()
        self.summary = {
            "status": "running", "identity": self.identity, "experiment": cfg.experiment_name,
            "choices": info.choices, "overrides": info.overrides, "metrics": {}, "objective": None,
            "epochs_done": 0, "diverged_epoch": None, "error": None, "device": None,
            "started_at": now_iso(), "finished_at": None, "versions": versions(),
        }
        self.record: RecordSink | None = None
        self.wandb: WandbSink | None = None
        # Pruner protocol: should_stop(epoch, val_error) -> bool, called after each epoch.
        self.pruner = None

    def execute(self) -> float:
        cfg = self.cfg
        device = resolve_device(cfg.trainer.device)
        self.summary["device"] = str(device)
        if cfg.trainer.threads:
            torch.set_num_threads(cfg.trainer.threads)
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
        if len(stream) == 0:
            raise NormbenchError(f"bad value batch_size={cfg.batch_size}: larger than the training split "
                                 f"({len(data.train)} images); use a smaller batch_size")
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
        trained = torch.compile(model) if cfg.trainer.compile else model
        from normbench.probes import build_probes

        trainer = Trainer(trained, criterion, optimizer, scheduler, data, stream, settings,
                          FanOut(self.record, self.wandb), build_probes(cfg.probe), device)
        trainer.resize_to = resize_to

        def after_epoch(loop_state: LoopState) -> bool:
            """Checkpoint, then ask the pruner (if any) whether to stop: True means pruned."""
            if cfg.trainer.checkpoint:
                save_checkpoint(checkpoint_path, identity=self.identity, model=model, optimizer=optimizer,
                                scheduler=scheduler, generator=generator, state=loop_state)
            if self.pruner is None:
                return False
            last = loop_state.history[-1]
            return self.pruner.should_stop(last["epoch"], 1.0 - last["val/acc"])

        state = trainer.run(state, on_epoch_end=after_epoch)
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

    def finish(self, status: str | None = None, error: str | None = None) -> None:
        if status:
            self.summary["status"] = status
        self.summary["error"] = error
        self.summary["finished_at"] = now_iso()
        self.summary["metrics"]["time/total_s"] = time.perf_counter() - self.started
        for sink in (self.record, self.wandb):
            if sink is not None:
                sink.log_summary(self.summary)
        if self.record is not None:
            self.record.close()
        if self.wandb is not None:
            self.wandb.finish(failed=self.summary["status"] == "failed")


def run_job(cfg: DictConfig, output_dir: str | Path | None = None) -> float:
    """Train one configuration, record it, and return its validation error (what sweepers minimize)."""
    validate(cfg)
    info = job_info(cfg, output_dir)
    print_config_tree(cfg)
    run = Run(cfg, info)
    try:
        objective = run.execute()
    except NormbenchError as err:
        if run.record is not None:  # nothing is written for errors caught before the run started
            run.finish("failed", error=str(err))
        raise
    except BaseException as exc:
        run.finish("failed", error="".join(traceback.format_exception_only(exc)).strip())
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
