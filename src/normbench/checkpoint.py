"""Epoch-end checkpoints, loaded with weights_only=True and used only by the identity they carry; one
that cannot be loaded or is another identity's is set aside, never deleted (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import torch

from normbench.faults import kill_point
from normbench.trainer import LoopState

STATE_KEYS = ("epochs_done", "step", "images", "train_time_s", "history")  # of the LoopState
PAYLOAD_KEYS = ("identity", "model", "optimizer", "scheduler", "generator", "torch_rng", "cuda_rng",
                *STATE_KEYS)


class UnusableCheckpoint(Exception):
    """Restoring failed half-way (build the parts afresh); the checkpoint is set aside already."""


class _Writer(io.RawIOBase):
    """The checkpoint's file, keeping the OSError of a failed write (torch.save hides it)."""

    def __init__(self, handle):
        self.handle, self.error = handle, None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.handle.flush()


def save_checkpoint(path: Path, *, identity: str, model, optimizer, scheduler, generator, state: LoopState):
    payload = {"identity": identity, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
               "torch_rng": torch.get_rng_state(),
               "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
               **{key: getattr(state, key) for key in STATE_KEYS}}
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            writer = _Writer(handle)
            try:
                torch.save(payload, writer)
            except RuntimeError as err:  # torch reports a failed write as "unexpected pos": say why
                if writer.error is not None:
                    raise writer.error from err
                raise
        kill_point("checkpoint_tmp_written", state.epochs_done)
        tmp.replace(path)
    except BaseException:  # a full disk or a read-only dir: leave no temp file behind (closed first,
        tmp.unlink(missing_ok=True)  # so that its space is given back at once)
        raise
    kill_point("checkpoint_saved", state.epochs_done)


def _reason(err: BaseException) -> str:
    """One short line (never torch's advice to load the file with weights_only=False)."""
    first = (str(err).strip().splitlines() or [""])[0]
    if "weights_only" in first or "Weights only" in first or not first:
        return f"{type(err).__name__}: not a checkpoint of plain tensors"
    return f"{type(err).__name__}: {first[:160]}"


def set_aside(path: Path, kind: str, reason: str) -> Path:
    """Keep the file under a name no run loads (`checkpoint.pt.<kind>-<UTC time>`), with one warning line."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.{kind}-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{kind}-{stamp}.{n}")
    path.replace(target)
    print(f"normbench: warning: {path} {reason}; kept as {target.name}, the run starts from scratch",
          file=sys.stderr, flush=True)
    return target


def read_checkpoint(path: Path) -> dict | None:
    """The payload; None when there is none. Raises when the file cannot be loaded safely."""
    if not path.exists():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict):
        raise TypeError(f"a {type(payload).__name__}, not a checkpoint")
    missing = [k for k in PAYLOAD_KEYS if k not in payload]
    if missing:
        raise ValueError(f"misses {', '.join(missing)}")
    return payload


def checkpoint_identity(path: Path) -> str | None:
    """The identity a checkpoint carries (None: no checkpoint, or one that cannot be read)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - unreadable: the run that uses it sets it aside
        return None
    identity = payload.get("identity") if isinstance(payload, dict) else None
    return identity if isinstance(identity, str) else None


def load_checkpoint(path: Path, *, identity: str, model, optimizer, scheduler, generator) -> LoopState | None:
    """Restore everything from a checkpoint of this identity; None when there is none, or when it is
    unreadable or another identity's (then it is set aside). Raises UnusableCheckpoint when restoring
    failed half-way."""
    try:
        payload = read_checkpoint(path)
    except Exception as err:  # noqa: BLE001 - corrupt, truncated or not plain weights
        set_aside(path, "corrupt", f"cannot be loaded ({_reason(err)})")
        return None
    if payload is None:
        return None
    if payload["identity"] != identity:
        set_aside(path, "other", f"belongs to run {payload['identity']!r}, not {identity!r}")
        return None
    try:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        generator.set_state(payload["generator"])
        torch.set_rng_state(payload["torch_rng"])
        if payload["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(payload["cuda_rng"])
        state = LoopState(**{key: payload[key] for key in STATE_KEYS})
    except Exception as err:
        set_aside(path, "corrupt", f"does not fit this run ({_reason(err)})")
        raise UnusableCheckpoint(str(path)) from err
    return state
