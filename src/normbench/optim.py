"""Optimizers and LR schedulers from `_partial_` configs, completed with parameters and step counts. On
CUDA the fastest implementation (fused or foreach) is chosen unless the config sets one
(docs/PERFORMANCE.md); it changes speed, not the update rule, so not the run identity.
"""

from __future__ import annotations

import inspect

from hydra.utils import instantiate

from normbench.targets import BUILTIN_TARGETS

FUSED_ON_CUDA = ("SGD", "Adam", "AdamW")


def fast_optimizer_kwargs(optimizer_class, params: list, given=()) -> dict:
    """Extra constructor arguments for the fastest implementation of `optimizer_class` on `params`."""
    if "fused" in given or "foreach" in given or not params:
        return {}
    on_cuda = all(p.is_cuda and p.is_floating_point() for p in params)
    if not on_cuda:
        return {}
    accepted = inspect.signature(optimizer_class.__init__).parameters
    if getattr(optimizer_class, "__name__", "") in FUSED_ON_CUDA and "fused" in accepted:
        return {"fused": True}
    if "foreach" in accepted:
        return {"foreach": True}
    return {}


def build_optimizer(optimizer_cfg, model, allowed_targets=BUILTIN_TARGETS):
    make = instantiate(optimizer_cfg, _execution_whitelist_=list(allowed_targets))
    params = list(model.parameters())
    optimizer_class = getattr(make, "func", make)
    given = set(getattr(make, "keywords", {}) or {})
    return make(params, **fast_optimizer_kwargs(optimizer_class, params, given))


def build_scheduler(scheduler_cfg, optimizer, epochs: int, steps_per_epoch: int,
                    allowed_targets=BUILTIN_TARGETS):
    """Schedulers step once per optimizer step."""
    make = instantiate(scheduler_cfg.fn, _execution_whitelist_=list(allowed_targets))
    total_steps = max(1, epochs * steps_per_epoch)
    name = scheduler_cfg.name
    if name == "cosine":
        return make(optimizer, T_max=total_steps)
    if name == "step":
        every = scheduler_cfg.every_epochs
        return make(optimizer, step_size=max(1, every * steps_per_epoch if every else total_steps // 3))
    if name == "onecycle":
        max_lr = scheduler_cfg.get("max_lr") or optimizer.param_groups[0]["lr"]
        return make(optimizer, max_lr=max_lr, total_steps=total_steps,
                    cycle_momentum=_has_momentum(optimizer))
    return make(optimizer)


def _has_momentum(optimizer) -> bool:
    """One-cycle cycles momentum only where the optimizer has some: betas (Adam family) or a non-zero
    momentum (SGD, RMSprop). Adagrad has neither, and an RMSprop without momentum should stay so."""
    group = optimizer.param_groups[0]
    return "betas" in group or bool(group.get("momentum", 0))
