"""What every benchmark section shares: settings, paths, the timed sample, the alternating measurement and
its statistics, the machine description."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from normbench.device import cpu_count, synchronize
from normbench.trainer import LoopState

SECTIONS = ("loop", "data", "fixed_cost", "jobs", "probes", "layout", "cuda", "fused")


@dataclass
class PerfSettings:
    quick: bool = False
    device: str = "auto"
    threads: int = 0                       # 0: torch's default
    precision: str = "auto"
    channels_last: str | bool = "auto"
    compile: bool = False
    rounds: int = 15
    models: tuple[str, ...] = ("vgg_a", "alexnet_cifar")
    batches: tuple[int, ...] = (8, 128)
    width: float = 1.0
    steps: dict = field(default_factory=lambda: {8: 2, 128: 1})   # training steps per timed window
    loop_budget_s: float = 60.0            # per (model, batch): more rounds when they fit (see alternate)
    data_seconds: float = 2.0
    data_images: int = 10_000
    data_workers: int = 2
    startup_rounds: int = 3
    sweep_jobs: int = 16                  # tiny jobs per traced multirun (section jobs)
    sweep_rounds: int = 3
    probe_width: float = 0.25
    probe_batch: int = 32
    probe_rounds: int = 3
    cuda_epoch_images: int = 50_000
    cuda_concurrency_steps: int = 3000
    layout_batch: int = 64
    layout_steps: int = 2
    layout_rounds: int = 5
    fused_model: str = "vgg_a"
    fused_norm: str = "bn"
    fused_batch: int = 8
    fused_widths: tuple[float, ...] = (0.125, 0.25, 0.5)
    fused_ks: tuple[int, ...] = (1, 4, 8, 16)
    fused_concurrent_ks: tuple[int, ...] = (1, 4, 8, 16)
    fused_steps: int = 10                 # training steps per run per timed window
    fused_rounds: int = 7
    sections: tuple[str, ...] = SECTIONS

    @classmethod
    def make(cls, quick: bool, **overrides) -> PerfSettings:
        base = cls(quick=True, threads=1, rounds=15, width=0.125, steps={8: 2, 128: 1}, loop_budget_s=2.5,
                   data_seconds=0.3, data_images=2_000, startup_rounds=1, sweep_jobs=3, sweep_rounds=1,
                   probe_width=0.125, probe_batch=8, probe_rounds=3, cuda_epoch_images=5_000,
                   cuda_concurrency_steps=300, layout_batch=16, layout_steps=1, layout_rounds=3,
                   fused_widths=(0.125,), fused_ks=(1, 8), fused_concurrent_ks=(), fused_steps=5,
                   fused_rounds=3) if quick else cls()
        return replace(base, **{key: value for key, value in overrides.items() if value is not None})


@dataclass(frozen=True)
class PerfPaths:
    """Where the project's files are: the caller (``bench/perf.py``) knows, the library does not. Without
    ``train_script`` (``bench/train.py``) the start-up and concurrency measurements are skipped."""
    train_script: Path | None = None
    conf_dir: Path | None = None


@dataclass
class Sample:
    """One timed window: images trained on (or produced), wall-clock and process CPU seconds."""
    images: int
    wall_s: float
    cpu_s: float

    def __add__(self, other: Sample) -> Sample:
        return Sample(self.images + other.images, self.wall_s + other.wall_s, self.cpu_s + other.cpu_s)

    @property
    def rate(self) -> float:
        return self.images / max(self.wall_s, 1e-12)

    @property
    def cpu_rate(self) -> float:
        return self.images / max(self.cpu_s, 1e-12)


def alternate(candidates: dict[str, Callable[[], object]], rounds: int, warmup: int = 1, chunks: int = 1,
              budget_s: float | None = None, max_rounds: int = 101) -> dict[str, list]:
    """Each candidate's per-round results: `warmup` calls each, then `rounds` rounds of `chunks` passes over
    the candidates (order reversed every other pass, results within a round summed). With `budget_s`, up to
    `max_rounds` rounds when the warm-up shows they fit: more adjacent pairs, a steadier median ratio."""
    names = list(candidates)
    started = time.perf_counter()
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    if budget_s and warmup:
        per_round = (time.perf_counter() - started) / warmup * chunks
        rounds = max(rounds, min(max_rounds, int(budget_s / max(per_round, 1e-9))))
    results: dict[str, list] = {name: [] for name in names}
    passes = 0
    for _ in range(rounds):
        acc: dict = {}
        for _ in range(chunks):
            for name in (names if passes % 2 == 0 else names[::-1]):
                value = candidates[name]()
                acc[name] = value if name not in acc else acc[name] + value
            passes += 1
        for name in names:
            results[name].append(acc[name])
    return results


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a[i] / b[i]."""
    return statistics.median(x / y for x, y in zip(a, b) if y > 0)


def rates(samples: list[Sample], cpu: bool = False) -> list[float]:
    return [x.cpu_rate if cpu else x.rate for x in samples]


def timed(fn: Callable[[], int], device: torch.device) -> Sample:
    """Time one call of `fn`, which returns how many images it trained on or produced."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    images = fn()
    synchronize(device)
    return Sample(images, time.perf_counter() - wall, time.process_time() - cpu)


def train_window(trainer, steps: int, device: torch.device, state=None) -> Callable[[], Sample]:
    """A timed window of `steps` steps of the real loop (``Trainer.train_steps``), all from one state."""
    state = LoopState() if state is None else state
    return lambda: timed(lambda: trainer.train_steps(1, state, steps).seen, device)


def compared(a: list[Sample], b: list[Sample]) -> tuple[float, float, float, list[float]]:
    """Each side's median rate, the median of the per-round ratios a / b and their quartiles."""
    rates_a, rates_b = rates(a), rates(b)
    ratios = [x / y for x, y in zip(rates_a, rates_b)]
    return (statistics.median(rates_a), statistics.median(rates_b), paired_ratio(rates_a, rates_b),
            statistics.quantiles(ratios, n=4)[::2] if len(ratios) > 1 else ratios[:1] * 2)


def autocast(device: torch.device, amp):
    return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()


def precision_name(amp) -> str:
    return str(amp).replace("torch.", "") if amp else "fp32"


def machine_info(device: torch.device) -> dict:
    lscpu = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        lscpu = subprocess.run(["lscpu"], check=False, capture_output=True, text=True, timeout=10).stdout
    cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                if line.startswith("Model name:")), platform.processor() or "")
    info = {"cpu": cpu, "cores": cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "device": str(device), "torch_threads": torch.get_num_threads(),
            "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def run_process(cmd: list[str], cwd: Path, env: dict | None = None, timeout: float = 900) -> float:
    """Run `cmd` to its end (environment: `child_env()` unless given); its wall-clock seconds."""
    start = time.time()
    proc = subprocess.run(cmd, check=False, cwd=cwd, env=env or child_env(), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return time.time() - start


def child_env() -> dict:
    """The environment of a benchmark's child process: full Hydra errors, W&B off, unbuffered output."""
    return {**os.environ, "HYDRA_FULL_ERROR": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
