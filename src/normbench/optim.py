"""Optimizers and LR schedulers from `_partial_` configs, completed with parameters and step counts."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import OmegaConf

ALLOWED_TARGETS = ["torch.optim.*", "torch.optim.lr_scheduler.*"]
SCHEDULERS = ("constant", "cosine", "step", "onecycle")


def build_optimizer(optimizer_cfg, model):
    make = instantiate(optimizer_cfg, _execution_whitelist_=ALLOWED_TARGETS)
    return make(model.parameters())


def build_scheduler(scheduler_cfg, optimizer, epochs: int, steps_per_epoch: int):
    """Schedulers step once per optimizer step."""
    make = instantiate(scheduler_cfg.fn, _execution_whitelist_=ALLOWED_TARGETS)
    total_steps = max(1, epochs * steps_per_epoch)
    name = scheduler_cfg.name
    if name == "cosine":
        return make(optimizer, T_max=total_steps)
    if name == "step":
        return make(optimizer, step_size=max(1, int(scheduler_cfg.every_epochs) * steps_per_epoch))
    if name == "onecycle":
        max_lr = scheduler_cfg.get("max_lr") or optimizer.param_groups[0]["lr"]
        return make(optimizer, max_lr=max_lr, total_steps=total_steps)
    return make(optimizer)


def optimizer_kwargs(optimizer_cfg) -> dict:
    return {k: v for k, v in OmegaConf.to_container(optimizer_cfg, resolve=True).items()
            if not k.startswith("_")}
