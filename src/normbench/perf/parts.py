"""How the in-process benchmarks build what they time: a config composed from conf/ as bench/train.py
composes it, validated, and built by `normbench.run.build_parts` -- the same function a training job uses."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch import nn

from normbench.data import BatchStream
from normbench.identity import register_resolvers
from normbench.perf.common import PerfSettings
from normbench.run import RunParts, build_parts
from normbench.validate import validate

# The benchmarks' run: synthetic data, SGD (lr 0.01, momentum 0.9), constant lr, cross-entropy, ReLU,
# no dropout, logging every 25 steps, no W&B; the model, norm, batch and sizes come per measurement.
BENCH = ["data=synthetic", "data.num_test=64", "optimizer=sgd", "scheduler=constant", "loss=ce",
         "activation=relu", "probe=none", "logger=none", "model.dropout=0.0", "trainer.log_every_steps=25",
         "trainer.eval_batch_size=500", "trainer.max_eval_batches=1", "trainer.checkpoint=false"]


def run_parts(s: PerfSettings, conf_dir: Path, device: torch.device, overrides: list[str], *,
              num_train: int, val: int = 64, sink=None) -> RunParts:
    register_resolvers()
    with initialize_config_dir(config_dir=str(Path(conf_dir).absolute())):
        cfg = compose(config_name="config", overrides=[
            *BENCH, f"data.num_train={num_train + val}", f"data.val_size={val}", f"trainer.device={device}",
            f"trainer.precision={s.precision}", f"trainer.channels_last={s.channels_last}".lower(),
            f"trainer.compile={s.compile}".lower(), *overrides])
    spec = validate(cfg, device=str(device))
    parts = build_parts(cfg, spec, sink)
    parts.trainer.settings.progress = False
    return parts


def model_overrides(name: str, width: float, norm: str = "bn") -> list[str]:
    """A built-in model at `width`, or `linear`: one linear layer (the loop's own cost per step)."""
    if name == "linear":
        return ["model=vgg_a", "model._target_=normbench.perf.parts.linear_model",
                "trusted_targets=[normbench.perf.*]", f"norm={norm}"]
    return [f"model={name}", f"model.width={width}", f"norm={norm}"]


def linear_model(*, num_classes: int, in_channels: int, image_size: int, **_) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, num_classes))


def another_stream(parts: RunParts, seed: int) -> BatchStream:
    """The run's batch stream (same data, batch, augmentation, layout) with its own random order."""
    stream = copy.copy(parts.stream)
    stream.generator = torch.Generator(device=parts.data.train.images.device)
    stream.generator.manual_seed(seed)
    return stream
