"""Epoch-end checkpoints, loaded with weights_only=True."""

from __future__ import annotations

from pathlib import Path

import torch

from normbench.trainer import LoopState


def save_checkpoint(path: Path, *, identity: str, model, optimizer, scheduler, generator, state: LoopState):
    payload = {
        "identity": identity,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "epochs_done": state.epochs_done,
        "step": state.step,
        "train_time_s": state.train_time_s,
        "history": state.history,
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, *, identity: str, model, optimizer, scheduler, generator) -> LoopState | None:
    """Restore everything from a checkpoint of the same identity; None when there is none."""
    if not path.exists():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("identity") != identity:
        return None
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    generator.set_state(payload["generator"])
    torch.set_rng_state(payload["torch_rng"])
    if payload["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["cuda_rng"])
    return LoopState(epochs_done=payload["epochs_done"], step=payload["step"],
                     history=list(payload["history"]), train_time_s=payload["train_time_s"])
