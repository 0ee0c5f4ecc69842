"""Check a composed config once, before anything expensive happens, and return it parsed.

`validate(cfg)` reads every group (data, model, norm, activation, loss, optimizer, scheduler, trainer,
probe, pruning, the injected fault), raises one ConfigError naming the key, the value and the fix for the
first bad value, and returns the `RunSpec` the job passes on. No data is loaded, no GPU memory is touched
and no record or W&B run is opened: the model is built once on PyTorch's "meta" device (no memory, no
compute), which checks the model's own arguments, the norm's constraints (GroupNorm's groups must divide
every normalized layer) and that its `_target_` is allowed.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import nn

from normbench.activations import activation_factory
from normbench.device import resolve_channels_last, resolve_device, resolve_precision
from normbench.errors import ConfigError
from normbench.faults import FaultSpec, fault_spec
from normbench.losses import Criterion, build_criterion
from normbench.models import build_model, model_name
from normbench.norms import NormSpec
from normbench.optim import SCHEDULERS
from normbench.probes import Probe, build_probes
from normbench.sweep.pruning import check_pruning
from normbench.targets import allowed_targets, check_target
from normbench.trainer import LoopSettings

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
TARGETS = {"model": ("model",), "data": ("data",), "optimizer": ("optimizer",), "scheduler": ("scheduler", "fn")}


@dataclass(frozen=True)
class DataShape:
    """What the dataset returns, as its config states it (checked again when it is loaded)."""
    num_classes: int
    channels: int
    image_size: int


@dataclass(frozen=True)
class RunSpec:
    """A config that passed validation, parsed: what the job hands to the run."""
    batch_size: int
    seed: int
    device: torch.device
    norm: NormSpec
    activation: Callable[[], nn.Module]
    criterion: Criterion
    probes: tuple[Probe, ...]
    pruning: dict
    fault: FaultSpec
    data: DataShape
    input_size: int                 # the square size the model receives
    channels_last: bool
    settings: LoopSettings
    allowed_targets: tuple[str, ...]


def _require(cond: bool, key: str, value, allowed: str) -> None:
    if not cond:
        raise ConfigError(key, value, allowed)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _select(cfg, path: tuple[str, ...]):
    node = cfg
    for part in path:
        node = node[part]
    return node


def _data_shape(data) -> DataShape:
    for key in ("num_classes", "channels", "image_size"):
        value = data.get(key)
        _require(_is_int(value) and value >= (2 if key == "num_classes" else 1), f"data.{key}", value,
                 "must state what the dataset returns: an integer (classes >= 2, channels and size >= 1)")
    for key in ("mean", "std"):
        value = data.get(key)
        ok = value is None or (len(value) in (1, data.channels) and all(_is_number(v) for v in value))
        _require(ok, f"data.{key}", value, f"must be null (computed from the training split), one number "
                                           f"(for every channel) or {data.channels} numbers, one per channel")
    std = data.get("std")
    _require(std is None or all(v > 0 for v in std), "data.std", std, "must be > 0")
    val_size, split_seed = data.get("val_size"), data.get("split_seed")
    _require(_is_int(val_size) and val_size >= 0, "data.val_size", val_size,
             "must be an integer >= 0 (0: train on every training image, validate on the test set)")
    _require(_is_int(split_seed), "data.split_seed", split_seed, "must be an integer")
    padding = data.get("crop_padding")
    _require(_is_int(padding) and padding >= 0, "data.crop_padding", padding,
             "use an integer >= 0 (0 turns cropping off)")
    for key in ("augment", "flip"):
        _require(isinstance(data.get(key), bool), f"data.{key}", data.get(key), "must be true or false")
    return DataShape(int(data.num_classes), int(data.channels), int(data.image_size))


def _optimizer(cfg) -> None:
    lr = cfg.optimizer.get("lr")
    _require(_is_number(lr) and lr > 0 and math.isfinite(lr), "optimizer.lr", lr,
             "must be a number > 0, e.g. optimizer.lr=0.01")
    wd = cfg.optimizer.get("weight_decay", 0.0)
    _require(_is_number(wd) and wd >= 0, "optimizer.weight_decay", wd, "must be >= 0")
    _require(cfg.scheduler.name in SCHEDULERS, "scheduler.name", cfg.scheduler.name,
             f"choose one of {', '.join(SCHEDULERS)}")


def _trainer(cfg, device: torch.device, norm: NormSpec) -> tuple[LoopSettings, bool]:
    t = cfg.trainer
    _require(_is_int(t.epochs) and t.epochs >= 1, "trainer.epochs", t.epochs, "must be an integer >= 1")
    _require(t.precision in PRECISIONS, "trainer.precision", t.precision, f"choose one of {', '.join(PRECISIONS)}")
    _require(t.channels_last in ("auto", True, False), "trainer.channels_last", t.channels_last,
             "choose auto, true or false")
    for key in ("max_steps_per_epoch", "max_eval_batches"):
        value = t[key]
        _require(value is None or (_is_int(value) and value >= 1), f"trainer.{key}", value,
                 "must be null or an integer >= 1")
    for key in ("log_every_steps", "eval_batch_size"):
        _require(_is_int(t[key]) and t[key] >= 1, f"trainer.{key}", t[key], "must be an integer >= 1")
    _require(_is_int(t.threads) and t.threads >= 0, "trainer.threads", t.threads, "must be an integer >= 0")
    _require(isinstance(t.get("drop_last", True), bool), "trainer.drop_last", t.get("drop_last"),
             "must be true (drop the last partial batch) or false (keep it, as study 002 did)")
    channels_last = resolve_channels_last(t.channels_last, device, norm.name, model_name(cfg.model))
    settings = LoopSettings(
        epochs=t.epochs, max_steps_per_epoch=t.max_steps_per_epoch, max_eval_batches=t.max_eval_batches,
        eval_batch_size=t.eval_batch_size, log_every_steps=t.log_every_steps,
        amp_dtype=resolve_precision(t.precision, device), channels_last=channels_last,
        progress=sys.stderr.isatty())
    return settings, channels_last


def validate(cfg: DictConfig, device: str | None = None) -> RunSpec:
    """Parse and check every group; `device` is where the job was placed (default: trainer.device)."""
    bs = cfg.batch_size
    _require(_is_int(bs) and bs > 0, "batch_size", bs, "must be a positive integer, e.g. batch_size=128")
    _require(_is_int(cfg.seed) and cfg.seed >= 0, "seed", cfg.seed, "must be an integer >= 0")
    allowed = allowed_targets(cfg)
    for path in TARGETS.values():
        check_target(".".join((*path, "_target_")), _select(cfg, path), allowed)
    data = _data_shape(cfg.data)
    dropout = cfg.model.get("dropout", 0.0)
    _require(_is_number(dropout) and 0 <= dropout < 1, "model.dropout", dropout, "must be in [0, 1)")
    width = cfg.model.get("width", 1.0)
    _require(_is_number(width) and width > 0, "model.width", width, "must be > 0")
    size = cfg.model.get("input_size")
    _require(size is None or (_is_int(size) and size >= 8), "model.input_size", size,
             "must be null (the dataset's size) or an integer >= 8")
    _optimizer(cfg)
    norm = NormSpec.from_cfg(cfg.norm)
    activation = activation_factory(cfg.activation.name)
    input_size = int(size) if size is not None else data.image_size
    with torch.device("meta"):  # the model's own checks, on no memory
        build_model(cfg.model, num_classes=data.num_classes, in_channels=data.channels, image_size=input_size,
                    norm=norm.make, activation=activation, allowed_targets=allowed)
    resolved = resolve_device(device or cfg.trainer.device)
    settings, channels_last = _trainer(cfg, resolved, norm)
    return RunSpec(
        batch_size=bs, seed=cfg.seed, device=resolved, norm=norm, activation=activation,
        criterion=build_criterion(cfg.loss), probes=tuple(build_probes(cfg.probe)), pruning=check_pruning(cfg),
        fault=fault_spec(cfg), data=data, input_size=input_size, channels_last=channels_last,
        settings=settings, allowed_targets=allowed)
