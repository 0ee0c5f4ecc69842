"""Epoch-end checkpoints and best.pt (the best validation epoch's weights), loaded with weights_only=True
and used only by the identity they carry; a checkpoint that cannot be loaded or is another identity's is set
aside, never deleted (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import torch

from normbench.faults import kill_point
from normbench.record import atomic_write, set_aside
from normbench.trainer import LoopState

STATE_KEYS = ("epochs_done", "step", "images", "train_time_s", "history")  # of the LoopState
PAYLOAD_KEYS = ("identity", "model", "optimizer", "scheduler", "generator", "torch_rng", "cuda_rng",
                *STATE_KEYS)


class UnusableCheckpoint(Exception):
    """Restoring failed half-way (build the parts afresh); the checkpoint is set aside already."""


def _save(path: Path, payload: dict, written: Callable[[], None] = lambda: None) -> None:
    """`payload` to `path` atomically (normbench.record.atomic_write), serialised in memory first: a failed
    write (a full disk, a read-only dir) is then the OSError that says why, not torch's "unexpected pos".
    `written` is called once the temp file holds it all."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getbuffer())
        handle.flush()
        written()


def save_checkpoint(path: Path, *, identity: str, model, optimizer, scheduler, generator, state: LoopState):
    payload = {"identity": identity, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
               "torch_rng": torch.get_rng_state(),
               "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
               **{key: getattr(state, key) for key in STATE_KEYS}}
    _save(path, payload, lambda: kill_point("checkpoint_tmp_written", state.epochs_done))
    kill_point("checkpoint_saved", state.epochs_done)


def save_best(path: Path, *, identity: str, model, row: dict) -> None:
    """best.pt: the model's weights at the epoch of `row` (its metrics.jsonl row), the best so far."""
    _save(path, {"identity": identity, "epoch": row["epoch"], "step": row["step"], "val/acc": row["val/acc"],
                 "model": model.state_dict()})


def read_best(path: Path, *, identity: str, epoch: int | None) -> dict | None:
    """best.pt's payload when it holds this identity's weights of `epoch`; None otherwise (none, another
    run's, or an epoch whose record a killed attempt did not keep)."""
    payload = _readable(path)
    ok = epoch is not None and payload.get("identity") == identity and payload.get("epoch") == epoch
    return payload if ok else None


def _reason(err: BaseException) -> str:
    """One short line (never torch's advice to load the file with weights_only=False)."""
    first = (str(err).strip().splitlines() or [""])[0]
    if "weights_only" in first or "Weights only" in first or not first:
        return f"{type(err).__name__}: not a checkpoint of plain tensors"
    return f"{type(err).__name__}: {first[:160]}"


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


def _readable(path: Path) -> dict:
    """A checkpoint's or best.pt's payload; {} when there is none or it cannot be read (a run that uses
    such a checkpoint sets it aside)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - missing, truncated or not plain tensors
        return {}
    return payload if isinstance(payload, dict) else {}


def checkpoint_identity(path: Path) -> str | None:
    """The identity a checkpoint carries (None: no checkpoint, or one that cannot be read)."""
    identity = _readable(path).get("identity")
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
