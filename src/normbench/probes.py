"""Optimization probes measured during training (Santurkar et al. 2018, "How Does Batch Normalization
Help Optimization?"): ``landscape`` (LandscapeProbe), ``grad_similarity`` (GradSimilarityProbe) and
``grad_variance`` (GradVarianceProbe). What each measures, how and at what cost: docs/probes.md.

The training loop calls every probe after ``loss.backward()`` and before ``optimizer.step()``::

    metrics = probe.on_step(step, model, closure, lr)   # dict[str, float] or None

so ``p.grad`` holds the (unscaled) mini-batch gradient at the weights, and ``closure()`` runs the forward
pass on the same mini-batch in float32 (``fp32_closure``) and returns the loss without backpropagating it.
On non-probe steps a probe returns None. Under bf16/fp16 training ``run_probes(..., loop_grads_fp32=False)``
recomputes the gradient in float32 on the steps a probe reads it (``reads_gradient(step)``).
``build_probes(cfg)`` turns a probe config (normbench.schema) into a list of probes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from normbench.errors import ConfigError
from normbench.schema import PROBES, GradSimilaritySettings, GradVarianceSettings, LandscapeSettings, parse

PROBE_NAMES = tuple(PROBES)


@runtime_checkable
class Probe(Protocol):
    name: str
    interval: int

    def on_step(
        self, step: int, model: nn.Module, closure: Callable[[], Tensor], lr: float
    ) -> dict[str, float] | None: ...


def run_probes(
    probes: list[Probe],
    step: int,
    model: nn.Module,
    closure: Callable[[], Tensor],
    lr: float,
    loop_grads_fp32: bool = True,
    rng_at_forward: RngState | None = None,
) -> dict[str, float] | None:
    """Run every probe for this step; the merged metrics, or None when no probe measured anything.

    ``closure`` must compute in float32 (see ``fp32_closure``). ``loop_grads_fp32=False`` says the
    loop's ``p.grad`` came from an autocast (bf16/fp16) backward: then, on a step where a probe reads the
    mini-batch gradient, it is recomputed once in float32 on the same batch and every probe sees that one
    (the loop's gradients are put back afterwards), so probe values do not depend on the training
    precision. ``rng_at_forward`` (``capture_rng()`` taken before the training forward) makes that
    recomputation use the training step's dropout mask too."""
    readers = [p for p in probes if _reads_gradient(p, step)]
    swapped: list[tuple[nn.Parameter, Tensor | None]] | None = None
    if readers and not loop_grads_fp32:
        swapped = _swap_in_fp32_grads(model, closure, rng_at_forward)
    merged: dict[str, float] = {}
    try:
        for probe in probes:
            out = probe.on_step(step, model, closure, lr)
            if out:
                merged.update(out)
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


def probe_batch(
    probes: list[Probe],
    step: int,
    model: nn.Module,
    criterion: Callable[..., Tensor],
    x: Tensor,
    y: Tensor,
    lr: float,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float] | None:
    """One probe step as the trainer runs it, for scripts (e.g. a GPU check): the training forward and
    backward under ``amp_dtype`` autocast (None: fp32), then the probes in float32. ``criterion`` is
    called as ``criterion(logits, y, model)`` (normbench.losses). Leaves ``p.grad`` set."""
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
    cuda = (
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )
    return torch.get_rng_state(), cuda


def _set_rng(state: RngState) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def reads_gradient(probes: list[Probe], step: int) -> bool:
    """Whether any probe reads the mini-batch gradient at ``step``."""
    return any(_reads_gradient(p, step) for p in probes)


def _reads_gradient(probe: Probe, step: int) -> bool:
    reads = getattr(probe, "reads_gradient", None)
    return True if reads is None else bool(reads(step))


def _swap_in_fp32_grads(
    model: nn.Module, closure: Callable[[], Tensor], rng: RngState | None = None
) -> list[tuple[nn.Parameter, Tensor | None]]:
    """Replace every ``p.grad`` by the float32 gradient of ``closure`` at the current weights, computed
    under ``rng`` (the training forward's RNG state, so its dropout mask; default: the current state);
    returns the originals. Buffers, modes and the current RNG state are restored."""
    params = [p for p in model.parameters() if p.requires_grad]
    state = _ModelState(model)
    try:
        if rng is not None:
            _set_rng(rng)
        else:
            state.reset_rng()
        with torch.enable_grad():
            loss = closure()
            grads = torch.autograd.grad(loss.reshape(()), params, allow_unused=True)
    finally:
        state.reset_buffers_and_modes()
        state.reset_rng()
    original = [(p, p.grad) for p in params]
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.detach().to(p.dtype)
    return original


# --------------------------------------------------------------------------------------------------
# state save / restore


class _ModelState:
    """Everything a forward/backward on perturbed weights may disturb, saved so it can be put back."""

    def __init__(self, model: nn.Module):
        self.params = list(model.parameters())
        self.weights = [p.detach().clone() for p in self.params]
        self.grads = [p.grad for p in self.params]  # references: the probe never writes into them
        self.buffers = [
            (module, name, buf, buf.detach().clone())
            for module in model.modules()
            for name, buf in module._buffers.items()
            if buf is not None
        ]
        self.modes = [(module, module.training) for module in model.modules()]
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = (
            torch.cuda.get_rng_state_all()
            if torch.cuda.is_available() and torch.cuda.is_initialized()
            else None
        )

    def reset_rng(self) -> None:
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)

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
        self.reset_rng()


