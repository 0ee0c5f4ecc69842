"""Section ``fused``: K runs trained as one fused model (``normbench.fused_trainer``) against the same runs
one after the other and as K concurrent processes (WHAT), per model width and K. A model-step is one
training step of one run; the processes are timed from a common start after warm-up."""

from __future__ import annotations

import multiprocessing
import queue
import time
from pathlib import Path

import torch

from normbench.device import synchronize
from normbench.fused_trainer import FusedTrainer
from normbench.perf import parts
from normbench.perf.common import PerfPaths, PerfSettings, alternate, compared, timed
from normbench.trainer import LoopState

WHAT = ("model-steps/s: FusedTrainer.train_steps over K runs (seeds 0..K-1, SGD momentum 0.9, constant lr, "
        "synthetic data with crop+flip) vs the same K runs' Trainer.train_steps one after the other, and vs "
        "K processes of one run each (1 torch thread each) from a common start after warm-up")


def _runs(s: PerfSettings, paths: PerfPaths, device: torch.device, width: float, count: int,
          first_seed: int = 0):
    return [parts.run_parts(s, paths.conf_dir, device,
                            [*parts.model_overrides(s.fused_model, width, s.fused_norm),
                             f"batch_size={s.fused_batch}", f"seed={first_seed + i}",
                             "optimizer=sgd_momentum"],
                            num_train=s.fused_batch * s.fused_steps)
            for i in range(count)]


def _fused_window(trainer: FusedTrainer, steps: int):
    states = [LoopState() for _ in trainer.trainers]
    return lambda: sum(t.steps for t in trainer.train_steps(1, states, None, steps).values())


def _sequential_window(trainers: list, steps: int):
    return lambda: sum(t.train_steps(1, LoopState(), steps).steps for t in trainers)


def _worker(s: PerfSettings, conf_dir, device: str, width: float, seed: int, windows: int, barrier,
            results) -> None:
    torch.set_num_threads(1)
    run = _runs(s, PerfPaths(conf_dir=conf_dir), torch.device(device), width, 1, seed)[0]
    run.trainer.train_steps(1, LoopState(), s.fused_steps)  # warm-up
    barrier.wait()
    started = time.time()
    steps = sum(run.trainer.train_steps(1, LoopState(), s.fused_steps).steps for _ in range(windows))
    synchronize(torch.device(device))
    results.put((started, time.time(), steps))


def concurrent_rate(s: PerfSettings, paths: PerfPaths, device: torch.device, width: float, k: int,
                    windows: int = 3) -> float:
    """Model-steps/s of `k` processes of one run each, started together after their warm-up."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(k), context.Queue()
    procs = [context.Process(target=_worker,
                             args=(s, paths.conf_dir, str(device), width, seed, windows, barrier, results))
             for seed in range(k)]
    for proc in procs:
        proc.start()
    got = []
    while len(got) < k:
        try:
            got.append(results.get(timeout=5))
        except queue.Empty:
            failed = [proc.exitcode for proc in procs if proc.exitcode not in (None, 0)]
            if failed:
                for proc in procs:
                    proc.kill()
                raise RuntimeError(f"a concurrent benchmark process failed (exit codes {failed})") from None
    for proc in procs:
        proc.join()
    return sum(steps for _, _, steps in got) / (max(end for _, end, _ in got) - min(s for s, _, _ in got))


def _row(s, width: float, k: int, res: dict, concurrent: dict) -> dict:
    fused, sequential, speedup, quartiles = compared(res["fused"], res["sequential"])
    return {"width": width, "k": k, "batch": s.fused_batch, "rounds": len(res["fused"]),
            "steps_per_window": s.fused_steps, "fused_steps_s": fused, "sequential_steps_s": sequential,
            "speedup": speedup, "speedup_quartiles": quartiles, "concurrent_steps_s": concurrent.get(k),
            "speedup_vs_concurrent": fused / concurrent[k] if concurrent.get(k) else None}


def _width_rows(s: PerfSettings, paths: PerfPaths, device: torch.device, width: float) -> tuple[list, dict]:
    most = max(s.fused_ks)
    fused_runs, sequential_runs = (_runs(s, paths, device, width, most) for _ in range(2))
    concurrent = ({k: concurrent_rate(s, paths, device, width, k) for k in s.fused_concurrent_ks}
                  if paths.conf_dir is not None else {})
    rows = []
    for k in s.fused_ks:
        fused = _fused_window(FusedTrainer([run.trainer for run in fused_runs[:k]]), s.fused_steps)
        sequential = _sequential_window([run.trainer for run in sequential_runs[:k]], s.fused_steps)
        candidates = {"fused": lambda fused=fused: timed(fused, device),
                      "sequential": lambda sequential=sequential: timed(sequential, device)}
        rows.append(_row(s, width, k, alternate(candidates, s.fused_rounds), concurrent))
    return rows, concurrent


def bench_fused(s: PerfSettings, paths: PerfPaths, device: torch.device, workdir: Path) -> dict:
    rows, concurrent = [], {}
    for width in s.fused_widths:
        width_rows, concurrent[str(width)] = _width_rows(s, paths, device, width)
        rows += width_rows
    return {"rows": rows, "concurrent_steps_s": concurrent, "precision": s.precision,
            "threads": torch.get_num_threads(), "what": WHAT}


def gpu_settings() -> PerfSettings:
    """The GPU check's sizes: full width, batch 8, bf16, against 1, 2 and 4 concurrent processes."""
    return PerfSettings(precision="bf16", fused_widths=(1.0,), fused_ks=(1, 4, 8, 16),
                        fused_concurrent_ks=(1, 2, 4), fused_steps=40, fused_rounds=3)
