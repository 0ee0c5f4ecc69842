"""Stopping runs that are clearly worse than their peers (off by default).

The job asks its pruner after every epoch: `should_stop(epoch, val_error) -> bool`; True ends the run
with status `pruned` (its record, checkpoint and objective are kept).

- Optuna sweeps: `normbench.sweep.optuna_support.trial_pruner()` (reports to the Optuna trial and asks
  its pruner) whenever the job is an Optuna trial (the job chooses: `normbench.job.run_pruner`).
- Grid sweeps (`pruning=median`): the median-stopping rule over the finished runs of the same sweep
  dir. After `warmup_epochs` epochs, and once at least `min_runs` completed peers reached epoch e, a
  run whose best validation error up to epoch e is worse than the median of the peers' best errors
  up to epoch e stops. Best-so-far (not the last epoch's error) keeps one noisy epoch from stopping
  a good run. Peers are completed runs only: their curves are written once, when they complete, to
  `<sweep dir>/.normbench/curves/`, and read incrementally (each file once per job).
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Protocol

from normbench.schema import PruningConf, parse


class Pruner(Protocol):
    def should_stop(self, epoch: int, val_error: float) -> bool: ...


class MedianStoppingPruner:
    def __init__(self, curves_dir: str | Path, identity: str | None, warmup_epochs: int, min_runs: int):
        self.curves_dir = Path(curves_dir)
        self.identity = identity
        self.warmup_epochs, self.min_runs = warmup_epochs, min_runs
        self.best = float("inf")
        self.peers: dict[str, list[float]] = {}   # identity -> best-so-far error per epoch
        self.last_decision: dict | None = None

    def _refresh(self) -> None:
        try:
            names = os.listdir(self.curves_dir)
        except OSError:
            return
        for name in names:
            identity = name[:-5]
            if not name.endswith(".json") or name.startswith(".") or identity in self.peers:
                continue
            if identity == self.identity:
                continue
            try:
                errors = json.loads((self.curves_dir / name).read_text())["val_error"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            best, running = float("inf"), []
            for error in errors:
                best = min(best, float(error))
                running.append(best)
            self.peers[identity] = running

    def should_stop(self, epoch: int, val_error: float) -> bool:
        self.best = min(self.best, float(val_error))
        if epoch <= self.warmup_epochs:
            return False
        self._refresh()
        at_epoch = [curve[epoch - 1] for curve in self.peers.values() if len(curve) >= epoch]
        if len(at_epoch) < self.min_runs:
            return False
        median = statistics.median(at_epoch)
        self.last_decision = {"epoch": epoch, "best_error": self.best, "median": median,
                              "peers": len(at_epoch)}
        return self.best > median


def pruning_spec(cfg) -> PruningConf:
    """The `pruning` node, parsed (before anything expensive)."""
    return parse("pruning", PruningConf, cfg.get("pruning") or {})


