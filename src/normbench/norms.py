"""Normalization layers the model builders call once per layer.

`ln` normalizes each sample over (C, H, W) like the study's `nn.LayerNorm([C, H, W])`. Its affine
parameters are per channel by default (`norm.affine=channel`, i.e. GroupNorm with one group), so the
same config works at any input size; `norm.affine=element` gives the study's per-element affine
(`nn.LayerNorm([C, H, W])`), which ties the model to one input size.
"""

from __future__ import annotations

import dataclasses

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


def _divisor_hint(channels: int, groups: int) -> int:
    divisors = [d for d in range(1, channels + 1) if channels % d == 0]
    return min(divisors, key=lambda d: abs(d - groups))
