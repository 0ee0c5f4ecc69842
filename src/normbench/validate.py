"""Check a composed config once, before anything expensive happens, and return it parsed.

`validate(cfg)` reads every group (data, model, norm, activation, loss, optimizer, scheduler, trainer,
probe, pruning, the injected fault), raises one ConfigError naming the key, the value and the fix for the
first bad value, and returns the `RunSpec` the job passes on. No data is loaded, no GPU memory is touched
and no record or W&B run is opened: the model is built once on PyTorch's "meta" device (no memory, no
compute), which checks the model's own arguments, the norm's constraints (GroupNorm's groups must divide
every normalized layer) and that its `_target_` is allowed; a model whose weights, gradients and
optimizer state could not fit the device's memory is refused before anything is allocated.

Unknown keys: every group's accepted keys are known -- the optimizer's and the LR scheduler's are their
torch signatures, a built-in model's or dataset's its builder's arguments, a norm's the settings that
norm reads, the loss's its four weights -- and a key that nothing reads is refused with the closest
accepted one. Keys added on the command line with `+` to the other groups (trainer, data, probe, ...)
are refused unless a reader declares them (`trainer.fault*`).
"""

from __future__ import annotations

import inspect
import math
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from normbench.activations import activation_factory
from normbench.device import resolve_channels_last, resolve_device, resolve_precision
from normbench.errors import ConfigError, unknown_key
from normbench.faults import FaultSpec, fault_spec
from normbench.losses import Criterion, build_criterion
from normbench.models import build_model, model_name
from normbench.norms import NormSpec
from normbench.optim import SCHEDULERS
from normbench.preflight import check_experiment_name
from normbench.probes import Probe, build_probes
from normbench.pruning import check_pruning
from normbench.targets import allowed_targets, check_target
from normbench.trainer import LoopSettings

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
SEED_MAX = 2**64 - 1           # torch.manual_seed's range
BYTES_PER_PARAMETER = 16       # fp32 weight + gradient + two optimizer moments (Adam), before activations
# Keys a reader takes that no shipped option file sets, so they are added with `+` (prefix match).
OPTIONAL_KEYS = {"trainer": ("fault",)}
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
MODEL_KEYS = ("_target_", "width", "dropout", "input_size")
# Groups whose readers check every key (the rest: keys added with `+` are checked, see _added_keys).
CHECKED_BY_READER = ("model", "norm", "loss", "optimizer", "scheduler")
SCHEDULER_KEYS = {"constant": (), "cosine": (), "step": ("every_epochs",), "onecycle": ("max_lr",)}
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


def _unknown_key(key: str, value, accepted: Iterable[str], why: str) -> ConfigError:
    """A key nothing reads: name the closest accepted one and where the accepted ones come from."""
    return unknown_key(key, value, accepted, f"unknown key ({why})")


def _signature_keys(target: str) -> tuple[set[str], bool]:
    """The keyword arguments a `_target_` takes, and whether it takes any (**kwargs)."""
    from hydra.utils import get_object

    try:
        params = inspect.signature(get_object(target)).parameters.values()
    except (TypeError, ValueError):  # no signature to read: accept every key
        return set(), True
    keys = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return keys, any(p.kind == p.VAR_KEYWORD for p in params)


def _signature_defaults(target: str) -> dict:
    from hydra.utils import get_object

    try:
        params = inspect.signature(get_object(target)).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _optimizer(cfg, allowed: tuple[str, ...]) -> None:
    opt = cfg.optimizer
    target = opt._target_
    lr = opt.get("lr")
    _require(_is_number(lr) and lr > 0 and math.isfinite(lr), "optimizer.lr", lr,
             "must be a number > 0, e.g. optimizer.lr=0.01")
    takes, any_kwargs = _signature_keys(target)
    keys = [k for k in opt if k not in ("_target_", "_partial_")]
    if not any_kwargs:
        for key in keys:
            if key not in takes - {"params"}:
                raise _unknown_key(f"optimizer.{key}", opt[key], takes - {"params"}, f"{target} does not take it")
    defaults = _signature_defaults(target)
    for key in keys:
        value, default = opt[key], defaults.get(key)
        if key in OPTIMIZER_RANGES:
            in_range, allowed_text = OPTIMIZER_RANGES[key]
            _require(_is_number(value) and math.isfinite(value) and in_range(value), f"optimizer.{key}", value,
                     allowed_text)
        elif key == "betas":
            ok = (OmegaConf.is_list(value) or isinstance(value, (list, tuple))) and len(value) == 2 and all(
                _is_number(b) and 0 <= b < 1 for b in value)
            _require(ok, "optimizer.betas", _plain(value), "must be two numbers in [0, 1), e.g. "
                                                           "optimizer.betas=[0.9,0.999]")
        elif isinstance(default, bool):
            _require(isinstance(value, bool) or (value is None and key in ("foreach", "fused")),
                     f"optimizer.{key}", value, "must be true or false")
        elif _is_number(default):
            _require(_is_number(value) and math.isfinite(value), f"optimizer.{key}", value, "must be a number")
    try:  # torch's own argument checks (nesterov without momentum, ...) on one throwaway parameter
        make = instantiate(opt, _execution_whitelist_=list(allowed))
        make([torch.zeros(1, requires_grad=True)])
    except Exception as err:  # noqa: BLE001 - whatever torch refuses becomes one line
        cause = err.__cause__ or err
        raise ConfigError("optimizer", _plain(opt), f"{target} refused these arguments: "
                                                    f"{_first_line(cause)}") from None


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0].strip()


