"""Activation factories, one fresh module per layer."""

from __future__ import annotations

from torch import nn

ACTIVATIONS = {
    "relu": lambda: nn.ReLU(inplace=True),
    "leaky_relu": lambda: nn.LeakyReLU(0.01, inplace=True),
    "elu": lambda: nn.ELU(inplace=True),
    "swish": lambda: nn.SiLU(inplace=True),
    "gelu": lambda: nn.GELU(),
    "mish": lambda: nn.Mish(inplace=True),
}


def activation_factory(name: str):
    from normbench.errors import ConfigError

    if name not in ACTIVATIONS:
        raise ConfigError("activation.name", name, f"choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]
