"""The typed schemas of the closed config groups: every key they take, its type, its default and its range.

Each option file of conf/trainer, conf/data, conf/norm, conf/loss, conf/probe, conf/pruning and conf/logger
pulls its schema's defaults (`defaults: [/schema/<group>@_here_, _self_]`) and states only what differs,
so any key can be overridden without `+`. `parse(group, Schema, node)` is the one place a group's node
becomes its dataclass: OmegaConf refuses a wrong type, a key the schema lacks is refused with the closest
one, a value out of range with its fix -- each as one ConfigError. Types are checked there, in the job,
rather than at composition, so that one bad job of a sweep fails alone and the others run.

Kept free of torch: Hydra imports it (hydra_plugins.normbench_schema) before composing any config.
"""

from __future__ import annotations

import dataclasses
import math
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from normbench.errors import ConfigError, unknown_key

FAULTS = ("none", "raise", "oom", "kill", "wait")
NORMS = ("none", "bn", "ln", "gn", "lrn", "brn")
LOSSES = ("ce", "ce_l1", "ce_l2", "label_smoothing", "focal")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
PRUNERS = ("none", "median")
INITS = ("xavier_uniform", "kaiming_normal", "torch")  # the built-in models' weight init (normbench.models)
SEED_MAX = 2**64 - 1           # torch.manual_seed's range
TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _checked(default, ok: Callable[[Any], bool], fix: str):
    return field(default=default, metadata={"ok": ok, "fix": fix})


def whole(default, lo: int, optional: bool = False):
    """An integer >= lo (or null when optional)."""
    return _checked(default, lambda v: (optional and v is None) or (v is not None and v >= lo),
                    f"must be {'null or ' if optional else ''}an integer >= {lo}")


def positive(default):
    return _checked(default, lambda v: math.isfinite(v) and v > 0, "must be a number > 0")


def non_negative(default):
    return _checked(default, lambda v: math.isfinite(v) and v >= 0, "must be a number >= 0")


def fraction(default, closed: bool = False, optional: bool = False):
    """A number in [0, 1) ([0, 1] when closed; or null when optional)."""
    return _checked(default, lambda v: (optional and v is None) or (v is not None and 0 <= v <= 1
                                                                    and (closed or v < 1)),
                    f"must be in [0, {'1]' if closed else '1)'}{' or null' if optional else ''}")


def one_of(default, *options):
    names = ", ".join(str(o).lower() if isinstance(o, bool) else str(o) for o in options if o is not None)
    return _checked(default, lambda v: v in options, f"choose one of {names}")


@dataclass
class RunConf:
    """The run's own top-level keys (their defaults: conf/config.yaml)."""
    batch_size: int = _checked(MISSING, lambda v: v >= 1, "must be a positive integer, e.g. batch_size=128")
    seed: int = _checked(MISSING, lambda v: 0 <= v <= SEED_MAX,
                         f"must be an integer from 0 to {SEED_MAX} (torch's seed range), e.g. seed=0")


@dataclass
class TrainerConf:
    epochs: int = whole(30, 1)
    device: str = "auto"            # auto (CUDA, else MPS, else CPU) | cpu | cuda | cuda:N | mps
    precision: str = one_of("auto", *PRECISIONS)  # auto: bf16 autocast on CUDA, fp32 elsewhere
    channels_last: Any = one_of("auto", "auto", True, False)  # noqa: RUF009 - auto: on CUDA for none/bn
    compile: bool = False           # torch.compile the model
    threads: int = whole(0, 0)      # torch CPU threads (0 = torch's default)
    max_steps_per_epoch: int | None = whole(None, 1, optional=True)   # cap training steps (quick runs)
    max_steps: int | None = whole(None, 1, optional=True)   # the run's budget of optimizer steps (null: none)
    max_eval_batches: int | None = whole(None, 1, optional=True)      # cap evaluation batches
    eval_batch_size: int = whole(1000, 1)
    # the first this many validation images at the training batch size with batch vs running statistics
    batchstats_images: int = whole(500, 0)  # (val/acc_batchstats beside val/acc_evalmode; 0: off)
    log_every_steps: int = whole(25, 1)  # per-step loss/lr are read from the device every this many steps
    checkpoint: bool = True         # save a checkpoint at each epoch end (resume continues from it)
    drop_last: bool = True          # drop the last partial batch (false: keep it, as study 002 did)
    # An injected fault (normbench.faults); null keys can still be set with `+` (Hydra adds to null only).
    fault: str | None = one_of(None, None, *FAULTS)
    fault_epoch: int | None = whole(None, 1, optional=True)    # null: the first
    fault_step: int | None = whole(None, 1, optional=True)     # null: the first step of that epoch
    fault_file: str | None = None   # fault=wait: the file whose appearance releases the run

    UNKNOWN: ClassVar[str] = "unknown key (no trainer setting of that name)"


