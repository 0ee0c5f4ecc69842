"""Performance benchmarks behind ``bench/perf.py`` (see docs/PERFORMANCE.md).

Sections (each a key of the JSON result):

``loop``        steady-state training images/s of normbench's ``Trainer.train_steps`` (the real loop, with
                its RecordSink, scheduler, accuracy bookkeeping and logging points, progress bar off as in
                a sweep) against a minimal hand-written loop (forward, cross-entropy, zero_grad, backward,
                optimizer step) on the same model (an identical copy), batch, device, threads, precision,
                memory format, optimizer implementation and data: both loops draw their batches from a
                ``BatchStream`` over the same uint8 tensors with the same crop+flip+normalize, so the
                augmentation cost is in both. Also the data pipeline's own time per batch against the
                step time.
``data``        normbench's on-device pipeline against torchvision CIFAR10 + standard transforms +
                DataLoader (``normbench.perf.data.compare_data_pipelines``).
``fixed_cost``  process start to the first finished training step of ``python bench/train.py`` with tiny
                settings (logger=none), against bare ``python -c "import torch"`` and against a minimal
                PyTorch training process (import torch, build an SGD optimizer, one step); and the
                per-job cost in a sequential multirun of tiny jobs.
``probes``      training images/s with probe=landscape / grad_similarity / all at their default
                intervals against probe=none.
``cuda``        on CUDA only: epoch time, achieved TFLOP/s against the device's peak, runs/hour with 1, 2
                and 4 concurrent jobs on the GPU, and channels_last against NCHW per norm.

Every comparison alternates its candidates inside one process (order reversed every other round), after
a warm-up, and reports the median of the per-round ratios, so a busy machine slows both sides alike.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from normbench.activations import activation_factory
from normbench.data import BatchStream, load_data
from normbench.device import (
    keep_norms_fp32,
    resolve_channels_last,
    resolve_device,
    resolve_precision,
    synchronize,
)
from normbench.losses import build_criterion
from normbench.models import build_model
from normbench.norms import NormSpec
from normbench.optim import build_optimizer, build_scheduler, fast_optimizer_kwargs
from normbench.record import RecordSink
from normbench.trainer import FIRST_STEP_ENV, LoopSettings, LoopState, Trainer

ROOT = Path(__file__).resolve().parents[3]
TRAIN = ROOT / "bench" / "train.py"
CONF = ROOT / "conf"
SECTIONS = ("loop", "data", "fixed_cost", "probes", "cuda")

# Targets (issue 5). The loop ones are for the CPU; on a GPU the aim is the same.
LOOP_TARGETS = {128: 0.97, 8: 0.95}
DATA_RATIO_TARGET = 10.0
DATA_SHARE_TARGET = 0.10       # the data pipeline's time per batch, as a fraction of a training step
FIXED_COST_TARGET = 1.5        # process start -> first step, over bare `import torch`
CONCURRENCY_TARGET = 2.0       # runs/hour at batch 8 with concurrent jobs, over one job at a time

# Tiny run settings for the start-up measurements (what tests/conftest.py uses for quick runs).
TINY = [
    "data=synthetic", "data.synthetic.num_train=512", "data.synthetic.num_test=128", "data.val_size=128",
    "model.width=0.125", "trainer.epochs=1", "trainer.max_steps_per_epoch=4", "trainer.max_eval_batches=2",
    "trainer.eval_batch_size=64", "trainer.threads=1", "batch_size=16", "logger=none",
]
MINIMAL_TORCH = ("import os, time, torch\n"
                 "m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(),\n"
                 "                        torch.nn.Linear(8 * 30 * 30, 10))\n"
                 "o = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)\n"
                 "x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))\n"
                 "torch.nn.functional.cross_entropy(m(x), y).backward(); o.step()\n"
                 f"open(os.environ['{FIRST_STEP_ENV}'], 'a').write(f'{{time.time()}} {{os.getpid()}}\\n')\n")

# Dense (no sparsity) peak TFLOP/s by device name: (bf16/fp16 tensor cores, fp32). Checked in order.
PEAK_TFLOPS = [
    ("H100 PCIe", 756.0, 51.2), ("H100 NVL", 835.0, 60.0), ("H100", 989.4, 66.9), ("H200", 989.4, 66.9),
    ("A100", 312.0, 19.5), ("L40S", 362.0, 91.6), ("L4", 121.0, 30.3),
]

SGD_FALLBACK = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.01, "momentum": 0.9,
                "weight_decay": 0.0, "nesterov": False}
CONSTANT_FALLBACK = {"name": "constant", "fn": {"_target_": "torch.optim.lr_scheduler.ConstantLR",
                                                "_partial_": True, "factor": 1.0, "total_iters": 0}}


# ------------------------------------------------------------------------------------------ settings


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
    multirun_jobs: int = 5
    probe_width: float = 0.25
    probe_batch: int = 32
    probe_rounds: int = 3
    cuda_epoch_images: int = 50_000
    cuda_concurrency_steps: int = 3000
    sections: tuple[str, ...] = SECTIONS

    @classmethod
    def make(cls, quick: bool, **overrides) -> PerfSettings:
        base = cls(quick=True, threads=1, rounds=15, width=0.125, steps={8: 2, 128: 1}, loop_budget_s=2.5,
                   data_seconds=0.3, data_images=2_000, startup_rounds=1, multirun_jobs=3, probe_width=0.125,
                   probe_batch=8, probe_rounds=3, cuda_epoch_images=5_000,
                   cuda_concurrency_steps=300) if quick else cls()
        for key, value in overrides.items():
            if value is not None:
                setattr(base, key, value)
        return base


# ------------------------------------------------------------------------------------------ helpers


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
    """Call each candidate `warmup` times, then run `rounds` rounds. A round is `chunks` passes over the
    candidates, the order reversed on every other pass; a candidate's results within a round are summed
    (`+`). With `budget_s`, more rounds (up to `max_rounds`) are run when the warm-up shows they fit in
    about that many seconds: more, shorter, adjacent pairs make the median ratio steadier on a busy
    machine. Returns the per-round results of each candidate."""
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


def _quartiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0], values[0]] if values else []
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


def rates(samples: list[Sample], cpu: bool = False) -> list[float]:
    return [x.cpu_rate if cpu else x.rate for x in samples]


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], check=False, capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    info = {"cpu": cpu, "cores": cores, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "device": str(device), "torch_threads": torch.get_num_threads(),
            "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _conf(path: str, fallback: dict):
    file = CONF / path
    return OmegaConf.load(file) if file.exists() else OmegaConf.create(fallback)


def _data(device: torch.device, num_train: int, val: int = 64):
    cfg = OmegaConf.create({"name": "synthetic", "val_size": val, "split_seed": 0,
                            "synthetic": {"num_train": num_train + val, "num_test": 64, "image_size": 32,
                                          "num_classes": 10, "seed": 0, "noise": 0.25}})
    return load_data(cfg, device)


def _model(name: str, width: float, norm: str, device: torch.device, channels_last: bool):
    cfg = OmegaConf.create({"name": name, "width": width, "dropout": 0.0, "input_size": 32})
    model = build_model(cfg, NormSpec(name=norm), activation_factory("relu"), 10)
    fmt = torch.channels_last if channels_last else torch.preserve_format
    return model.to(device, memory_format=fmt)


def _stream(data, batch: int, channels_last: bool, device: torch.device, seed: int = 0) -> BatchStream:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return BatchStream(data.train, batch, data.mean, data.std, augment=True, crop_padding=4, flip=True,
                       channels_last=channels_last, drop_last=True, generator=generator)


class _NullSink:
    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _trainer(model, data, stream, device, amp, channels_last, sink, probes=(), epochs: int = 1,
             max_eval_batches: int | None = 1):
    criterion = build_criterion(OmegaConf.create({"name": "ce"}))
    optimizer = build_optimizer(_conf("optimizer/sgd.yaml", SGD_FALLBACK), model)
    scheduler = build_scheduler(_conf("scheduler/constant.yaml", CONSTANT_FALLBACK), optimizer, epochs,
                                len(stream))
    settings = LoopSettings(epochs=epochs, max_eval_batches=max_eval_batches, eval_batch_size=500,
                            log_every_steps=25, amp_dtype=amp, channels_last=channels_last, progress=False)
    return Trainer(model, criterion, optimizer, scheduler, data, stream, settings, sink, probes, device)


def _train_seen(trainer: Trainer, state: LoopState, steps: int) -> int:
    return trainer.train_steps(1, state, steps).seen


def _autocast(device: torch.device, amp):
    return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()


def _maybe_compile(model, enabled: bool):
    if not enabled:
        return model
    from normbench.device import compile_model

    return compile_model(model)


# ------------------------------------------------------------------------------------------ 1. loop


def _timed(fn: Callable[[], int], device: torch.device) -> Sample:
    """Time one call of `fn`, which returns how many images it trained on or produced."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    images = fn()
    synchronize(device)
    return Sample(images, time.perf_counter() - wall, time.process_time() - cpu)


