"""Fault injection (`+trainer.fault=raise|oom|kill|wait`, NORMBENCH_KILL_AT; docs/sweeps.md, "Failures")
and recognising out-of-memory errors.

A fault fires inside the real training loop and goes through the real error handling. `kill` is a
preemption (SIGKILL, no cleanup), once: a run that resumed from a checkpoint goes on. `wait` holds the run
at an exact step until a file appears, so a test can interrupt it there without guessing with sleeps.
NORMBENCH_KILL_AT is an environment variable, not a config key, so the killed run and its re-run have the
same identity.
"""

from __future__ import annotations

import gc
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from normbench.errors import ConfigError
from normbench.schema import TrainerConf

KILL_AT_ENV = "NORMBENCH_KILL_AT"
KILL_POINTS = (
    "checkpoint_tmp_written",   # the epoch's checkpoint is in its temp file, not yet renamed
    "checkpoint_saved",         # the epoch's checkpoint is in place
    "summary_written",          # the final summary.json is written, the sweep index not yet updated
    "index_updated",            # the sweep index entry says how the run ended
)


def check_fault(trainer: TrainerConf) -> None:
    """`wait` needs `+trainer.fault_file=PATH`: it appends a line to `PATH.waiting` when the run gets
    there, then holds the run until PATH exists."""
    if trainer.fault == "wait" and not trainer.fault_file:
        raise ConfigError("trainer.fault_file", trainer.fault_file, "trainer.fault=wait needs the path of "
                          "the file that releases the run, e.g. +trainer.fault_file=/tmp/go")


class FaultyStream:
    """The real batch stream, failing at step `trainer.fault_step` (default 1) of epoch
    `trainer.fault_epoch` (default 1); the run is recorded as failed."""

    def __init__(self, stream, trainer: TrainerConf, device: torch.device):
        self.stream, self.kind, self.device = stream, trainer.fault, device
        self.batch_size = getattr(stream, "batch_size", None)  # read by the batch-stats evaluation
        self.epoch, self.step = trainer.fault_epoch or 1, trainer.fault_step or 1
        self.file = trainer.fault_file
        self.current_epoch = 0  # epochs already trained (set by a run that resumes from a checkpoint)
        self.resumed = False    # set by a run that resumed from a checkpoint: a kill fault does not fire

    def __len__(self) -> int:
        return len(self.stream)

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
        if self.kind == "kill":
            if self.resumed:
                return
            os.kill(os.getpid(), signal.SIGKILL)
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


@dataclass(frozen=True)
class KillPoint:
    point: str
    epoch: int | None = None       # None: the first time the point is reached
    signal: int = signal.SIGKILL


def kill_at() -> KillPoint | None:
    """The kill point NORMBENCH_KILL_AT names (None when unset), e.g. `checkpoint_saved@2:TERM`."""
    text = os.environ.get(KILL_AT_ENV)
    if not text:
        return None
    text, _, sig = text.partition(":")
    point, _, epoch = text.partition("@")
    if point not in KILL_POINTS:
        raise ConfigError(KILL_AT_ENV, point, f"choose one of {', '.join(KILL_POINTS)}")
    return KillPoint(point, int(epoch) if epoch else None,
                     getattr(signal, f"SIG{sig.upper().removeprefix('SIG')}") if sig else signal.SIGKILL)


def kill_point(point: str, epoch: int | None = None) -> None:
    """Send this process the signal NORMBENCH_KILL_AT asks for when it names this point (and epoch)."""
    spec = kill_at()
    if spec is not None and spec.point == point and spec.epoch in (None, epoch):
        os.kill(os.getpid(), spec.signal)


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
