"""Optimization probes (Santurkar et al. 2018) and per-layer statistics measured during training; what each
measures, how and at what cost: docs/probes.md.

The training loop calls ``probe.on_step(step, model, closure, lr)`` after ``loss.backward()`` and before
``optimizer.step()``: ``p.grad`` holds the unscaled mini-batch gradient, and ``closure()`` returns the
float32 loss of the same mini-batch without backpropagating it. A probe returns None on other steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from normbench import schema
from normbench.device import NORM_TYPES
from normbench.errors import ConfigError


@runtime_checkable
class Probe(Protocol):
    name: str
    interval: int

    def reads_gradient(self, step: int) -> bool: ...  # whether on_step reads p.grad at `step`

    def on_step(self, step: int, model: nn.Module, closure: Callable[[], Tensor],
                lr: float) -> dict[str, float] | None: ...


def run_probes(probes: list[Probe], step: int, model: nn.Module, closure: Callable[[], Tensor], lr: float,
               loop_grads_fp32: bool = True, rng_at_forward: RngState | None = None,
               ) -> dict[str, float] | None:
    """Every probe for this step; the merged metrics, or None when no probe measured anything. After an
    autocast backward (``loop_grads_fp32=False``) the gradient is recomputed once in float32 on the same batch
    (under ``rng_at_forward``: the same dropout mask) for every probe, so probe values do not depend on the
    training precision; the loop's gradients are put back afterwards."""
    swapped: list[tuple[nn.Parameter, Tensor | None]] | None = None
    if not loop_grads_fp32 and reads_gradient(probes, step):
        swapped = _swap_in_fp32_grads(model, closure, rng_at_forward)
    merged: dict[str, float] = {}
    try:
        for probe in probes:
            merged.update(probe.on_step(step, model, closure, lr) or {})
    finally:
        if swapped is not None:
            for p, g in swapped:
                p.grad = g
    return merged or None


def fp32_closure(loss_fn: Callable[[], Tensor]) -> Callable[[], Tensor]:
    """``loss_fn`` run with autocast switched off (CPU and CUDA): float32 weights, activations, gradients."""

    def closure() -> Tensor:
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return loss_fn()

    return closure


