"""Where a sweep job runs: its device and its share of the CPU when a launcher runs jobs at once."""

from __future__ import annotations

import os

import torch


def launcher_jobs(launcher) -> int:
    """How many jobs the launcher runs at once: joblib's n_jobs (-1: one per core), else 1."""
    n_jobs = (launcher or {}).get("n_jobs") if launcher is not None else None
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
    """Bind a sweep job to its own device and share of the CPU.

    - trainer.device=auto with several CUDA GPUs: GPU index = job number mod GPU count, so the N jobs
      a parallel launcher runs at once land on different GPUs (with one GPU they all share it).
    - trainer.threads=0 with a launcher running n_jobs > 1 at once: cores // n_jobs threads each.
    Explicit settings (trainer.device=cuda:1, trainer.threads=4) are kept as they are.
    """
    device = str(device)
    if device == "auto" and job_num is not None and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        device = f"cuda:{job_num % torch.cuda.device_count()}"
    if not threads and n_jobs > 1:
        threads = max(1, cpu_count() // n_jobs)
    return device, int(threads or 0)
