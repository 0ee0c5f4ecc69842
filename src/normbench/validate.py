"""Check a composed config before anything expensive happens (no data loaded, no GPU touched)."""

from __future__ import annotations

from normbench.activations import ACTIVATIONS
from normbench.device import resolve_device
from normbench.errors import ConfigError
from normbench.losses import LOSSES
from normbench.models import ALEXNET, ALEXNET_CIFAR, MODELS, VGG_A, scaled
from normbench.norms import NormSpec
from normbench.optim import SCHEDULERS

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def _number(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _require(cond: bool, key: str, value, allowed: str) -> None:
    if not cond:
        raise ConfigError(key, value, allowed)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def model_channels(model_cfg) -> list[int]:
    width = float(model_cfg.width)
    if model_cfg.name in ("vgg_a", "vgg_a_light"):
        return [scaled(c, width) for c in VGG_A if c != "M"]
    spec = ALEXNET if model_cfg.name == "alexnet" else ALEXNET_CIFAR
    return [scaled(c[0], width) for c in spec]


def validate(cfg) -> None:
    bs = cfg.batch_size
    _require(_is_int(bs) and bs > 0, "batch_size", bs, "must be a positive integer, e.g. batch_size=128")
    epochs = cfg.trainer.epochs
    _require(_is_int(epochs) and epochs >= 1, "trainer.epochs", epochs, "must be an integer >= 1")
    lr = cfg.optimizer.get("lr")
    _require(isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0, "optimizer.lr", lr,
             "must be a number > 0, e.g. optimizer.lr=0.01")
    wd = cfg.optimizer.get("weight_decay", 0.0)
    _require(isinstance(wd, (int, float)) and wd >= 0, "optimizer.weight_decay", wd, "must be >= 0")
    dropout = cfg.model.dropout
    _require(isinstance(dropout, (int, float)) and 0 <= dropout < 1, "model.dropout", dropout,
             "must be in [0, 1)")
    _require(cfg.model.name in MODELS, "model.name", cfg.model.name, f"choose one of {', '.join(MODELS)}")
    width = cfg.model.width
    _require(isinstance(width, (int, float)) and width > 0, "model.width", width, "must be > 0")
    size = cfg.model.input_size
    _require(_is_int(size) and size >= 8, "model.input_size", size, "must be an integer >= 8")
    _require(cfg.activation.name in ACTIVATIONS, "activation.name", cfg.activation.name,
             f"choose one of {', '.join(ACTIVATIONS)}")
    _require(cfg.loss.name in LOSSES, "loss.name", cfg.loss.name, f"choose one of {', '.join(LOSSES)}")
    _require(cfg.scheduler.name in SCHEDULERS, "scheduler.name", cfg.scheduler.name,
             f"choose one of {', '.join(SCHEDULERS)}")
    precision = cfg.trainer.precision
    _require(precision in PRECISIONS, "trainer.precision", precision, f"choose one of {', '.join(PRECISIONS)}")
    _require(cfg.trainer.channels_last in ("auto", True, False), "trainer.channels_last",
             cfg.trainer.channels_last, "choose auto, true or false")
    for key in ("trainer.max_steps_per_epoch", "trainer.max_eval_batches"):
        value = _number(cfg, key)
        _require(value is None or (_is_int(value) and value >= 1), key, value, "must be null or an integer >= 1")
    for key in ("trainer.log_every_steps", "trainer.eval_batch_size"):
        value = _number(cfg, key)
        _require(_is_int(value) and value >= 1, key, value, "must be an integer >= 1")
    threads = cfg.trainer.threads
    _require(_is_int(threads) and threads >= 0, "trainer.threads", threads, "must be an integer >= 0")
    norm = NormSpec.from_cfg(cfg.norm)
    norm.check_channels(model_channels(cfg.model))
    resolve_device(cfg.trainer.device)