def _scheduler(cfg) -> None:
    sched = cfg.scheduler
    name = sched.get("name")
    _require(name in SCHEDULERS, "scheduler.name", name, f"choose one of {', '.join(SCHEDULERS)}")
    # a key another scheduler reads is fine (a preset sweeping schedulers sets e.g. max_lr for all of them)
    accepted = {"name", "fn", *(k for keys in SCHEDULER_KEYS.values() for k in keys)}
    for key in sched:
        if key not in accepted:
            raise _unknown_key(f"scheduler.{key}", sched[key], accepted, "no scheduler reads it")
    fn = sched.fn
    takes, any_kwargs = _signature_keys(fn._target_)
    for key in fn:
        if key in ("_target_", "_partial_"):
            continue
        if key in SCHEDULER_FILLED:
            raise ConfigError(f"scheduler.fn.{key}", fn[key], "is set by normbench from the run's length "
                                                              "(trainer.epochs x steps per epoch); remove it")
        if not any_kwargs and key not in takes:
            raise _unknown_key(f"scheduler.fn.{key}", fn[key], takes - SCHEDULER_FILLED,
                               f"{fn._target_} does not take it")
    epochs = cfg.trainer.epochs
    if name == "step":
        every = sched.get("every_epochs")
        _require(_is_int(every) and every >= 1, "scheduler.every_epochs", every,
                 "must be an integer >= 1, e.g. scheduler.every_epochs=10")
        _require(not _is_int(epochs) or every < epochs, "scheduler.every_epochs", every,
                 f"the first decay would come after epoch {every}, but the run has trainer.epochs={epochs}; use "
                 "fewer epochs between decays than the run has, more epochs, or scheduler=constant")
        gamma = fn.get("gamma", 0.1)
        _require(_is_number(gamma) and 0 < gamma <= 1, "scheduler.fn.gamma", gamma, "must be in (0, 1]")
    if name == "onecycle":
        max_lr = sched.get("max_lr")
        _require(max_lr is None or (_is_number(max_lr) and math.isfinite(max_lr) and max_lr > 0),
                 "scheduler.max_lr", max_lr, "must be null (the optimizer's lr) or a number > 0")


def _added_keys(cfg, overrides: Iterable[str]) -> None:
    """Keys added with `+` on the command line that nothing reads. The shipped option files set every key
    their readers read; the readers of model, norm, loss, optimizer and scheduler check all of theirs."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for text in overrides:
        if not text.startswith("+") or text.startswith("++"):  # ++ may set an existing key: not checked
            continue
        key = parser.parse_override(text).key_or_group
        group, _, name = key.partition(".")
        if not name or group in CHECKED_BY_READER or group == "hydra" or not OmegaConf.is_config(cfg.get(group)):
            continue  # a config group added (+experiment=...), or a group that checks its own keys
        if any(name.startswith(prefix) for prefix in OPTIONAL_KEYS.get(group, ())):
            continue
        if group == "data":
            takes, any_kwargs = _builder_signature(cfg.data)
            if any_kwargs or name in takes:
                continue
        known = [str(k) for k in cfg[group] if f"{group}.{k}" != key]
        raise _unknown_key(key, _plain(OmegaConf.select(cfg, key)), known,
                           "added with '+' but nothing reads it; set an existing key without '+'")


def _builder_signature(node) -> tuple[set[str], bool]:
    """The keys a model's or dataset's builder takes; normbench's own ones take `**_` only for the
    protocol's arguments they do not use, so their unnamed keys count as unread."""
    takes, any_kwargs = _signature_keys(node._target_)
    return takes - PROTOCOL_ARGS, any_kwargs and not str(node._target_).startswith("normbench.")