def probe_batch(probes: list[Probe], step: int, model: nn.Module, criterion: Callable[..., Tensor], x: Tensor,
                y: Tensor, lr: float, amp_dtype: torch.dtype | None = None) -> dict[str, float] | None:
    """One probe step as the trainer runs it, for scripts: the training forward and backward under
    ``amp_dtype`` autocast (None: fp32), then the probes in float32. Leaves ``p.grad`` set."""
    device_type = x.device.type
    model.zero_grad(set_to_none=True)
    rng = capture_rng() if amp_dtype is not None else None
    ctx = torch.autocast(device_type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    with ctx:
        loss = criterion(model(x), y, model)
    loss.float().backward()
    closure = fp32_closure(lambda: criterion(model(x), y, model))
    return run_probes(probes, step, model, closure, lr, loop_grads_fp32=amp_dtype is None, rng_at_forward=rng)


RngState = tuple[Tensor, list[Tensor] | None]


def capture_rng() -> RngState:
    """The CPU and (when initialised) CUDA RNG states, e.g. before a training forward."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None


def _set_rng(state: RngState) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def reads_gradient(probes: list[Probe], step: int) -> bool:
    """Whether any probe reads the mini-batch gradient at ``step``."""
    return any(p.reads_gradient(step) for p in probes)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _swap_in_fp32_grads(model: nn.Module, closure: Callable[[], Tensor],
                        rng: RngState | None = None) -> list[tuple[nn.Parameter, Tensor | None]]:
    """Replace every ``p.grad`` by the float32 gradient of ``closure`` under ``rng`` (default: the current
    state); returns the originals. Buffers, modes and the current RNG state are restored."""
    params = _trainable(model)
    state = _ModelState(model)
    try:
        _, grads = state.loss_and_grads(closure, params, rng)
    finally:
        _set_rng(state.rng)
    original = [(p, p.grad) for p in params]
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.to(p.dtype)
    return original


class _ModelState:
    """Everything a forward/backward on perturbed weights may disturb, saved so it can be put back."""

    def __init__(self, model: nn.Module):
        self.params = list(model.parameters())
        self.weights = [p.detach().clone() for p in self.params]
        self.grads = [p.grad for p in self.params]  # references: the probe never writes into them
        self.buffers = [(module, name, buf, buf.detach().clone()) for module in model.modules()
                        for name, buf in module._buffers.items() if buf is not None]
        self.modes = [(module, module.training) for module in model.modules()]
        self.rng = capture_rng()

    def loss_and_grads(self, closure: Callable[[], Tensor], params: list[nn.Parameter],
                       rng: RngState | None = None) -> tuple[Tensor, list[Tensor | None]]:
        """The float64 loss of ``closure`` and its gradients for ``params`` under ``rng`` (default:
        the saved state), then buffers and modes put back."""
        _set_rng(rng if rng is not None else self.rng)
        try:
            with torch.enable_grad():
                loss = closure()
                if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
                    raise RuntimeError("probe closure must return the scalar loss of a forward pass with "
                                       "autograd enabled")
                grads = torch.autograd.grad(loss.reshape(()), params, allow_unused=True)
            return loss.detach().reshape(()).double(), [None if g is None else g.detach() for g in grads]
        finally:
            self.reset_buffers_and_modes()

    def reset_buffers_and_modes(self) -> None:
        with torch.no_grad():
            for module, name, buf, saved in self.buffers:
                if module._buffers.get(name) is not buf:  # a forward that rebinds instead of updating
                    module._buffers[name] = buf
                buf.copy_(saved)
        for module, training in self.modes:
            module.training = training

    def restore(self) -> None:
        with torch.no_grad():
            for p, w in zip(self.params, self.weights):
                p.copy_(w)
        for p, g in zip(self.params, self.grads):
            p.grad = g
        self.reset_buffers_and_modes()
        _set_rng(self.rng)


def _sqnorm(tensors: list[Tensor | None]) -> Tensor:
    """Squared l2 norm of the concatenation of ``tensors`` (None = zeros) as a float64 0-dim tensor."""
    terms = [torch.linalg.vector_norm(t).double().square() for t in tensors if t is not None]
    return torch.stack(terms).sum() if terms else torch.zeros((), dtype=torch.float64)


def _diff(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a - b


# the probes: each is its schema's settings (normbench.schema) and the state it keeps between steps


class _AtInterval:
    interval: int

    def reads_gradient(self, step: int) -> bool:
        return step % self.interval == 0


@dataclass(eq=False)
class LandscapeProbe(_AtInterval, schema.LandscapeSettings):
    """Loss range, gradient predictiveness and effective β-smoothness along the gradient direction."""

    name: ClassVar[str] = "landscape"

    def __post_init__(self) -> None:
        if not self.eta_min_factor < self.eta_max_factor:
            raise ConfigError("probe.eta_min_factor", self.eta_min_factor,
                              f"must be < probe.eta_max_factor={self.eta_max_factor}")

    def eta_grid(self, lr: float) -> list[float]:
        """The step sizes η probed for learning rate ``lr`` (ascending)."""
        lo, hi, n = self.eta_min_factor, self.eta_max_factor, self.num_steps
        if n == 1:
            return [lr * lo]
        if self.spacing == "log":
            factors = [lo * (hi / lo) ** (k / (n - 1)) for k in range(n)]
        else:
            factors = [lo + (hi - lo) * k / (n - 1) for k in range(n)]
        factors[-1] = hi
        return [lr * f for f in factors]

    def on_step(self, step: int, model: nn.Module, closure: Callable[[], Tensor],
                lr: float) -> dict[str, float] | None:
        lr = float(lr)
        if not (self.reads_gradient(step) and lr > 0 and math.isfinite(lr)):
            return None
        params = _trainable(model)
        direction = [None if p.grad is None else p.grad.detach() for p in params]
        if not params or all(d is None for d in direction):
            return None

        state = _ModelState(model)
        try:
            gnorm = _sqnorm(direction).sqrt()
            _, ref = state.loss_and_grads(closure, params)  # at w, with the RNG state of every η point

            etas = self.eta_grid(lr)
            losses, changes = [], []
            weights = dict(zip(map(id, state.params), state.weights))
            for eta in etas:
                with torch.no_grad():
                    for p, d in zip(params, direction):
                        p.copy_(weights[id(p)])
                        if d is not None:
                            p.sub_(d.to(p.dtype), alpha=eta)
                loss, grads = state.loss_and_grads(closure, params)
                losses.append(loss)
                changes.append(_sqnorm([_diff(g, r) for g, r in zip(grads, ref)]).sqrt())
                del grads
            dev = gnorm.device
            values = torch.stack([t.to(dev) for t in (gnorm, *losses, *changes)]).cpu().tolist()  # one sync
        finally:
            state.restore()

        g_norm = values[0]
        if not math.isfinite(g_norm):
            return None
        n = len(etas)
        loss_vals, change_vals = values[1 : 1 + n], values[1 + n :]
        betas = [c / (eta * g_norm) if g_norm > 0 else math.nan for c, eta in zip(change_vals, etas)]
        return {"probe/loss_min": float(min(loss_vals)), "probe/loss_max": float(max(loss_vals)),
                "probe/grad_pred": float(max(change_vals)), "probe/grad_pred_min": float(min(change_vals)),
                "probe/beta": float(max(betas)), "probe/grad_norm": float(g_norm)}


def _flat(model: nn.Module, grads: bool) -> Tensor | None:
    """The trainable parameters' gradients (``grads``) or weights as one fresh vector (safe to keep across
    steps; a missing gradient counts as zeros); None when there are none."""
    params = _trainable(model)
    tensors = [p.grad for p in params] if grads else params
    if all(t is None for t in tensors):
        return None
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    return torch.cat([(t.detach().reshape(-1) if t is not None else p.new_zeros(p.numel())).to(dtype)
                      for t, p in zip(tensors, params)])


@dataclass(eq=False)
class GradSimilarityProbe(schema.GradSimilaritySettings):
    """Cosine similarity and l2 distance of the mini-batch gradients of steps t − 1 and t, and their
    difference over the weight step between them (a Lipschitz estimate along the training path)."""

    name: ClassVar[str] = "grad_similarity"

    def __post_init__(self) -> None:
        self._prev, self._prev_w, self._prev_step = None, None, None  # the kept step's gradient, weights

    def reads_gradient(self, step: int) -> bool:
        return step % self.interval == 0 or (step + 1) % self.interval == 0

    def on_step(self, step: int, model: nn.Module, closure: Callable[[], Tensor],
                lr: float) -> dict[str, float] | None:
        out = None
        is_probe = step % self.interval == 0
        keep = (step + 1) % self.interval == 0
        cur = _flat(model, grads=True) if (is_probe or keep) else None
        cur_w = _flat(model, grads=False) if cur is not None else None
        if is_probe and cur is not None and self._prev is not None and self._prev_step == step - 1:
            prev, prev_w = self._prev, self._prev_w
            if prev.numel() == cur.numel():
                norm = torch.linalg.vector_norm
                dot, n_cur, n_prev, l2, dw = torch.stack(
                    [torch.dot(cur, prev), norm(cur), norm(prev), norm(cur - prev), norm(cur_w - prev_w)]
                ).double().cpu().tolist()
                denom = n_cur * n_prev
                cos = dot / denom if denom > 0 else math.nan
                if math.isfinite(cos):
                    cos = max(-1.0, min(1.0, cos))
                out = {"probe/grad_cos": float(cos), "probe/grad_l2": float(l2)}
                if dw > 0 and math.isfinite(l2 / dw):
                    out["probe/lipschitz"] = float(l2 / dw)
        kept = keep and cur is not None
        self._prev, self._prev_w, self._prev_step = (cur, cur_w, step) if kept else (None, None, None)
        return out


@dataclass(eq=False)
class GradVarianceProbe(schema.GradVarianceSettings):
    """Variance of the mini-batch gradient over the ``window`` consecutive steps ending at each probe step."""

    name: ClassVar[str] = "grad_variance"

    def __post_init__(self) -> None:
        self.window = min(self.window, self.interval)  # windows never overlap; interval 1: nothing to measure
        self._reset()

    def reads_gradient(self, step: int) -> bool:
        return (-step) % self.interval < self.window  # step is one of the window's steps

    def on_step(self, step: int, model: nn.Module, closure: Callable[[], Tensor],
                lr: float) -> dict[str, float] | None:
        if not self.reads_gradient(step):
            return None
        g = _flat(model, grads=True)
        if g is None or (self._last_step is not None and self._last_step != step - 1):
            self._reset()
        if g is None:
            return None
        self._last_step = step
        # Welford: stable in float32 even when the variance is small against the mean's norm
        self._count += 1
        if self._mean is None:
            self._mean, self._m2 = g.clone(), torch.zeros((), dtype=torch.float64, device=g.device)
        else:
            delta = g - self._mean
            self._mean.add_(delta, alpha=1.0 / self._count)
            self._m2 += torch.dot(delta, g - self._mean).double()
        if step % self.interval != 0:
            return None
        k, mean, m2 = self._count, self._mean, self._m2
        self._reset()
        if k < 2:
            return None
        mean_norm_sq = torch.linalg.vector_norm(mean).double().square()
        var, mean_sq = torch.stack([m2 / (k - 1), mean_norm_sq]).cpu().tolist()
        if not math.isfinite(var):
            return None
        return {"probe/grad_var": float(var),
                "probe/grad_var_rel": float(var / mean_sq) if mean_sq > 0 else math.nan}

    def _reset(self) -> None:
        # sum of squared deviations (Welford) in _m2, a float64 0-dim tensor
        self._count, self._mean, self._m2, self._last_step = 0, None, None, None


def conv_blocks(model: nn.Module) -> dict[str, dict[str, nn.Module]]:
    """Each convolution ("conv"; named conv1, conv2, ... in the model's module order) with the first norm and
    the first activation ("norm", "act") registered after it and before the next convolution or linear."""
    blocks: dict[str, dict[str, nn.Module]] = {}
    block = None
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            block = blocks[f"conv{len(blocks) + 1}"] = {"conv": module}
        elif isinstance(module, nn.Linear):
            block = None
        elif block is not None and isinstance(module, NORM_TYPES):
            block.setdefault("norm", module)
        elif block is not None and type(module).__module__ == nn.ReLU.__module__:  # torch's activations
            block.setdefault("act", module)
    return blocks


def _measure(stats: dict[str, Tensor], key: str, module: nn.Module, inputs, out: Tensor) -> None:
    """Forward hook: mean and std of `out` (N, C, ...) over all its elements; after a ReLU also the fraction
    of channels that are exactly zero at every position of every sample."""
    out = out.detach().float()
    stats[f"{key}_std"], stats[f"{key}_mean"] = torch.std_mean(out)
    if isinstance(module, nn.ReLU):
        alive = out.transpose(0, 1).flatten(1).ne(0).any(1)
        stats[f"{key.rpartition('/')[0]}/dead_frac"] = 1 - alive.float().mean()


@dataclass(eq=False)
class LayersProbe(_AtInterval, schema.LayersSettings):
    """Per convolution block: activation statistics after the norm and the activation, the dead-ReLU
    fraction, the conv weight's norm, its effective learning rate and its gradient's norm."""

    name: ClassVar[str] = "layers"

    def on_step(self, step: int, model: nn.Module, closure: Callable[[], Tensor],
                lr: float) -> dict[str, float] | None:
        blocks = conv_blocks(model) if self.reads_gradient(step) else None
        if not blocks:
            return None
        stats: dict[str, Tensor] = {}
        hooks = []
        for name, block in blocks.items():
            key, weight = f"probe/layers/{name}", block["conv"].weight
            stats[f"{key}/weight_norm"] = torch.linalg.vector_norm(weight.detach())
            if weight.grad is not None:
                stats[f"{key}/grad_norm"] = torch.linalg.vector_norm(weight.grad)
            hooks += [module.register_forward_hook(functools.partial(_measure, stats, f"{key}/{kind}"))
                      for kind, module in block.items() if kind != "conv"]
        state = _ModelState(model)
        try:
            with torch.no_grad():  # the training forward again (batch statistics, dropout), measured
                closure()
        finally:
            for hook in hooks:
                hook.remove()
            state.restore()
        device = next(iter(stats.values())).device
        values = dict(zip(stats, torch.stack([v.to(device).double() for v in stats.values()]).cpu().tolist()))
        for name, block in blocks.items():
            norm_sq = values[f"probe/layers/{name}/weight_norm"] ** 2
            if "norm" in block and norm_sq > 0:  # the conv weight is scale-invariant only under a norm
                values[f"probe/layers/{name}/eff_lr"] = float(lr) / norm_sq
        return values


PROBE_CLASSES = {cls.name: cls for cls in (LandscapeProbe, GradSimilarityProbe, GradVarianceProbe,
                                           LayersProbe)}


def build_probes(probe_cfg: Any) -> list[Probe]:
    """Probes from a ``conf/probe/<name>.yaml`` node (DictConfig or mapping); raises ConfigError."""
    cfg = OmegaConf.create({} if probe_cfg is None else probe_cfg)
    name = cfg.get("name") or "none"
    if name not in schema.PROBES:
        raise ConfigError("probe.name", name, f"one of: {', '.join(schema.PROBES)}")
    spec = schema.parse("probe", schema.PROBES[name], cfg, [k for k in cfg if k != "name"])
    if name == "all":
        every = {} if spec.interval is None else {"interval": spec.interval}
        return [make(**{**dataclasses.asdict(getattr(spec, key)), **every})
                for key, make in PROBE_CLASSES.items()]
    return [] if name == "none" else [PROBE_CLASSES[name](**dataclasses.asdict(spec))]