@dataclass
class DataConf:
    """What every dataset states and the pipeline every dataset goes through (normbench.data). A dataset's
    own keys (root, download, ...) are its builder's arguments, checked against its signature."""
    num_classes: int = whole(MISSING, 2)    # what the dataset returns (checked when it is loaded)
    channels: int = whole(MISSING, 1)
    image_size: int = whole(MISSING, 1)
    # Channel statistics of the training set, pixel values in [0, 1]: one number (every channel) or one
    # per channel; null: computed from the training split.
    mean: list[float] | None = None
    std: list[float] | None = None
    val_size: int = whole(5000, 0)    # training images held out for validation (0: validate on the test set)
    train_size: int | None = whole(None, 1, optional=True)  # keep only this many training images (null: all)
    split_seed: int = 0             # fixes which images are held out (independent of the run's seed)
    augment: bool = True            # random crop + horizontal flip on the device
    crop_padding: int = whole(4, 0)  # zero padding of the random crop (RandomCrop(size, padding)); 0 = off
    flip: bool = True               # random horizontal flip, p=0.5
    fit: str = one_of("resize", "resize", "pad")  # to a larger model input_size: resize (bilinear) | pad

    UNKNOWN: ClassVar[str] = "the dataset's builder does not read it"


@dataclass
class ModelConf:
    """The keys normbench reads of every model (its builder takes them and any of its own)."""
    width: float = positive(1.0)    # channel multiplier for every conv and hidden linear layer
    dropout: float = fraction(0.0)  # classifier dropout
    input_size: int | None = whole(None, 8, optional=True)  # images are resized to this (null: dataset's)
    init: str = one_of("xavier_uniform", *INITS)  # weight init of the built-in models


@dataclass
class NormConf:
    """A norm and its settings; a key another norm reads is accepted (presets sweep norms)."""
    name: str = one_of("none", *NORMS)
    groups: int = whole(4, 1)       # gn: must divide every normalized layer's channels
    eps: float = positive(1e-5)
    momentum: float | None = fraction(0.1, closed=True, optional=True)  # bn; null: cumulative average
    affine: str = one_of("channel", "channel", "element")  # ln: per channel, or per (c, h, w) element
    lrn_size: int = whole(5, 1)
    # brn (normbench.norms.BatchRenorm2d): plain BN for renorm_start steps, then the clips of r and d relax
    # linearly over renorm_warmup steps to r_max and d_max (the paper's 5k and 20k-35k steps, scaled down)
    r_max: float = _checked(3.0, lambda v: math.isfinite(v) and v >= 1, "must be a number >= 1")
    d_max: float = non_negative(5.0)
    renorm_start: int = whole(500, 0)
    renorm_warmup: int = whole(2500, 0)

    UNKNOWN: ClassVar[str] = "no norm reads it"


@dataclass
class LossConf:
    name: str = one_of("ce", *LOSSES)
    l1: float = non_negative(0.0)   # weight of sum|w| over conv and linear weights
    l2: float = non_negative(0.0)   # weight of sum w^2
    smoothing: float = fraction(0.0)  # label smoothing
    gamma: float = non_negative(0.0)  # focal modulation

    UNKNOWN: ClassVar[str] = "no loss reads it"


@dataclass
class LandscapeSettings:
    interval: int = whole(50, 1)
    eta_min_factor: float = positive(0.5)
    eta_max_factor: float = positive(4.0)
    num_steps: int = whole(8, 2)
    spacing: str = one_of("log", "log", "linear")


@dataclass
class GradSimilaritySettings:
    interval: int = whole(10, 1)


@dataclass
class GradVarianceSettings:
    interval: int = whole(50, 1)
    window: int = whole(4, 2)


@dataclass
class LayersSettings:
    interval: int = whole(50, 1)


