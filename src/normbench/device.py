"""Device and precision choices."""

from __future__ import annotations

import re

import torch

from normbench.errors import ConfigError

DEVICE_HELP = "use auto, cpu, cuda, cuda:N or mps"


def resolve_device(name: str) -> torch.device:
    name = str(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError("trainer.device", name, f"MPS is not available here; {DEVICE_HELP}")
        return torch.device("mps")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if not match:
        raise ConfigError("trainer.device", name, DEVICE_HELP)
    if not torch.cuda.is_available():
        raise ConfigError("trainer.device", name, "CUDA is not available on this machine; use auto or cpu")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError("trainer.device", name,
                          f"this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[name]


def resolve_channels_last(setting, device: torch.device, norm_name: str) -> bool:
    if setting == "auto":
        return device.type == "cuda" and norm_name in ("none", "bn")
    return bool(setting)