def _loop_config(s: PerfSettings, device: torch.device, workdir: Path, model_name: str, batch: int, *,
                 model: torch.nn.Module | None = None, steps: int | None = None, budget_s: float | None = None) -> dict:
    amp = resolve_precision(s.precision, device)
    steps = steps or int(s.steps.get(batch, max(3, 384 // batch)))
    channels_last = resolve_channels_last(s.channels_last, device, "bn")
    data = _data(device, num_train=max(batch * steps * 2, 512))
    base = model.to(device) if model is not None else _model(model_name, s.width, "bn", device, channels_last)
    if amp is not None:
        keep_norms_fp32(base)  # what the Trainer does; the raw loop's copy gets the same fp32 norms
    model, raw_model = copy.deepcopy(base), copy.deepcopy(base)  # same weights, same memory layout history
    sink = RecordSink(workdir / f"loop-{model_name}-{batch}")
    trainer = _trainer(_maybe_compile(model, s.compile), data, _stream(data, batch, channels_last, device),
                       device, amp, channels_last, sink)
    state = LoopState()

    raw_forward = _maybe_compile(raw_model, s.compile)
    params = list(raw_model.parameters())
    raw_opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, **fast_optimizer_kwargs(torch.optim.SGD, params))
    raw_stream = _stream(data, batch, channels_last, device, seed=1)
    data_stream = _stream(data, batch, channels_last, device, seed=2)

    def normbench_steps() -> int:
        return trainer.train_steps(1, state, steps).seen

    def raw_steps() -> int:
        seen = 0
        for x, y in itertools.islice(raw_stream, steps):
            with _autocast(device, amp):
                loss = F.cross_entropy(raw_forward(x), y)
            raw_opt.zero_grad(set_to_none=True)
            loss.backward()
            raw_opt.step()
            seen += y.shape[0]
        return seen

    def data_only() -> int:
        seen = 0
        for _ in range(4):
            for _x, y in itertools.islice(data_stream, steps):
                seen += y.shape[0]
        return seen

    res = alternate({"normbench": lambda: _timed(normbench_steps, device),
                     "raw": lambda: _timed(raw_steps, device),
                     "data": lambda: _timed(data_only, device)}, s.rounds,
                    budget_s=s.loop_budget_s if budget_s is None else budget_s)
    nb, raw, dat = (statistics.median(rates(res[k])) for k in ("normbench", "raw", "data"))
    step_ms, data_ms = 1000 * batch / nb, 1000 * batch / dat
    return {
        "model": model_name, "batch": batch, "width": s.width, "steps_per_window": steps,
        "rounds": len(res["raw"]), "precision": str(amp).replace("torch.", "") if amp else "fp32",
        "channels_last": channels_last, "compile": s.compile,
        "normbench_img_s": nb, "raw_img_s": raw, "ratio": paired_ratio(rates(res["normbench"]), rates(res["raw"])),
        "ratio_quartiles": _quartiles([a / b for a, b in zip(rates(res["normbench"]), rates(res["raw"]))]),
        "best_ratio": max(rates(res["normbench"])) / max(rates(res["raw"])),
        "cpu_time_ratio": paired_ratio(rates(res["normbench"], cpu=True), rates(res["raw"], cpu=True))
        if device.type == "cpu" else None,
        "normbench_rounds_img_s": rates(res["normbench"]), "raw_rounds_img_s": rates(res["raw"]),
        "data_img_s": dat, "step_ms": step_ms, "data_ms_per_batch": data_ms, "data_share": data_ms / step_ms,
        "extra_us_per_step": 1e6 * statistics.median((a.wall_s - b.wall_s) / steps
                                                     for a, b in zip(res["normbench"], res["raw"])),
    }


def bench_loop(s: PerfSettings, device: torch.device, workdir: Path) -> dict:
    rows = [_loop_config(s, device, workdir, model_name, batch)
            for model_name, batch in itertools.product(s.models, s.batches)]
    # The loop's own cost per step, measured where it is not lost in the noise: a near-free model (one
    # linear layer) at batch 8, 25 steps (one logging interval) per window. A step of a real model takes
    # `step_ms`; normbench / raw >= step_ms / (step_ms + overhead) follows without the noise of big steps.
    tiny = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    overhead = _loop_config(s, device, workdir, "linear", 8, model=tiny, steps=25, budget_s=min(s.loop_budget_s, 5.0))
    for row in rows:
        row["predicted_ratio"] = row["step_ms"] / (row["step_ms"] + max(overhead["extra_us_per_step"], 0.0) / 1e3)
    return {"rows": rows, "overhead": overhead, "threads": torch.get_num_threads(),
            "what": "Trainer.train_steps (RecordSink, constant scheduler, accuracy, logging every 25 steps, "
                    "no progress bar) vs a hand-written forward/CE/zero_grad/backward/SGD-step loop; same "
                    "model copy, BatchStream data with crop+flip+normalize in both, SGD lr 0.01 momentum 0.9"}


# ------------------------------------------------------------------------------------------ 2. data


def bench_data(s: PerfSettings, device: torch.device) -> dict:
    from normbench.perf.data import compare_data_pipelines

    return compare_data_pipelines(device, batch_size=128, n_images=s.data_images, seconds=s.data_seconds,
                                  rounds=3 if s.quick else 5, num_workers=s.data_workers,
                                  root=os.environ.get("NORMBENCH_DATA"))


# ------------------------------------------------------------------------------------------ 3. fixed cost


def _child_env(first_step_file: Path | None) -> dict:
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop(FIRST_STEP_ENV, None)
    if first_step_file is not None:
        env[FIRST_STEP_ENV] = str(first_step_file)
    return env


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float = 600) -> float:
    start = time.time()
    proc = subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return time.time() - start


def _first_steps(path: Path) -> list[float]:
    if not path.exists():
        return []
    return sorted(float(line.split()[0]) for line in path.read_text().splitlines() if line.strip())


def bench_fixed_cost(s: PerfSettings, device: torch.device, workdir: Path) -> dict:
    if not TRAIN.exists():
        return {"skipped": f"{TRAIN} not found"}
    py = sys.executable
    device_arg = [f"trainer.device={device}"]
    counter = itertools.count()

    def bare() -> float:
        return _run([py, "-c", "import torch"], workdir, _child_env(None))

    def minimal() -> float:
        marker = workdir / f"first-step-minimal-{next(counter)}.txt"
        start = time.time()
        _run([py, "-c", MINIMAL_TORCH], workdir, _child_env(marker))
        return _first_steps(marker)[0] - start

    totals: list[float] = []

    def first_step() -> float:
        i = next(counter)
        marker = workdir / f"first-step-{i}.txt"
        start = time.time()
        totals.append(_run([py, str(TRAIN), *TINY, *device_arg, f"hydra.run.dir={workdir}/run-{i}"], workdir,
                           _child_env(marker)))
        stamps = _first_steps(marker)
        if not stamps:
            raise RuntimeError("bench/train.py finished without recording a first step")
        return stamps[0] - start

    res = alternate({"bare": bare, "minimal": minimal, "first_step": first_step}, s.startup_rounds, warmup=0)
    out = {
        "bare_import_torch_s": statistics.median(res["bare"]),
        "minimal_torch_step_s": statistics.median(res["minimal"]),
        "first_step_s": statistics.median(res["first_step"]),
        "tiny_run_total_s": statistics.median(totals),
        "ratio": paired_ratio(res["first_step"], res["bare"]),
        "ratio_vs_minimal": paired_ratio(res["first_step"], res["minimal"]),
        "rounds": s.startup_rounds, "runs": res, "tiny_overrides": TINY + device_arg,
    }

    # multirun: N tiny jobs, sequential (basic launcher); a job's cost = gap between consecutive first steps
    marker = workdir / "first-step-multirun.txt"
    seeds = ",".join(str(i) for i in range(s.multirun_jobs))
    start = time.time()
    wall = _run([py, str(TRAIN), "-m", *TINY, *device_arg, f"seed={seeds}", f"hydra.sweep.dir={workdir}/sweep",
                 "experiment_name=perf"], workdir, _child_env(marker))
    stamps = _first_steps(marker)
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    per_job = statistics.median(gaps) if gaps else float("nan")
    out["multirun"] = {
        "jobs": s.multirun_jobs, "wall_s": wall, "first_step_s": stamps[0] - start if stamps else None,
        "per_job_s": per_job, "gaps_s": gaps, "per_job_over_bare": per_job / out["bare_import_torch_s"],
    }
    return out


# ------------------------------------------------------------------------------------------ 4. probes


def bench_probes(s: PerfSettings, device: torch.device, workdir: Path) -> dict:
    from normbench.probes import build_probes

    amp = resolve_precision(s.precision, device)
    channels_last = resolve_channels_last(s.channels_last, device, "bn")
    variants = {name: _conf(f"probe/{name}.yaml", {"name": name})
                for name in ("none", "landscape", "grad_similarity", "all")}
    interval, chunk = 50, 10   # a round = the 50-step landscape interval, timed in alternating 10-step chunks
    data = _data(device, num_train=s.probe_batch * interval + s.probe_batch)
    base = _model("vgg_a", s.probe_width, "bn", device, channels_last)
    trainers, states = {}, {}
    for name, cfg in variants.items():
        model = copy.deepcopy(base)
        trainers[name] = _trainer(model, data, _stream(data, s.probe_batch, channels_last, device), device, amp,
                                  channels_last, _NullSink(), probes=build_probes(cfg))
        states[name] = LoopState()

    def chunk_of(name: str) -> Callable[[], Sample]:
        return lambda: _timed(lambda: _train_seen(trainers[name], states[name], chunk), device)

    # warm-up: one whole interval each, so every probe has run once (and the step counters stay aligned)
    res = alternate({name: chunk_of(name) for name in variants}, s.probe_rounds, warmup=interval // chunk,
                    chunks=interval // chunk)
    rows = []
    none_rates = rates(res["none"])
    for name, cfg in variants.items():
        ratio = paired_ratio(rates(res[name]), none_rates)
        settings = {k: v for k, v in OmegaConf.to_container(cfg).items() if "interval" in k}
        rows.append({"probe": name, "img_s": statistics.median(rates(res[name])), "ratio_vs_none": ratio,
                     "overhead": 1.0 / ratio - 1.0, "settings": settings})
    return {"rows": rows, "model": "vgg_a", "width": s.probe_width, "batch": s.probe_batch,
            "steps_per_round": interval, "chunk_steps": chunk, "rounds": s.probe_rounds}


# ------------------------------------------------------------------------------------------ 5. cuda


def peak_tflops(name: str, low_precision: bool) -> float | None:
    if os.environ.get("NORMBENCH_PEAK_TFLOPS"):
        return float(os.environ["NORMBENCH_PEAK_TFLOPS"])
    for key, bf16, fp32 in PEAK_TFLOPS:
        if key in name:
            return bf16 if low_precision else fp32
    return None


def train_step_flops(model, x, y, amp, device) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        with _autocast(device, amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def bench_cuda(s: PerfSettings, device: torch.device, workdir: Path) -> dict:
    if device.type != "cuda":
        return {"skipped": "no CUDA device"}
    torch.backends.cudnn.benchmark = True
    amp = resolve_precision(s.precision, device)
    name = torch.cuda.get_device_name(device)
    peak = peak_tflops(name, amp is not None)
    out: dict = {"gpu": name, "peak_tflops": peak, "precision": str(amp).replace("torch.", "") if amp else "fp32"}

    # (a) epoch time and achieved TFLOP/s: one CIFAR-sized epoch (45k train images) + validation
    epochs = []
    for batch in (128, 8):
        channels_last = resolve_channels_last(s.channels_last, device, "bn")
        data = _data(device, num_train=int(s.cuda_epoch_images * 0.9), val=int(s.cuda_epoch_images * 0.1))
        model = _model("vgg_a", 1.0, "bn", device, channels_last)
        stream = _stream(data, batch, channels_last, device)
        trainer = _trainer(_maybe_compile(model, s.compile), data, stream, device, amp, channels_last,
                           _NullSink(), max_eval_batches=None)
        x, y = next(iter(stream))
        flops_per_step = train_step_flops(model, x, y, amp, device)
        trainer.train_steps(1, LoopState(), 30)   # warm-up: cuDNN autotuning, allocator, (compile)
        state = trainer.run(LoopState())
        row = state.history[-1]
        img_s = row["throughput/img_s"]
        tflops = flops_per_step / batch * img_s / 1e12
        epochs.append({"model": "vgg_a", "batch": batch, "train_images": len(data.train),
                       "epoch_s": row["time/epoch_s"], "train_img_s": img_s, "flops_per_image": flops_per_step / batch,
                       "achieved_tflops": tflops, "mfu": tflops / peak if peak else None})
        del trainer, model, data
        torch.cuda.empty_cache()
    out["epochs"] = epochs

    # (b) runs/hour with 1, 2, 4 concurrent jobs on this GPU (batch 8, full-width vgg_a, bf16): k jobs launched
    # together (one wave); runs/hour = k / wall; plus their summed steady-state training images/s (each job's
    # own throughput/img_s), which is what decides runs/hour for long runs.
    if TRAIN.exists():
        steps = s.cuda_concurrency_steps
        job = [sys.executable, str(TRAIN), "data=synthetic", f"data.synthetic.num_train={steps * 8 + 1008}",
               "data.val_size=1000", "model=vgg_a", "batch_size=8", "trainer.epochs=1",
               f"trainer.max_steps_per_epoch={steps}", "trainer.max_eval_batches=1", "logger=none",
               f"trainer.device={device}", "trainer.checkpoint=false"]
        levels = []
        for k in (1, 2, 4):
            dirs = [workdir / f"concurrent-{k}-{i}" for i in range(k)]
            start = time.time()
            procs = [subprocess.Popen([*job, f"seed={i}", f"hydra.run.dir={d}"], cwd=workdir, env=_child_env(None),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                     for i, d in enumerate(dirs)]
            for p in procs:
                _, err = p.communicate()
                if p.returncode != 0:
                    raise RuntimeError(f"concurrent job failed ({p.returncode}): {err[-2000:]}")
            wall = time.time() - start
            img_s = [json.loads((d / "metrics.jsonl").read_text().splitlines()[-1])["throughput/img_s"]
                     for d in dirs]
            levels.append({"concurrent": k, "wall_s": wall, "runs_per_hour": k / wall * 3600,
                           "train_img_s_total": sum(img_s), "train_img_s_per_job": img_s})
        for level in levels:
            level["speedup"] = level["runs_per_hour"] / levels[0]["runs_per_hour"]
            level["train_speedup"] = level["train_img_s_total"] / levels[0]["train_img_s_total"]
        out["concurrency"] = {"steps_per_job": steps, "batch": 8, "levels": levels}

    # (c) channels_last vs NCHW per norm (vgg_a, batch 128)
    per_norm = []
    for norm in ("none", "bn", "gn", "ln", "lrn"):
        data = _data(device, num_train=128 * 20 * 2)
        cands, keep = {}, []
        for cl in (True, False):
            model = _model("vgg_a", 1.0, norm, device, cl)
            trainer = _trainer(model, data, _stream(data, 128, cl, device), device, amp, cl, _NullSink())
            state = LoopState()
            keep.append(trainer)

            cands["channels_last" if cl else "nchw"] = functools.partial(
                _timed, functools.partial(_train_seen, trainer, state, 10), device)
        res = alternate(cands, 5)
        per_norm.append({"norm": norm, "channels_last_img_s": statistics.median(rates(res["channels_last"])),
                         "nchw_img_s": statistics.median(rates(res["nchw"])),
                         "ratio": paired_ratio(rates(res["channels_last"]), rates(res["nchw"])),
                         "auto_policy": resolve_channels_last("auto", device, norm)})
        del keep, data
        torch.cuda.empty_cache()
    out["channels_last"] = per_norm
    return out


# ------------------------------------------------------------------------------------------ targets


def _target(name: str, value, target: str, passed: bool | None, note: str = "") -> dict:
    return {"name": name, "value": value, "target": target,
            "result": "skipped" if passed is None else ("PASS" if passed else "FAIL"), "note": note}


def evaluate_targets(results: dict) -> list[dict]:
    targets = []
    loop = results.get("loop", {})
    for row in loop.get("rows", []):
        goal = LOOP_TARGETS.get(row["batch"])
        if goal is not None:
            targets.append(_target(f"loop/raw {row['model']} b{row['batch']}", row["ratio"], f">= {goal}",
                                   row["ratio"] >= goal))
    if loop.get("rows"):
        worst = max(loop["rows"], key=lambda r: r["data_share"])
        targets.append(_target("data time / step time (worst)", worst["data_share"], f"<= {DATA_SHARE_TARGET}",
                               worst["data_share"] <= DATA_SHARE_TARGET, f"{worst['model']} b{worst['batch']}"))
    data = results.get("data", {})
    if "ratio" in data:
        targets.append(_target("data pipeline / torchvision", data["ratio"], f">= {DATA_RATIO_TARGET}",
                               data["ratio"] >= DATA_RATIO_TARGET))
    fixed = results.get("fixed_cost", {})
    if "ratio" in fixed:
        targets.append(_target("first step / bare import torch", fixed["ratio"], f"<= {FIXED_COST_TARGET}",
                               fixed["ratio"] <= FIXED_COST_TARGET))
    cuda = results.get("cuda", {})
    levels = cuda.get("concurrency", {}).get("levels", [])
    if levels:
        best = max(levels, key=lambda r: r["speedup"])
        targets.append(_target("runs/hour, concurrent / single (b8)", best["speedup"], f">= {CONCURRENCY_TARGET}",
                               best["speedup"] >= CONCURRENCY_TARGET, f"{best['concurrent']} jobs"))
    else:
        targets.append(_target("runs/hour, concurrent / single (b8)", None, f">= {CONCURRENCY_TARGET}", None,
                               cuda.get("skipped", "not measured")))
    return targets


# ------------------------------------------------------------------------------------------ table


def _f(value, digits: int = 0, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}{suffix}"


def table_rows(results: dict) -> list[tuple[str, ...]]:
    """(section, measure, normbench, reference, ratio, target, result) rows."""
    verdict = {t["name"]: t for t in results.get("targets", [])}
    rows: list[tuple[str, ...]] = []

    def add(section, measure, nb, ref, ratio, key=None):
        t = verdict.get(key) if key else None
        rows.append((section, measure, nb, ref, ratio, t["target"] if t else "", t["result"] if t else ""))

    loop = results.get("loop", {})
    for r in loop.get("rows", []):
        cpu = f" (cpu {r['cpu_time_ratio']:.3f})" if r.get("cpu_time_ratio") else ""
        add("1 loop", f"{r['model']} b{r['batch']} w{r['width']:g} img/s ({r['precision']})",
            _f(r["normbench_img_s"], 1), _f(r["raw_img_s"], 1) + " raw", _f(r["ratio"], 3) + cpu,
            f"loop/raw {r['model']} b{r['batch']}")
    for r in loop.get("rows", []):
        add("1 loop", f"{r['model']} b{r['batch']} data ms/batch vs step ms", _f(r["data_ms_per_batch"], 2),
            _f(r["step_ms"], 1) + " step", _f(r["data_share"], 3))
    if loop.get("overhead"):
        o = loop["overhead"]
        add("1 loop", "loop's own cost per step (1-layer model, b8; us)", _f(o["extra_us_per_step"], 1),
            _f(1e3 * o["step_ms"], 0) + " us/step", _f(o["ratio"], 3))
    if loop.get("skipped"):
        add("1 loop", "skipped", loop["skipped"], "", "")
    if loop.get("rows"):
        t = verdict.get("data time / step time (worst)")
        if t:
            rows.append(("1 loop", "data share of a step (worst)", "", "", _f(t["value"], 3), t["target"],
                         t["result"]))
    data = results.get("data", {})
    if "ratio" in data:
        add("2 data", f"train img/s, b{data['batch_size']} ({data['data']}, {data['num_workers']} workers)",
            _f(data["normbench_img_s"]), _f(data["torchvision_img_s"]) + " tv", _f(data["ratio"], 1),
            "data pipeline / torchvision")
    elif data.get("skipped"):
        add("2 data", "skipped", data["skipped"], "", "")
    fixed = results.get("fixed_cost", {})
    if "ratio" in fixed:
        add("3 fixed", "process start -> first step (s)", _f(fixed["first_step_s"], 2),
            _f(fixed["bare_import_torch_s"], 2) + " import torch", _f(fixed["ratio"], 2),
            "first step / bare import torch")
        add("3 fixed", "  vs a minimal torch script: start -> first SGD step", _f(fixed["first_step_s"], 2),
            _f(fixed["minimal_torch_step_s"], 2) + " minimal", _f(fixed["ratio_vs_minimal"], 2))
        add("3 fixed", "tiny run, start -> exit (s)", _f(fixed["tiny_run_total_s"], 2), "", "")
        m = fixed.get("multirun", {})
        if m:
            add("3 fixed", f"per job in a multirun of {m['jobs']} tiny jobs (s)", _f(m["per_job_s"], 2),
                _f(fixed["bare_import_torch_s"], 2) + " import torch", _f(m["per_job_over_bare"], 2))
    elif fixed.get("skipped"):
        add("3 fixed", "skipped", fixed["skipped"], "", "")
    probes = results.get("probes", {})
    for r in probes.get("rows", []):
        if r["probe"] == "none":
            continue
        add("4 probes", f"probe={r['probe']} img/s (vgg_a w{probes['width']:g} b{probes['batch']})",
            _f(r["img_s"], 1), _f(next(x["img_s"] for x in probes["rows"] if x["probe"] == "none"), 1) + " none",
            _f(r["ratio_vs_none"], 3) + f" (+{100 * r['overhead']:.1f}%)")
    if probes.get("skipped"):
        add("4 probes", "skipped", probes["skipped"], "", "")
    cuda = results.get("cuda", {})
    if cuda.get("skipped"):
        rows.append(("5 cuda", f"skipped: {cuda['skipped']}", "", "", "", "", ""))
    for r in cuda.get("epochs", []):
        add("5 cuda", f"vgg_a b{r['batch']} epoch s / TFLOP/s (peak {_f(cuda['peak_tflops'])})", _f(r["epoch_s"], 1),
            _f(r["achieved_tflops"], 1) + " TFLOP/s", _f(r["mfu"], 3) + " of peak" if r["mfu"] else "-")
    for r in cuda.get("concurrency", {}).get("levels", []):
        add("5 cuda", f"runs/hour, {r['concurrent']} concurrent (b8, {cuda['concurrency']['steps_per_job']} steps)",
            _f(r["runs_per_hour"], 1), _f(r["train_img_s_total"]) + " img/s", _f(r["speedup"], 2)
            + f" (img/s {r['train_speedup']:.2f})")
    t = verdict.get("runs/hour, concurrent / single (b8)")
    if t:
        rows.append(("5 cuda", "runs/hour gain from concurrency", "", "", _f(t["value"], 2), t["target"],
                     t["result"]))
    for r in cuda.get("channels_last", []):
        add("5 cuda", f"channels_last / NCHW, norm={r['norm']} (auto: {r['auto_policy']})",
            _f(r["channels_last_img_s"]), _f(r["nchw_img_s"]) + " nchw", _f(r["ratio"], 3))
    return rows


def print_table(results: dict, file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    m = results["machine"]
    title = (f"normbench perf{' (quick)' if results['settings']['quick'] else ''}: {m['cpu']}, {m['cores']} cores, "
             f"torch {m['torch']}, device {m['device']}{' ' + m['gpu'] if m.get('gpu') else ''}, "
             f"{m['torch_threads']} threads")
    table = Table(title=title, title_justify="left")
    for col, justify in (("section", "left"), ("measure", "left"), ("normbench", "right"),
                         ("reference", "right"), ("ratio", "right"), ("target", "right"), ("result", "center")):
        table.add_column(col, justify=justify, no_wrap=col != "measure")
    for row in table_rows(results):
        style = {"PASS": "green", "FAIL": "red"}.get(row[-1])
        table.add_row(*row[:-1], f"[{style}]{row[-1]}[/]" if style else row[-1])
    Console(file=file, width=max(140, Console().width)).print(table)


# ------------------------------------------------------------------------------------------ driver


def run_all(s: PerfSettings, workdir: Path | None = None, log=print) -> dict:
    device = resolve_device(s.device)
    if s.threads:
        torch.set_num_threads(s.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    results: dict = {"settings": {**asdict(s), "steps": {str(k): v for k, v in s.steps.items()}},
                     "machine": machine_info(device)}
    with tempfile.TemporaryDirectory(prefix="normbench-perf-") as tmp:
        work = Path(workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        jobs = {
            "loop": lambda: bench_loop(s, device, work),
            "data": lambda: bench_data(s, device),
            "fixed_cost": lambda: bench_fixed_cost(s, device, work),
            "probes": lambda: bench_probes(s, device, work),
            "cuda": lambda: bench_cuda(s, device, work),
        }
        for name, job in jobs.items():
            if name not in s.sections:
                results[name] = {"skipped": "not selected (--sections)"}
                continue
            started = time.perf_counter()
            log(f"perf: {name} ...")
            torch.manual_seed(0)
            results[name] = job()
            results[name]["section_s"] = time.perf_counter() - started
            log(f"perf: {name} done in {results[name]['section_s']:.1f} s")
    results["targets"] = evaluate_targets(results)
    return results


def write_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="bench/perf.py", description="normbench performance benchmarks "
                                "(docs/PERFORMANCE.md). Prints one table and writes it as JSON.")
    p.add_argument("--quick", action="store_true", help="tiny widths and few steps (CI; about a minute on CPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (0: torch's default; default: 1 with --quick, else 0)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model in both loops")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per comparison")
    p.add_argument("--width", type=float, default=None, help="model width for the loop section")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    p.add_argument("--out", type=Path, default=None, help="directory for perf.json")
    p.add_argument("--json", type=Path, default=None, help="JSON output path (default: perf.json in --out or cwd)")
    args = p.parse_args(argv)
    sections = tuple(x.strip() for x in args.sections.split(",") if x.strip())
    unknown = [x for x in sections if x not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {SECTIONS}")
    settings = PerfSettings.make(args.quick, device=args.device, threads=args.threads, precision=args.precision,
                                 compile=args.compile, rounds=args.rounds, width=args.width, sections=sections)
    results = run_all(settings, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    path = args.json or (args.out or Path.cwd()) / "perf.json"
    write_json(results, path)
    print_table(results)
    print(f"written: {path}")
    return 0
