"""Device, precision, memory-format and compilation choices (the fast-path policies, measured and explained
in docs/PERFORMANCE.md), and where a sweep job runs.

Under autocast every norm layer computes in float32 (`keep_norms_fp32`): by itself autocast runs
BatchNorm in bf16 on CUDA and every norm in bf16 on the CPU.
"""

from __future__ import annotations

import os
import re

import torch
from torch import nn

from normbench.errors import ConfigError

DEVICE_HELP = "use auto, cpu, cuda, cuda:N or mps"
CHANNELS_LAST_NORMS = ("none", "bn")
# Per (model, norm) on the CPU, the (narrowest, widest) model.width at which channels_last trained faster,
# measured by bench/perf.py's section "layout" at widths 0.125 and 1 (docs/PERFORMANCE.md); NCHW elsewhere.
# A model is named by its `_target_` function (normbench.models.model_name).
CPU_CHANNELS_LAST = {**dict.fromkeys([("vgg_a", "none"), ("vgg_a", "bn"), ("alexnet_cifar", "none"),
                                      ("alexnet_cifar", "bn")], (0.125, 1.0)),
                     **dict.fromkeys([("vgg_a", "gn"), ("vgg_a", "ln"), ("alexnet_cifar", "gn"),
                                      ("alexnet_cifar", "ln"), ("alexnet_cifar", "lrn")], (0.125, 0.125))}
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
RECOMPILE_LIMIT = 64


def resolve_device(name: str) -> torch.device:
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available()
                            else "mps" if torch.backends.mps.is_available() else "cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("trainer.device", name, f"MPS is not available here; {DEVICE_HELP}")
    if name in ("cpu", "mps"):
        return torch.device(name)
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


def resolve_channels_last(setting, device: torch.device, norm_name: str, model: str | None = None,
                          width: float = 1.0) -> bool:
    """`auto`: channels_last on CUDA for the norms in CHANNELS_LAST_NORMS; on the CPU for the (model, norm)
    pairs and widths in CPU_CHANNELS_LAST, measured faster there by bench/perf.py."""
    if setting != "auto":
        return bool(setting)
    if device.type == "cuda":
        return norm_name in CHANNELS_LAST_NORMS
    if device.type == "cpu":
        narrowest, widest = CPU_CHANNELS_LAST.get((model, norm_name), (1, 0))
        return narrowest <= width <= widest
    return False


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _norm_input_fp32(module: nn.Module, args: tuple):
    x = args[0]
    return (x.float(), *args[1:]) if x.is_floating_point() and x.dtype != torch.float32 else None


def keep_norms_fp32(model: nn.Module) -> int:
    """Make every norm layer of `model` compute in float32 under autocast (a module is hooked once);
    returns how many were hooked."""
    hooked = 0
    for module in model.modules():
        if isinstance(module, NORM_TYPES) and not getattr(module, "_normbench_fp32", False):
            module.register_forward_pre_hook(_norm_input_fp32)
            module._normbench_fp32 = True
            hooked += 1
    return hooked


def compile_model(model: nn.Module, **kwargs) -> nn.Module:
    """torch.compile(model, **kwargs) with room in dynamo's cache for every (model, norm, batch shape,
    train/eval) a sweep run in one process meets."""
    import torch._dynamo.config as dynamo_config

    key = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    if getattr(dynamo_config, key) < RECOMPILE_LIMIT:
        setattr(dynamo_config, key, RECOMPILE_LIMIT)
    return torch.compile(model, **kwargs)


# where a sweep job runs: its device and its share of the CPU when a launcher runs jobs at once
def launcher_jobs(launcher) -> int:
    """How many jobs the launcher runs at once: joblib's n_jobs (-1: one per core), else 1."""
    n_jobs = (launcher or {}).get("n_jobs")
    if not isinstance(n_jobs, int) or isinstance(n_jobs, bool) or n_jobs == 0:
        return 1
    if n_jobs < 0:  # joblib: -1 = all cores, -2 = all but one, ...
        return max(1, cpu_count() + 1 + n_jobs)
    return n_jobs


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def placement(device: str, threads: int, job_num: int | None, n_jobs: int) -> tuple[str, int]:
    """A sweep job's device and CPU threads: with trainer.device=auto and several GPUs, the job number
    mod the GPU count; with trainer.threads=0 and n_jobs > 1 at once, cores // n_jobs each. Explicit
    settings are kept; a threads value that is no integer is left to validate() to report."""
    device = str(device)
    if isinstance(threads, bool) or not isinstance(threads, int):
        return device, 0
    if (device == "auto" and job_num is not None and torch.cuda.is_available()
            and torch.cuda.device_count() > 1):
        device = f"cuda:{job_num % torch.cuda.device_count()}"
    if not threads and n_jobs > 1:
        threads = max(1, cpu_count() // n_jobs)
    return device, int(threads or 0)
