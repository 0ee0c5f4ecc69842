"""Optimizers and LR schedulers from `_partial_` configs, completed with parameters and step counts. On
CUDA the fastest implementation (fused or foreach) is chosen unless the config sets one
(docs/PERFORMANCE.md); it changes speed, not the update rule, so not the run identity.
"""

from __future__ import annotations

import inspect

from omegaconf import OmegaConf

from normbench.targets import BUILTIN_TARGETS, call_target

FUSED_ON_CUDA = ("SGD", "Adam", "AdamW")
LR_REF_BATCH = "lr_ref_batch"  # normbench's key of the optimizer group, not an optimizer argument


def fast_optimizer_kwargs(optimizer_class, params: list, given=()) -> dict:
    """Extra constructor arguments for the fastest implementation of `optimizer_class` on `params`."""
    on_cuda = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    if "fused" in given or "foreach" in given or not on_cuda:
        return {}
    accepted = inspect.signature(optimizer_class.__init__).parameters
    if getattr(optimizer_class, "__name__", "") in FUSED_ON_CUDA and "fused" in accepted:
        return {"fused": True}
    if "foreach" in accepted:
        return {"foreach": True}
    return {}


def optimizer_factory(optimizer_cfg, scale: float = 1.0, allowed_targets=BUILTIN_TARGETS):
    """The config's `_partial_` optimizer, its lr multiplied by `scale`."""
    node = OmegaConf.to_container(optimizer_cfg, resolve=True)
    node.pop(LR_REF_BATCH, None)
    node["lr"] = node["lr"] * scale
    return call_target(node, allowed_targets)


def build_optimizer(optimizer_cfg, model, allowed_targets=BUILTIN_TARGETS, scale: float = 1.0):
    make = optimizer_factory(optimizer_cfg, scale, allowed_targets)
    params = list(model.parameters())
    optimizer_class = getattr(make, "func", make)
    given = set(getattr(make, "keywords", {}) or {})
    return make(params, **fast_optimizer_kwargs(optimizer_class, params, given))


def build_scheduler(scheduler_cfg, optimizer, total_steps: int, steps_per_epoch: int,
                    allowed_targets=BUILTIN_TARGETS, scale: float = 1.0):
    """Schedulers step once per optimizer step, over the run's `total_steps`; one-cycle's max_lr is
    multiplied by `scale` as the optimizer's lr was."""
    make = call_target(scheduler_cfg.fn, allowed_targets)
    total_steps = max(1, total_steps)
    name = scheduler_cfg.name
    if name == "cosine":
        return make(optimizer, T_max=total_steps)
    if name == "step":
        every = scheduler_cfg.every_epochs
        return make(optimizer, step_size=max(1, every * steps_per_epoch if every else total_steps // 3))
    if name == "onecycle":
        max_lr = scheduler_cfg.get("max_lr")
        max_lr = max_lr * scale if max_lr else optimizer.param_groups[0]["lr"]  # that lr is scaled already
        return make(optimizer, max_lr=max_lr, total_steps=total_steps,
                    cycle_momentum=_has_momentum(optimizer))
    return make(optimizer)


def _has_momentum(optimizer) -> bool:
    """One-cycle cycles momentum only where the optimizer has some: betas (Adam family) or a non-zero
    momentum (SGD, RMSprop). Adagrad has neither, and an RMSprop without momentum should stay so."""
    group = optimizer.param_groups[0]
    return "betas" in group or bool(group.get("momentum", 0))
