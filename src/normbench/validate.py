"""Check a composed config once, before anything expensive happens, and return it parsed (`RunSpec`).

`validate(cfg)` parses every group into its schema (normbench.schema), then checks what a schema cannot:
the optimizer's and the scheduler's arguments against their torch signatures, a model's or dataset's own
keys against its builder's, the cross-field rules, and the model itself, built once on PyTorch's "meta"
device (no memory, no compute), which also refuses a model too large for the device's memory. The first
bad value raises one ConfigError naming the key, the value and the fix.
"""

from __future__ import annotations

import inspect
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from normbench.activations import activation_factory
from normbench.device import resolve_channels_last, resolve_device, resolve_precision
from normbench.errors import ConfigError, one_line, unknown_key
from normbench.faults import check_fault
from normbench.losses import Criterion, build_criterion
from normbench.models import build_model, model_name
from normbench.norms import NormSpec
from normbench.optim import LR_REF_BATCH, optimizer_factory
from normbench.preflight import check_experiment_name
from normbench.probes import Probe, build_probes
from normbench.pruning import pruning_spec
from normbench.schema import (
    DataConf,
    LoggerConf,
    ModelConf,
    PruningConf,
    RunConf,
    TrainerConf,
    keys,
    parse,
    parse_data,
    plain,
)
from normbench.targets import allowed_targets, check_target
from normbench.trainer import LoopSettings

# conf/config.yaml's top level besides RunConf's keys: its groups and its other values (a `+key=value`
# there that is none of these is read by nothing).
TOP_LEVEL = ("data", "model", "norm", "activation", "loss", "optimizer", "scheduler", "trainer", "logger",
             "probe", "pruning", "search", "experiment_name", "trusted_targets")
BYTES_PER_PARAMETER = 16       # fp32 weight + gradient + two optimizer moments (Adam), before activations
# torch.optim arguments torch accepts out of their meaningful range (or refuses with a traceback).
OPTIMIZER_RANGES = {
    "lr": (lambda v: v > 0, "must be a number > 0, e.g. optimizer.lr=0.01"),
    "momentum": (lambda v: 0 <= v < 1, "must be in [0, 1), e.g. optimizer.momentum=0.9"),
    "dampening": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "alpha": (lambda v: 0 <= v < 1, "must be in [0, 1), e.g. optimizer.alpha=0.99"),
    "weight_decay": (lambda v: v >= 0, "must be >= 0"),
    "eps": (lambda v: v > 0, "must be > 0, e.g. optimizer.eps=1e-8"),
    "lr_decay": (lambda v: v >= 0, "must be >= 0"),
    "initial_accumulator_value": (lambda v: v >= 0, "must be >= 0"),
}
# Scheduler arguments normbench fills in from the run's length (a value in the config would be ignored).
SCHEDULER_FILLED = {"optimizer", "T_max", "step_size", "total_steps", "max_lr", "cycle_momentum", "epochs",
                    "steps_per_epoch"}
# The model protocol's arguments (normbench passes them; a config key of that name would clash).
PROTOCOL_ARGS = {"num_classes", "in_channels", "image_size", "norm", "activation"}
# The schedulers (normbench.optim.build_scheduler) and the keys of the scheduler group each reads.
SCHEDULER_KEYS = {"constant": (), "cosine": (), "step": ("every_epochs",), "onecycle": ("max_lr",)}
TARGETS = ("model", "data", "optimizer", "scheduler.fn")


@dataclass(frozen=True)
class RunSpec:
    """A config that passed validation, parsed: everything the run reads."""
    batch_size: int
    seed: int
    device: torch.device
    norm: NormSpec
    activation: Callable[[], nn.Module]
    criterion: Criterion
    probes: tuple[Probe, ...]
    pruning: PruningConf
    data: DataConf
    trainer: TrainerConf
    logger: LoggerConf
    input_size: int                 # the square size the model receives
    channels_last: bool
    settings: LoopSettings
    allowed_targets: tuple[str, ...]


def _require(cond: bool, key: str, value, allowed: str) -> None:
    if not cond:
        raise ConfigError(key, value, allowed)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _data(node) -> DataConf:
    """The keys every dataset shares (schema), the dataset's own (its builder's), and the statistics."""
    data = parse_data(node)
    _builder_keys("data", node, ("_target_", *keys(DataConf)))
    for key in ("mean", "std"):
        value = getattr(data, key)
        _require(value is None or len(value) in (1, data.channels), f"data.{key}", value,
                 f"must be null (computed from the training split), one number (for every channel) or "
                 f"{data.channels} numbers, one per channel")
    _require(data.std is None or all(v > 0 for v in data.std), "data.std", data.std, "must be > 0")
    return data