def _builder_keys(group: str, node, config_keys: tuple[str, ...]) -> None:
    takes, any_kwargs = _builder_signature(node)
    if any_kwargs:
        return
    accepted = takes | set(config_keys)
    for key in node:
        if key not in accepted:
            raise _unknown_key(f"{group}.{key}", _plain(node[key]), accepted - {"_target_"},
                               f"{node._target_} does not read it")


def _model_size(model: nn.Module, width, device: torch.device) -> None:
    """Refuse a model whose weights, gradients and optimizer state alone exceed the device's memory."""
    params = sum(p.numel() for p in model.parameters())
    need = params * BYTES_PER_PARAMETER
    memory = _device_memory(device)
    if memory and need > memory:
        raise ConfigError("model.width", width, f"gives a model of {params:,} parameters: {need / 2**30:,.0f} GiB "
                                                f"for weights, gradients and optimizer state, more than the "
                                                f"{memory / 2**30:,.0f} GiB of {device}; use a smaller width "
                                                "(1.0 is the study's), e.g. model.width=1.0")


def _device_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _build_on_meta(cfg, data: DataShape, input_size: int, norm: NormSpec, activation, allowed) -> nn.Module:
    """The model on the meta device: its own argument checks and its size, with no memory or compute."""
    width = cfg.model.get("width", 1.0)
    try:
        with torch.device("meta"):
            return build_model(cfg.model, num_classes=data.num_classes, in_channels=data.channels,
                               image_size=input_size, norm=norm.make, activation=activation, allowed_targets=allowed)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - the builder's own refusal becomes one line
        cause = err.__cause__ or err
        if isinstance(cause, ConfigError):
            raise cause from None
        if "overflow" in str(cause).lower():
            raise ConfigError("model.width", width, "is too large for any machine (the layer sizes overflow); "
                                                    "use a width near 1, e.g. model.width=1.0") from None
        raise ConfigError("model._target_", cfg.model._target_, f"could not build the model with its config: "
                                                               f"{_first_line(cause)}") from None


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
    for key in ("compile", "checkpoint"):
        if key in t:
            _require(isinstance(t[key], bool), f"trainer.{key}", t[key], "must be true or false")
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


def validate(cfg: DictConfig, device: str | None = None, overrides: Iterable[str] = ()) -> RunSpec:
    """Parse and check every group; `device` is where the job was placed (default: trainer.device);
    `overrides` are the job's command-line overrides (keys added with `+` are checked against readers)."""
    bs = cfg.batch_size
    _require(_is_int(bs) and bs > 0, "batch_size", bs, "must be a positive integer, e.g. batch_size=128")
    _require(_is_int(cfg.seed) and 0 <= cfg.seed <= SEED_MAX, "seed", cfg.seed,
             f"must be an integer from 0 to {SEED_MAX} (torch's seed range), e.g. seed=0")
    check_experiment_name(cfg.get("experiment_name"))
    _added_keys(cfg, overrides)
    allowed = allowed_targets(cfg)
    for path in TARGETS.values():
        check_target(".".join((*path, "_target_")), _select(cfg, path), allowed)
    data = _data_shape(cfg.data)
    _builder_keys("model", cfg.model, MODEL_KEYS)
    dropout = cfg.model.get("dropout", 0.0)
    _require(_is_number(dropout) and 0 <= dropout < 1, "model.dropout", dropout, "must be in [0, 1)")
    width = cfg.model.get("width", 1.0)
    _require(_is_number(width) and width > 0 and math.isfinite(width), "model.width", width, "must be > 0")
    size = cfg.model.get("input_size")
    _require(size is None or (_is_int(size) and size >= 8), "model.input_size", size,
             "must be null (the dataset's size) or an integer >= 8")
    _optimizer(cfg, allowed)
    _scheduler(cfg)
    norm = NormSpec.from_cfg(cfg.norm)
    activation = activation_factory(cfg.activation.name)
    input_size = int(size) if size is not None else data.image_size
    resolved = resolve_device(device or cfg.trainer.device)
    _model_size(_build_on_meta(cfg, data, input_size, norm, activation, allowed), width, resolved)
    settings, channels_last = _trainer(cfg, resolved, norm)
    return RunSpec(
        batch_size=bs, seed=cfg.seed, device=resolved, norm=norm, activation=activation,
        criterion=build_criterion(cfg.loss), probes=tuple(build_probes(cfg.probe)), pruning=check_pruning(cfg),
        fault=fault_spec(cfg), data=data, input_size=input_size, channels_last=channels_last,
        settings=settings, allowed_targets=allowed)
