"""Normalization layers the model builders call once per layer.

`ln` normalizes each sample over (C, H, W) like the study's `nn.LayerNorm([C, H, W])`. Its affine
parameters are per channel by default (`norm.affine=channel`, i.e. GroupNorm with one group), so the
same config works at any input size; `norm.affine=element` gives the study's per-element affine
(`nn.LayerNorm([C, H, W])`), which ties the model to one input size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from normbench.errors import ConfigError, unknown_key

NORMS = ("none", "bn", "ln", "gn", "lrn")
# The settings each norm reads (besides `name`); a key no norm reads would be silently ignored: refused.
NORM_KEYS = {"none": (), "bn": ("eps", "momentum"), "ln": ("eps", "affine"), "gn": ("groups", "eps"),
             "lrn": ("lrn_size",)}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class NormSpec:
    name: str = "none"
    groups: int = 4
    eps: float = 1e-5
    momentum: float = 0.1
    affine: str = "channel"  # ln only: channel | element
    lrn_size: int = 5

    @classmethod
    def from_cfg(cls, cfg) -> NormSpec:
        name = cfg.get("name")
        if name not in NORMS:
            raise ConfigError("norm.name", name, f"choose one of {', '.join(NORMS)}")
        # A key another norm reads is fine (a preset sweeping norms sets e.g. affine for all of them).
        reads = sorted({k for keys in NORM_KEYS.values() for k in keys})
        for key in cfg:
            if key != "name" and key not in reads:
                raise unknown_key(f"norm.{key}", cfg[key], reads, "no norm reads it",
                                  "the norms read " + ", ".join("norm." + k for k in reads))
        spec = cls(**{k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg})
        if not (_is_int(spec.groups) and spec.groups >= 1):
            raise ConfigError("norm.groups", spec.groups, "must be a positive integer, e.g. norm.groups=4")
        if not (_is_number(spec.eps) and spec.eps > 0):
            raise ConfigError("norm.eps", spec.eps, "must be a number > 0, e.g. norm.eps=1e-5")
        if not (spec.momentum is None or (_is_number(spec.momentum) and 0 <= spec.momentum <= 1)):
            raise ConfigError("norm.momentum", spec.momentum, "must be in [0, 1] (the running statistics' update "
                                                              "weight, e.g. norm.momentum=0.1) or null (cumulative)")
        if not (_is_int(spec.lrn_size) and spec.lrn_size >= 1):
            raise ConfigError("norm.lrn_size", spec.lrn_size, "must be a positive integer, e.g. norm.lrn_size=5")
        if spec.affine not in ("channel", "element"):
            raise ConfigError("norm.affine", spec.affine, "choose channel or element")
        return spec

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
