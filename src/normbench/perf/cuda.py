"""Section ``cuda``: epoch time, achieved TFLOP/s against the device's peak, runs/hour of concurrent jobs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from normbench.device import resolve_precision
from normbench.perf import parts
from normbench.perf.common import PerfPaths, PerfSettings, autocast, child_env, precision_name
from normbench.record import METRICS, read_rows
from normbench.trainer import LoopState

# Dense (no sparsity) peak TFLOP/s by device name: (bf16/fp16 tensor cores, fp32). Checked in order.
PEAK_TFLOPS = [
    ("H100 PCIe", 756.0, 51.2), ("H100 NVL", 835.0, 60.0), ("H100", 989.4, 66.9), ("H200", 989.4, 66.9),
    ("A100", 312.0, 19.5), ("L40S", 362.0, 91.6), ("L4", 121.0, 30.3),
]
CONCURRENCY_LEVELS = (1, 2, 4)
EPOCH_KEYS = ("model", "batch", "train_images", "epoch_s", "train_img_s", "flops_per_image",
              "achieved_tflops", "mfu")


def peak_tflops(name: str, low_precision: bool) -> float | None:
    if os.environ.get("NORMBENCH_PEAK_TFLOPS"):
        return float(os.environ["NORMBENCH_PEAK_TFLOPS"])
    return next((bf16 if low_precision else fp32 for key, bf16, fp32 in PEAK_TFLOPS if key in name), None)


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def epoch_row(s: PerfSettings, paths: PerfPaths, device: torch.device, model: str, batch: int,
              warmup_steps: int) -> dict:
    """One epoch + validation of `model` (norm=bn): its TFLOP/s and peak device memory beyond the data's."""
    _reset_peak_memory(device)
    run = parts.run_parts(s, paths.conf_dir, device, [*parts.model_overrides(model, s.width),
                                                       f"batch_size={batch}", "trainer.epochs=1",
                                                       "trainer.max_eval_batches=null"],
                          num_train=int(s.cuda_epoch_images * 0.9), val=int(s.cuda_epoch_images * 0.1))
    amp = run.trainer.settings.amp_dtype
    x, y = next(iter(run.stream))
    with FlopCounterMode(display=False) as counter:  # one training step's
        with autocast(device, amp):
            loss = F.cross_entropy(run.model(x), y)
        loss.backward()
    run.model.zero_grad(set_to_none=True)
    flops = counter.get_total_flops() / x.shape[0]
    run.trainer.train_steps(1, LoopState(), warmup_steps)   # cuDNN autotuning, allocator, (compile)
    _reset_peak_memory(device)
    row = run.trainer.run(LoopState()).history[-1]
    tflops = flops * row["throughput/img_s"] / 1e12
    peak = peak_tflops(torch.cuda.get_device_name(device), amp is not None) if device.type == "cuda" else None
    data = sum(t.numel() * t.element_size() for split in (run.data.train, run.data.val, run.data.test)
               if split is not None for t in (split.images, split.labels))
    peak_mb = (torch.cuda.max_memory_allocated(device) - data) / 2**20 if device.type == "cuda" else None
    return {"model": model, "precision": s.precision, "norm": "bn", "batch": batch,
            "channels_last": run.trainer.settings.channels_last, "train_images": len(run.data.train),
            "epoch_s": row["time/epoch_s"], "train_img_s": row["throughput/img_s"], "flops_per_image": flops,
            "achieved_tflops": tflops, "peak_tflops": peak, "mfu": tflops / peak if peak else None,
            "val_acc": row["val/acc"], "peak_mb": peak_mb, "data_mb": data / 2**20}


def _concurrency_level(job: list[str], k: int, workdir: Path) -> dict:
    dirs = [workdir / f"concurrent-{k}-{i}" for i in range(k)]
    start = time.time()
    procs = [subprocess.Popen([*job, f"seed={i}", f"hydra.run.dir={d}"], cwd=workdir, env=child_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i, d in enumerate(dirs)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"concurrent job failed ({p.returncode}): {err[-2000:]}")
    wall = time.time() - start
    img_s = [read_rows(d / METRICS)[-1]["throughput/img_s"] for d in dirs]
    return {"concurrent": k, "wall_s": wall, "runs_per_hour": k / wall * 3600,
            "train_img_s_total": sum(img_s), "train_img_s_per_job": img_s}


def _concurrency(s: PerfSettings, train: Path, device: torch.device, workdir: Path,
                 levels_run=CONCURRENCY_LEVELS) -> dict:
    """Runs/hour of concurrent jobs and their summed training images/s (what decides long runs)."""
    steps = s.cuda_concurrency_steps
    job = [sys.executable, str(train), "data=synthetic", f"data.num_train={steps * 8 + 1008}",
           "data.val_size=1000", "model=vgg_a", f"model.width={s.width}", "batch_size=8", "trainer.epochs=1",
           f"trainer.max_steps_per_epoch={steps}", "trainer.max_eval_batches=1", "logger=none",
           f"trainer.device={device}", "trainer.checkpoint=false"]
    levels = [_concurrency_level(job, k, workdir) for k in levels_run]
    for level in levels:
        level["speedup"] = level["runs_per_hour"] / levels[0]["runs_per_hour"]
        level["train_speedup"] = level["train_img_s_total"] / levels[0]["train_img_s_total"]
    return {"steps_per_job": steps, "batch": 8, "levels": levels}


def bench_cuda(s: PerfSettings, paths: PerfPaths, device: torch.device, workdir: Path) -> dict:
    if device.type != "cuda":
        return {"skipped": "no CUDA device"}
    torch.backends.cudnn.benchmark = True
    amp = resolve_precision(s.precision, device)
    name = torch.cuda.get_device_name(device)
    peak = peak_tflops(name, amp is not None)
    out: dict = {"gpu": name, "peak_tflops": peak, "precision": precision_name(amp), "epochs": []}
    for batch in (128, 8):
        row = epoch_row(replace(s, width=1.0), paths, device, "vgg_a", batch, warmup_steps=30)
        out["epochs"].append({key: row[key] for key in EPOCH_KEYS})
        torch.cuda.empty_cache()
    if paths.train_script is not None and Path(paths.train_script).exists():
        out["concurrency"] = _concurrency(replace(s, width=1.0), Path(paths.train_script), device, workdir)
    return out