def _signature(target: str, named_only: bool = False) -> dict | None:
    """The keyword arguments a `_target_` takes, with their defaults; None when it takes any (**kwargs,
    unless `named_only`) or has no signature to read."""
    from hydra.utils import get_object

    try:
        params = inspect.signature(get_object(target)).parameters.values()
    except (TypeError, ValueError):
        return None
    if not named_only and any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return {p.name: p.default for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _optimizer(cfg, allowed: tuple[str, ...]) -> None:
    opt = cfg.optimizer
    target = opt._target_
    takes = _signature(target)
    given = [k for k in opt if k not in ("_target_", "_partial_", LR_REF_BATCH)]
    reference = opt.get(LR_REF_BATCH)
    _require(reference is None or (isinstance(reference, int) and not isinstance(reference, bool)
                                   and reference >= 1), f"optimizer.{LR_REF_BATCH}", reference,
             "must be null (no scaling) or a positive integer: the batch size optimizer.lr is meant for "
             "(lr x batch_size / lr_ref_batch), e.g. optimizer.lr_ref_batch=64")
    for key in given:
        if takes is not None and (key not in takes or key == "params"):
            raise unknown_key(f"optimizer.{key}", opt[key], set(takes) - {"params"},
                              f"unknown key ({target} does not take it)")
    for key in ("lr", *(k for k in given if k != "lr")):  # lr has no default: it must be given
        value, default = opt.get(key), (takes or {}).get(key)
        if key in OPTIMIZER_RANGES:
            in_range, allowed_text = OPTIMIZER_RANGES[key]
            _require(_is_number(value) and math.isfinite(value) and in_range(value), f"optimizer.{key}",
                     value, allowed_text)
        elif key == "betas":
            ok = (OmegaConf.is_list(value) or isinstance(value, (list, tuple))) and len(value) == 2 and all(
                _is_number(b) and 0 <= b < 1 for b in value)
            _require(ok, "optimizer.betas", plain(value), "must be two numbers in [0, 1), e.g. "
                                                           "optimizer.betas=[0.9,0.999]")
        elif isinstance(default, bool):
            _require(isinstance(value, bool) or (value is None and key in ("foreach", "fused")),
                     f"optimizer.{key}", value, "must be true or false")
        elif _is_number(default):
            _require(_is_number(value) and math.isfinite(value), f"optimizer.{key}", value,
                     "must be a number")
    try:  # torch's own argument checks (nesterov without momentum, ...) on one throwaway parameter
        optimizer_factory(opt, allowed_targets=allowed)([torch.zeros(1, requires_grad=True)])
    except Exception as err:  # noqa: BLE001 - whatever torch refuses becomes one line
        cause = err.__cause__ or err
        raise ConfigError("optimizer", plain(opt), f"{target} refused these arguments: "
                                                    f"{one_line(cause, typed=False)}") from None


def _scheduler(cfg, epochs: int) -> None:
    sched = cfg.scheduler
    name = sched.get("name")
    _require(name in SCHEDULER_KEYS, "scheduler.name", name, f"choose one of {', '.join(SCHEDULER_KEYS)}")
    # a key another scheduler reads is fine (a preset sweeping schedulers sets e.g. max_lr for all of them)
    accepted = {"name", "fn", *(k for keys in SCHEDULER_KEYS.values() for k in keys)}
    for key in sched:
        if key not in accepted:
            raise unknown_key(f"scheduler.{key}", sched[key], accepted, "unknown key (no scheduler reads it)")
    fn = sched.fn
    takes = _signature(fn._target_)
    for key in fn:
        if key in ("_target_", "_partial_"):
            continue
        if key in SCHEDULER_FILLED:
            raise ConfigError(f"scheduler.fn.{key}", fn[key], "is set by normbench from the run's length "
                                                              "(trainer.epochs x steps per epoch); remove it")
        if takes is not None and key not in takes:
            raise unknown_key(f"scheduler.fn.{key}", fn[key], set(takes) - SCHEDULER_FILLED,
                              f"unknown key ({fn._target_} does not take it)")
    if name == "step":
        every = sched.get("every_epochs")
        _require(isinstance(every, int) and not isinstance(every, bool) and every >= 1,
                 "scheduler.every_epochs", every, "must be an integer >= 1, e.g. scheduler.every_epochs=10")
        _require(every < epochs, "scheduler.every_epochs", every,
                 f"the first decay would come after epoch {every}, but the run has trainer.epochs={epochs}; "
                 "use fewer epochs between decays than the run has, more epochs, or scheduler=constant")
        gamma = fn.get("gamma", 0.1)
        _require(_is_number(gamma) and 0 < gamma <= 1, "scheduler.fn.gamma", gamma, "must be in (0, 1]")
    if name == "onecycle":
        max_lr = sched.get("max_lr")
        _require(max_lr is None or (_is_number(max_lr) and math.isfinite(max_lr) and max_lr > 0),
                 "scheduler.max_lr", max_lr, "must be null (the optimizer's lr) or a number > 0")


def _builder_keys(group: str, node, config_keys: tuple[str, ...]) -> None:
    """A model's or dataset's keys against its builder's arguments; normbench's own builders take `**_`
    only for the protocol's arguments they do not use, so their unnamed keys count as unread."""
    target = str(node._target_)
    takes = _signature(target, named_only=target.startswith("normbench."))
    if takes is None:
        return
    accepted = (set(takes) - PROTOCOL_ARGS) | set(config_keys)
    for key in node:
        if key not in accepted:
            raise unknown_key(f"{group}.{key}", plain(node[key]), accepted - {"_target_"},
                              f"unknown key ({target} does not read it)")


def _model_size(model: nn.Module, width, device: torch.device) -> None:
    """Refuse a model whose weights, gradients and optimizer state alone exceed the device's memory."""
    params = sum(p.numel() for p in model.parameters())
    need = params * BYTES_PER_PARAMETER
    memory = _device_memory(device)
    if memory and need > memory:
        raise ConfigError("model.width", width,
                          f"gives a model of {params:,} parameters: {need / 2**30:,.0f} GiB for weights, "
                          f"gradients and optimizer state, more than the {memory / 2**30:,.0f} GiB of "
                          f"{device}; use a smaller width (1.0 is the study's), e.g. model.width=1.0")


def _device_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _build_on_meta(cfg, data: DataConf, input_size: int, norm: NormSpec, activation, allowed) -> nn.Module:
    """The model on the meta device: its own argument checks and its size, with no memory or compute."""
    try:
        with torch.device("meta"):
            return build_model(cfg.model, num_classes=data.num_classes, in_channels=data.channels,
                               image_size=input_size, norm=norm.make, activation=activation,
                               allowed_targets=allowed)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - the builder's own refusal becomes one line
        cause = err.__cause__ or err
        if isinstance(cause, ConfigError):
            raise cause from None
        if "overflow" in str(cause).lower():
            raise ConfigError("model.width", cfg.model.get("width"), "is too large for any machine (the "
                              "layer sizes overflow); use a width near 1, e.g. model.width=1.0") from None
        raise ConfigError("model._target_", cfg.model._target_, f"could not build the model with its config: "
                                                               f"{one_line(cause, typed=False)}") from None


def _settings(trainer: TrainerConf, device: torch.device, norm: NormSpec, model) -> LoopSettings:
    channels_last = resolve_channels_last(trainer.channels_last, device, norm.name, model_name(model))
    return LoopSettings(
        epochs=trainer.epochs, max_steps_per_epoch=trainer.max_steps_per_epoch, max_steps=trainer.max_steps,
        max_eval_batches=trainer.max_eval_batches, eval_batch_size=trainer.eval_batch_size,
        log_every_steps=trainer.log_every_steps, batchstats_images=trainer.batchstats_images,
        amp_dtype=resolve_precision(trainer.precision, device),
        channels_last=channels_last, progress=sys.stderr.isatty())


def validate(cfg: DictConfig, device: str | None = None) -> RunSpec:
    """Parse and check every group; `device` is where the job was placed (default: trainer.device)."""
    run = parse("", RunConf, cfg, ("batch_size", "seed"))
    for key in cfg:
        if key not in (*TOP_LEVEL, *keys(RunConf)):
            raise unknown_key(str(key), plain(cfg[key]), (*TOP_LEVEL, *keys(RunConf)),
                              "unknown key (no top-level setting of that name)")
    check_experiment_name(cfg.get("experiment_name"))
    allowed = allowed_targets(cfg)
    for path in TARGETS:
        check_target(f"{path}._target_", OmegaConf.select(cfg, path), allowed)
    trainer = parse("trainer", TrainerConf, cfg.trainer)
    data = _data(cfg.data)
    _builder_keys("model", cfg.model, ("_target_", *keys(ModelConf)))
    model = parse("model", ModelConf, cfg.model, [k for k in cfg.model if k in keys(ModelConf)])
    _optimizer(cfg, allowed)
    _scheduler(cfg, trainer.epochs)
    check_fault(trainer)
    norm = NormSpec.from_cfg(cfg.norm)
    activation = activation_factory(cfg.activation.name)
    input_size = model.input_size or data.image_size
    resolved = resolve_device(device or trainer.device)
    built = _build_on_meta(cfg, data, input_size, norm, activation, allowed)
    _model_size(built, cfg.model.get("width", ModelConf.width), resolved)
    settings = _settings(trainer, resolved, norm, cfg.model)
    return RunSpec(
        batch_size=run.batch_size, seed=run.seed, device=resolved, norm=norm, activation=activation,
        criterion=build_criterion(cfg.loss), probes=tuple(build_probes(cfg.probe)), pruning=pruning_spec(cfg),
        data=data, trainer=trainer, logger=parse("logger", LoggerConf, cfg.logger),
        input_size=input_size, channels_last=settings.channels_last, settings=settings,
        allowed_targets=allowed)