@dataclass
class AllProbesConf:
    interval: int | None = whole(None, 1, optional=True)   # null: each probe's own; a number: all of them
    landscape: LandscapeSettings = field(default_factory=LandscapeSettings)
    grad_similarity: GradSimilaritySettings = field(default_factory=GradSimilaritySettings)
    grad_variance: GradVarianceSettings = field(default_factory=GradVarianceSettings)
    layers: LayersSettings = field(default_factory=LayersSettings)


@dataclass
class NoProbes:
    pass


# The settings of each probe option (besides its `name`).
PROBES = {"none": NoProbes, "landscape": LandscapeSettings, "grad_similarity": GradSimilaritySettings,
          "grad_variance": GradVarianceSettings, "layers": LayersSettings, "all": AllProbesConf}


@dataclass
class PruningConf:
    name: str = one_of("none", *PRUNERS)
    warmup_epochs: int = whole(1, 0)  # never stop a run at epochs 1..warmup_epochs
    min_runs: int = whole(3, 0)       # completed peers needed at an epoch before a run is compared


@dataclass
class LoggerConf:
    name: str = one_of("none", "none", "wandb")
    project: str = "normbench"
    entity: str | None = None
    mode: str = one_of("auto", "auto", "online", "offline")  # auto: online with W&B credentials, else offline
    tags: list[str] = field(default_factory=list)


SCHEMAS = {"trainer": TrainerConf, "data": DataConf, "norm": NormConf, "loss": LossConf,
           "pruning": PruningConf, "logger": LoggerConf, **{f"probe/{k}": v for k, v in PROBES.items()}}


def register() -> None:
    """The schemas' defaults as config nodes `schema/<group>` (untyped: types are checked by `parse`)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for path, schema in SCHEMAS.items():
        group, _, name = f"schema/{path}".rpartition("/")
        node = OmegaConf.create(dataclasses.asdict(schema()))
        store.store(group=group, name=name, node=node, provider="normbench")


def parse(group: str, schema: type, node, only=None):
    """`node` (a config node or mapping) as an instance of `schema`; `only` (default: all of the node's
    keys) are the keys the schema reads. The first bad key or value raises one ConfigError."""
    names = keys(schema)
    node = OmegaConf.create(node) if not OmegaConf.is_config(node) else node
    if node is None:
        node = OmegaConf.create({})
    given = {str(k): node[k] for k in (only if only is not None else node) if k != "defaults"}
    for key, value in given.items():
        if key not in names:
            raise unknown_key(_path(group, key), plain(value), names,
                              getattr(schema, "UNKNOWN", "unknown key"))
    hints, checks = typing.get_type_hints(schema), {f.name: f.metadata for f in dataclasses.fields(schema)}
    typed = OmegaConf.structured(schema)
    for key, value in given.items():
        if dataclasses.is_dataclass(hints[key]):  # a nested group (probe=all's probes)
            value = OmegaConf.structured(parse(_path(group, key), hints[key], value))
        try:
            with warnings.catch_warnings():  # an int given for a float is fine
                warnings.simplefilter("ignore", FutureWarning)
                typed[key] = value
        except OmegaConfBaseException:
            raise ConfigError(_path(group, key), plain(value), _type_fix(hints[key])) from None
        if "ok" in checks[key] and not checks[key]["ok"](typed[key]):
            raise ConfigError(_path(group, key), plain(value), checks[key]["fix"])
    for key in names:
        if OmegaConf.is_missing(typed, key):
            raise ConfigError(_path(group, key), None, "must be stated (it has no default)")
    return OmegaConf.to_object(typed)


def _path(group: str, key: str) -> str:
    return f"{group}.{key}" if group else key


def keys(schema: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(schema))


def parse_data(node) -> DataConf:
    """The keys of a data config every dataset shares; the dataset's own keys are its builder's."""
    return parse("data", DataConf, node, [k for k in node if k in keys(DataConf)])


def _type_fix(kind) -> str:
    allowed = [t for t in typing.get_args(kind) or (kind,) if t is not type(None)]
    if typing.get_origin(allowed[0]) is list:
        return "must be a list of numbers"
    text = TYPE_NAMES.get(allowed[0], str(allowed[0]))
    return f"must be {text}{' or null' if len(allowed) < len(typing.get_args(kind)) else ''}"


def plain(value):
    """A config node as plain Python (for error messages); anything else as it is."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
