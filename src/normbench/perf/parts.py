"""The parts of a run that the in-process benchmarks build: data, model, batch stream, optimizer,
scheduler, criterion and Trainer, and the config nodes they are built from.

All of perf's builders are here and nowhere else, so that they can be replaced by one shared
"build a run's parts from a composed config" function when normbench has one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from normbench.activations import activation_factory
from normbench.data import BatchStream, load_data
from normbench.losses import build_criterion
from normbench.models import build_model
from normbench.norms import NormSpec
from normbench.optim import build_optimizer, build_scheduler
from normbench.trainer import LoopSettings, Trainer

# What conf/optimizer/sgd.yaml and conf/scheduler/constant.yaml hold, for a library used without a conf dir.
SGD_FALLBACK = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.01, "momentum": 0.9,
                "weight_decay": 0.0, "nesterov": False}
CONSTANT_FALLBACK = {"name": "constant", "fn": {"_target_": "torch.optim.lr_scheduler.ConstantLR",
                                                "_partial_": True, "factor": 1.0, "total_iters": 0}}


def config_node(conf_dir: Path | None, path: str, fallback: dict):
    """The config group file `path` (e.g. "optimizer/sgd.yaml") of `conf_dir`, else `fallback`."""
    file = Path(conf_dir) / path if conf_dir is not None else None
    return OmegaConf.load(file) if file is not None and file.exists() else OmegaConf.create(fallback)


def synthetic_data(device: torch.device, num_train: int, val: int = 64):
    """A synthetic CIFAR-shaped dataset on `device` with `num_train` training and `val` validation images."""
    cfg = OmegaConf.create({"name": "synthetic", "val_size": val, "split_seed": 0,
                            "synthetic": {"num_train": num_train + val, "num_test": 64, "image_size": 32,
                                          "num_classes": 10, "seed": 0, "noise": 0.25}})
    return load_data(cfg, device)


def cnn(name: str, width: float, norm: str, device: torch.device, channels_last: bool):
    """normbench model `name` (relu, no dropout, 10 classes) on `device` in the given memory format."""
    cfg = OmegaConf.create({"name": name, "width": width, "dropout": 0.0, "input_size": 32})
    model = build_model(cfg, NormSpec(name=norm), activation_factory("relu"), 10)
    fmt = torch.channels_last if channels_last else torch.preserve_format
    return model.to(device, memory_format=fmt)


def batch_stream(data, batch: int, channels_last: bool, device: torch.device, seed: int = 0) -> BatchStream:
    """The training stream of a run: crop + flip + normalize, drop_last, seeded on `device`."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return BatchStream(data.train, batch, data.mean, data.std, augment=True, crop_padding=4, flip=True,
                       channels_last=channels_last, drop_last=True, generator=generator)


class NullSink:
    """A MetricSink that drops everything."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def trainer(model, data, stream, device, amp, channels_last, sink, conf_dir: Path | None, probes=(),
            epochs: int = 1, max_eval_batches: int | None = 1) -> Trainer:
    """A Trainer as a run builds it: cross-entropy, SGD (conf optimizer/sgd), constant schedule (conf
    scheduler/constant), logging every 25 steps, progress bar off."""
    criterion = build_criterion(OmegaConf.create({"name": "ce"}))
    optimizer = build_optimizer(config_node(conf_dir, "optimizer/sgd.yaml", SGD_FALLBACK), model)
    scheduler = build_scheduler(config_node(conf_dir, "scheduler/constant.yaml", CONSTANT_FALLBACK), optimizer,
                                epochs, len(stream))
    settings = LoopSettings(epochs=epochs, max_eval_batches=max_eval_batches, eval_batch_size=500,
                            log_every_steps=25, amp_dtype=amp, channels_last=channels_last, progress=False)
    return Trainer(model, criterion, optimizer, scheduler, data, stream, settings, sink, probes, device)


def probe_configs(conf_dir: Path | None, names) -> dict:
    """The probe group's config of each name (conf probe/<name>.yaml)."""
    return {name: config_node(conf_dir, f"probe/{name}.yaml", {"name": name}) for name in names}
