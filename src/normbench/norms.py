"""Normalization layers the model builders call once per layer.

`ln` normalizes each sample over (C, H, W) like the study's `nn.LayerNorm([C, H, W])`. Its affine
parameters are per channel by default (`norm.affine=channel`, i.e. GroupNorm with one group), so the
same config works at any input size; `norm.affine=element` gives the study's per-element affine
(`nn.LayerNorm([C, H, W])`), which ties the model to one input size. `brn` is batch renormalization.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from normbench.errors import ConfigError
from normbench.schema import NormConf, parse


class NormSpec(NormConf):
    """A norm's settings (normbench.schema.NormConf) and the layers they make."""

    @classmethod
    def from_cfg(cls, cfg) -> NormSpec:
        return cls(**dataclasses.asdict(parse("norm", NormConf, cfg)))

    def make(self, channels: int, spatial: int) -> nn.Module:
        """A norm layer for a (channels, spatial, spatial) activation."""
        if self.name == "none":
            return nn.Identity()
        if self.name == "bn":
            return nn.BatchNorm2d(channels, eps=self.eps, momentum=self.momentum)
        if self.name == "brn":
            return BatchRenorm2d(channels, eps=self.eps, momentum=self.momentum, r_max=self.r_max,
                                 d_max=self.d_max, start=self.renorm_start, warmup=self.renorm_warmup)
        if self.name == "ln":
            if self.affine == "element":
                return nn.LayerNorm([channels, spatial, spatial], eps=self.eps)
            return nn.GroupNorm(1, channels, eps=self.eps)
        if self.name == "gn":
            if channels % self.groups:
                raise ConfigError(
                    "norm.groups", self.groups,
                    f"must divide every normalized layer's channels; a layer has {channels} channels "
                    f"(try a divisor such as {_divisor_hint(channels, self.groups)})",
                )
            return nn.GroupNorm(self.groups, channels, eps=self.eps)
        return nn.LocalResponseNorm(self.lrn_size, alpha=1e-4, beta=0.75, k=2.0)


class BatchRenorm2d(nn.BatchNorm2d):
    """Batch renormalization (Ioffe 2017): in training y = ((x - mu_B) / sigma_B * r + d) * weight + bias
    with r = clip(sigma_B / sigma, 1/r_max, r_max) and d = clip((mu_B - mu) / sigma, -d_max, d_max), where
    mu, sigma are the running statistics (before this batch's update) and r, d are constants to autograd.
    Running statistics are updated and used in eval exactly as BatchNorm2d's. The clips start at r = 1,
    d = 0 (BatchNorm) for `start` training steps (`num_batches_tracked`, so a resumed run continues the
    schedule), then relax linearly to r_max and d_max over `warmup` steps."""

    def __init__(self, channels: int, *, eps: float, momentum: float | None, r_max: float, d_max: float,
                 start: int, warmup: int):
        super().__init__(channels, eps=eps, momentum=momentum)
        self.r_max, self.d_max, self.start, self.warmup = r_max, d_max, start, warmup

    def limits(self, step: int) -> tuple[float, float]:
        """(r_max, d_max) at training step `step` (0-based: the number of batches already tracked)."""
        past = step - self.start
        ramp = min(1.0, max(0.0, past / self.warmup)) if self.warmup else float(past >= 0)
        return 1.0 + (self.r_max - 1.0) * ramp, self.d_max * ramp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        r_max, d_max = self.limits(int(self.num_batches_tracked))
        with torch.no_grad():  # r and d from the running statistics before this batch updates them
            std = (self.running_var + self.eps).sqrt()
            batch_var, batch_mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
            r = ((batch_var + self.eps).sqrt() / std).clamp(1.0 / r_max, r_max)
            d = ((batch_mean - self.running_mean) / std).clamp(-d_max, d_max)
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        # (x - mu_B) / sigma_B with BatchNorm's own kernel, which also updates the running statistics
        normed = F.batch_norm(x, self.running_mean, self.running_var, None, None, True, factor, self.eps)
        shape = (1, -1, 1, 1)
        return (normed * r.view(shape) + d.view(shape)) * self.weight.view(shape) + self.bias.view(shape)


def _divisor_hint(channels: int, groups: int) -> int:
    divisors = [d for d in range(1, channels + 1) if channels % d == 0]
    return min(divisors, key=lambda d: abs(d - groups))
