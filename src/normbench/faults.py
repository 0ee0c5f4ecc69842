"""Fault injection (`+trainer.fault=raise|oom|wait`) and recognising out-of-memory errors.

For checking that a sweep survives a run that raises or runs out of memory: the fault fires inside the
real training loop and goes through the real error handling. `wait` holds the run at an exact step
until a file appears, so a test can interrupt it there (SLURM requeue, timeout signal) without guessing
with sleeps.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from normbench.errors import ConfigError

FAULTS = ("none", "raise", "oom", "wait")


@dataclass(frozen=True)
class FaultSpec:
    kind: str = "none"
    epoch: int = 1
    step: int = 1
    file: str | None = None  # wait: the file whose appearance releases the run


def fault_spec(cfg: DictConfig) -> FaultSpec:
    """The injected fault (`+trainer.fault=raise|oom|wait`, at `+trainer.fault_epoch` (1) and
    `+trainer.fault_step` (1), the step within that epoch): for checking that a sweep survives a run
    that raises or runs out of memory. It fails inside the real training loop, through the real error
    handling; the run is recorded as failed. `wait` (with `+trainer.fault_file=PATH`) appends a line
    to `PATH.waiting` when the run gets there, then holds it until PATH exists."""
    trainer = cfg.trainer
    kind = trainer.get("fault") or "none"
    kind = str(kind)
    if kind not in FAULTS:
        raise ConfigError("trainer.fault", kind, f"choose one of {', '.join(FAULTS)}")
    at = []
    for key in ("fault_epoch", "fault_step"):
        value = trainer.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"trainer.{key}", value, "must be an integer >= 1")
        at.append(value)
    file = trainer.get("fault_file")
    if kind == "wait" and (not isinstance(file, str) or not file):
        raise ConfigError("trainer.fault_file", file, "trainer.fault=wait needs the path of the file that releases "
                          "the run, e.g. +trainer.fault_file=/tmp/go")
    return FaultSpec(kind, at[0], at[1], file)


class FaultyStream:
    """The real batch stream, failing at one training step (see fault_spec)."""

    def __init__(self, stream, spec: FaultSpec, device: torch.device):
        self.stream, self.kind, self.epoch, self.step, self.device = stream, spec.kind, spec.epoch, spec.step, device
        self.file = spec.file
        self.current_epoch = 0  # epochs already trained (set by a run that resumes from a checkpoint)

    def __len__(self) -> int:
        return len(self.stream)

    def __getattr__(self, name):
        return getattr(self.stream, name)

    def __iter__(self):
        self.current_epoch += 1
        for index, batch in enumerate(self.stream):
            if self.current_epoch == self.epoch and index + 1 == self.step:
                self.wait() if self.kind == "wait" else self.fail()
            yield batch

    def wait(self) -> None:
        """Tell the test where we are (one line per arrival: pid, SLURM restart count), then wait for
        its file. Polling keeps the main thread in Python code, so signal handlers (submitit's
        SIGUSR2) run at once."""
        release = Path(self.file)
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        with open(f"{release}.waiting", "a") as marker:
            marker.write(f"{os.getpid()} {restarts} epoch {self.epoch} step {self.step}\n")
        while not release.exists():
            time.sleep(0.05)

    def fail(self) -> None:
        where = f"injected by trainer.fault={self.kind} at epoch {self.epoch}, step {self.step}"
        if self.kind == "oom":
            if self.device.type == "cuda":  # a real allocation the caching allocator cannot satisfy
                torch.empty(1 << 50, dtype=torch.uint8, device=self.device)
            try:
                np.empty(1 << 60, dtype=np.uint8)  # a real host allocation that fails: MemoryError
            except MemoryError as err:
                if hasattr(err, "add_note"):  # Python 3.11+
                    err.add_note(f"({where})")
                raise
        raise RuntimeError(f"fault {where}")


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