def _sqnorm(tensors: list[Tensor | None]) -> Tensor:
    """Squared l2 norm of the concatenation of ``tensors`` (None = zeros) as a float64 0-dim tensor."""
    total = None
    for t in tensors:
        if t is None:
            continue
        term = torch.linalg.vector_norm(t).double().square()
        total = term if total is None else total + term
    return total if total is not None else torch.zeros((), dtype=torch.float64)


def _diff(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return None if b is None else b
    return a if b is None else a - b


# --------------------------------------------------------------------------------------------------
# along-gradient probe


class LandscapeProbe:
    """Loss range, gradient predictiveness and effective β-smoothness along the gradient direction."""

    name = "landscape"

    def __init__(
        self,
        interval: int = LandscapeSettings.interval,
        eta_min_factor: float = LandscapeSettings.eta_min_factor,
        eta_max_factor: float = LandscapeSettings.eta_max_factor,
        num_steps: int = LandscapeSettings.num_steps,
        spacing: str = LandscapeSettings.spacing,
    ):
        self.interval = int(interval)
        self.eta_min_factor = float(eta_min_factor)
        self.eta_max_factor = float(eta_max_factor)
        self.num_steps = int(num_steps)
        self.spacing = spacing

    def reads_gradient(self, step: int) -> bool:
        return step % self.interval == 0

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

    @staticmethod
    def _loss_and_grads(
        closure: Callable[[], Tensor], params: list[nn.Parameter]
    ) -> tuple[Tensor, list[Tensor | None]]:
        with torch.enable_grad():
            loss = closure()
            if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
                raise RuntimeError(
                    "probe closure must return the scalar loss of a forward pass with autograd enabled"
                )
            grads = torch.autograd.grad(loss.reshape(()), params, allow_unused=True)
        return loss.detach().reshape(()).double(), [None if g is None else g.detach() for g in grads]

    def on_step(
        self, step: int, model: nn.Module, closure: Callable[[], Tensor], lr: float
    ) -> dict[str, float] | None:
        if step % self.interval != 0:
            return None
        lr = float(lr)
        if not (lr > 0 and math.isfinite(lr)):
            return None
        params = [p for p in model.parameters() if p.requires_grad]
        direction = [None if p.grad is None else p.grad.detach() for p in params]
        if not params or all(d is None for d in direction):
            return None

        state = _ModelState(model)
        try:
            gnorm = _sqnorm(direction).sqrt()
            # reference gradient at w, with the same RNG state as every η point below
            state.reset_rng()
            _, ref = self._loss_and_grads(closure, params)
            state.reset_buffers_and_modes()

            etas = self.eta_grid(lr)
            losses: list[Tensor] = []
            changes: list[Tensor] = []
            weights = dict(zip(map(id, state.params), state.weights))
            for eta in etas:
                with torch.no_grad():
                    for p, d in zip(params, direction):
                        p.copy_(weights[id(p)])
                        if d is not None:
                            p.sub_(d.to(p.dtype), alpha=eta)
                state.reset_rng()
                loss, grads = self._loss_and_grads(closure, params)
                state.reset_buffers_and_modes()
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
        return {
            "probe/loss_min": float(min(loss_vals)),
            "probe/loss_max": float(max(loss_vals)),
            "probe/grad_pred": float(max(change_vals)),
            "probe/grad_pred_min": float(min(change_vals)),
            "probe/beta": float(max(betas)),
            "probe/grad_norm": float(g_norm),
        }


# --------------------------------------------------------------------------------------------------
# consecutive-gradient similarity


def _flat(tensors: list[Tensor | None], params: list[nn.Parameter]) -> Tensor:
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    parts = [
        (t.detach().reshape(-1) if t is not None else p.new_zeros(p.numel())).to(dtype)
        for t, p in zip(tensors, params)
    ]
    return torch.cat(parts)  # a fresh tensor: safe to keep across steps


def _flat_grad(model: nn.Module) -> Tensor | None:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or all(p.grad is None for p in params):
        return None
    return _flat([p.grad for p in params], params)


def _flat_weights(model: nn.Module) -> Tensor | None:
    params = [p for p in model.parameters() if p.requires_grad]
    return _flat(list(params), params) if params else None


class GradSimilarityProbe:
    """Cosine similarity and l2 distance of the mini-batch gradients of steps t − 1 and t, and their
    difference over the weight step between them (a Lipschitz estimate along the training path)."""

    name = "grad_similarity"

    def __init__(self, interval: int = GradSimilaritySettings.interval):
        self.interval = int(interval)
        self._prev: Tensor | None = None
        self._prev_w: Tensor | None = None
        self._prev_step: int | None = None

    def reads_gradient(self, step: int) -> bool:
        return step % self.interval == 0 or (step + 1) % self.interval == 0

    def on_step(
        self, step: int, model: nn.Module, closure: Callable[[], Tensor], lr: float
    ) -> dict[str, float] | None:
        out = None
        is_probe = step % self.interval == 0
        keep = (step + 1) % self.interval == 0
        cur = _flat_grad(model) if (is_probe or keep) else None
        cur_w = _flat_weights(model) if cur is not None else None
        if is_probe and cur is not None and self._prev is not None and self._prev_step == step - 1:
            prev, prev_w = self._prev, self._prev_w
            if prev.numel() == cur.numel():
                dot = torch.dot(cur, prev).double()
                n_cur = torch.linalg.vector_norm(cur).double()
                n_prev = torch.linalg.vector_norm(prev).double()
                l2 = torch.linalg.vector_norm(cur - prev).double()
                dw = torch.linalg.vector_norm(cur_w - prev_w).double()
                dot, n_cur, n_prev, l2, dw = torch.stack([dot, n_cur, n_prev, l2, dw]).cpu().tolist()
                denom = n_cur * n_prev
                cos = dot / denom if denom > 0 else math.nan
                if math.isfinite(cos):
                    cos = max(-1.0, min(1.0, cos))
                out = {"probe/grad_cos": float(cos), "probe/grad_l2": float(l2)}
                if dw > 0 and math.isfinite(l2 / dw):
                    out["probe/lipschitz"] = float(l2 / dw)
        if keep and cur is not None:
            self._prev, self._prev_w, self._prev_step = cur, cur_w, step
        else:
            self._prev, self._prev_w, self._prev_step = None, None, None
        return out


class GradVarianceProbe:
    """Variance of the mini-batch gradient over the ``window`` consecutive steps ending at each probe step."""

    name = "grad_variance"

    def __init__(self, interval: int = GradVarianceSettings.interval,
                 window: int = GradVarianceSettings.window):
        self.interval = int(interval)
        self.window = min(int(window), self.interval)  # windows never overlap; interval 1: nothing to measure
        self._count = 0
        self._mean: Tensor | None = None
        self._m2: Tensor | None = None  # sum of squared deviations (Welford), float64 0-dim
        self._last_step: int | None = None

    def reads_gradient(self, step: int) -> bool:
        return (-step) % self.interval < self.window  # step is one of the window's steps

    def on_step(
        self, step: int, model: nn.Module, closure: Callable[[], Tensor], lr: float
    ) -> dict[str, float] | None:
        if not self.reads_gradient(step):
            return None
        g = _flat_grad(model)
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
        var, mean_sq = (
            torch.stack([m2 / (k - 1), torch.linalg.vector_norm(mean).double().square()]).cpu().tolist()
        )
        if not math.isfinite(var):
            return None
        return {
            "probe/grad_var": float(var),
            "probe/grad_var_rel": float(var / mean_sq) if mean_sq > 0 else math.nan,
        }

    def _reset(self) -> None:
        self._count, self._mean, self._m2, self._last_step = 0, None, None, None


# --------------------------------------------------------------------------------------------------
# config


def build_probes(probe_cfg: Any) -> list[Probe]:
    """Probes from a ``conf/probe/<name>.yaml`` node (DictConfig or mapping); raises ConfigError."""
    cfg = OmegaConf.create({} if probe_cfg is None else probe_cfg)
    name = cfg.get("name") or "none"
    if name not in PROBES:
        raise ConfigError("probe.name", name, f"one of: {', '.join(PROBES)}")
    spec = parse("probe", PROBES[name], cfg, [k for k in cfg if k != "name"])
    if name == "all":
        every = {} if spec.interval is None else {"interval": spec.interval}
        return [make(**{**dataclasses.asdict(getattr(spec, key)), **every})
                for key, make in _PROBE_CLASSES.items()]
    return [] if name == "none" else [_PROBE_CLASSES[name](**dataclasses.asdict(spec))]


def _landscape(**settings) -> LandscapeProbe:
    if not settings["eta_min_factor"] < settings["eta_max_factor"]:
        raise ConfigError("probe.eta_min_factor", settings["eta_min_factor"],
                          f"must be < probe.eta_max_factor={settings['eta_max_factor']}")
    return LandscapeProbe(**settings)


_PROBE_CLASSES = {"landscape": _landscape, "grad_similarity": GradSimilarityProbe,
                  "grad_variance": GradVarianceProbe}
