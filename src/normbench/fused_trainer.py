"""The training loop of K runs fused into one model (normbench.fused).

Each run keeps its own `normbench.trainer.Trainer` -- its unfused model, criterion, optimizer, scheduler,
batch stream (its own data order and augmentation), settings and sink -- and `FusedTrainer` replaces only
the step: one forward of the fused model on the K runs' batches, each run's loss on its own logits, one
backward of their sum (each run's gradient is that of its own loss: the runs share no weights), then each
run's own optimizer and scheduler step. Each run's step rows, epoch rows, validation and divergence check
are its own Trainer's (``_flush``, ``end_epoch``), on its own model, which reads the fused values in place.

The runs are fused for a pass of training steps only: a run that diverges leaves the pass (the others are
fused anew without it; its weights, buffers and optimizer state stop changing), and after the pass every
model has its own storage again (validation, checkpoints and pruning see ordinary models). Runs resumed
at different epochs catch up one epoch at a time, each epoch's pass fusing only the runs at that epoch.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from normbench.device import keep_norms_fp32
from normbench.fused import FusedModel
from normbench.record import Status
from normbench.trainer import LoopState, PassTotals, Trainer, keep_step

SAME_SETTINGS = ("epochs", "max_steps_per_epoch", "max_steps", "amp_dtype", "channels_last",
                 "log_every_steps")


def unfusable_trainer_reason(trainer: Trainer) -> str | None:
    """Why a run's trainer cannot train fused (None: it can; the model is `normbench.fused`'s business)."""
    if trainer.probes:
        return "probes have no fused code"
    if trainer.scaler is not None:
        return "fp16 loss scaling has no fused code"
    if trainer.model is not getattr(trainer.model, "_orig_mod", trainer.model):
        return "a compiled model has no fused code"
    return None


class FusedTrainer:
    """Trains the runs of `trainers` (same model architecture, settings, batch size and data) as one."""

    def __init__(self, trainers: list[Trainer]):
        first = trainers[0]
        for trainer in trainers:
            reason = unfusable_trainer_reason(trainer)
            if reason:
                raise ValueError(f"cannot fuse: {reason}")
            differs = [k for k in SAME_SETTINGS if getattr(trainer.settings, k) != getattr(first.settings, k)]
            if differs or trainer.steps_per_epoch() != first.steps_per_epoch():
                raise ValueError(f"cannot fuse runs whose {differs or 'steps per epoch'} differ")
        self.trainers = trainers
        self.settings = first.settings
        self.fused: FusedModel | None = None
        self._members: tuple[int, ...] = ()

    def _fuse(self, members: list[int]) -> None:
        """Fuse exactly the runs `members` (indices into trainers); the others get their own storage."""
        if tuple(members) == self._members:
            return
        if self.fused is not None:
            self.fused.unfuse()
        self.fused = None
        if members:
            self.fused = FusedModel([self.trainers[i].model for i in members], self.settings.channels_last)
            if self.settings.amp_dtype is not None:
                keep_norms_fp32(self.fused)
            self.fused.train()
        self._members = tuple(members)

    def release(self) -> None:
        """Every run's model with its own storage again."""
        self._fuse([])

    def run(self, states: list[LoopState | None],
            on_epoch_end: Callable[[int, LoopState], bool] | None = None) -> list[LoopState]:
        """Train every run until its epochs are done, it diverges, or on_epoch_end(run index, state) asks
        to stop it (pruned). Returns each run's state."""
        states = [state or LoopState() for state in states]
        try:
            for epoch in range(1, self.settings.epochs + 1):
                # runs at one epoch have taken the same steps (their next epoch has the same length);
                # early stopping stops its run alone (the others train on, fused without it)
                members = [i for i, s in enumerate(states) if s.status == Status.RUNNING
                           and s.epochs_done == epoch - 1 and self.trainers[i].next_epoch_steps(s)
                           and not s.stop_early(self.trainers[i].settings)]
                totals = self.train_steps(epoch, states, members) if members else {}
                for i, done in totals.items():  # the epoch's time: the fused pass, then the run's validation
                    started = time.perf_counter() - done.time_s
                    ended = self.trainers[i].end_epoch(epoch, states[i], done, started)
                    if ended and on_epoch_end is not None and on_epoch_end(i, states[i]):
                        states[i].status = Status.PRUNED
        finally:
            self.release()
        for trainer, state in zip(self.trainers, states):
            done = state.epochs_done >= self.settings.epochs or not trainer.next_epoch_steps(state)
            if state.status == Status.RUNNING and done:
                state.status = Status.COMPLETED
        return states

    def train_steps(self, epoch: int, states: list[LoopState], members: list[int] | None = None,
                    steps: int | None = None) -> dict[int, PassTotals]:
        """One fused pass: `steps` steps (default: the next epoch's) of the runs `members` (default all), each
        run leaving the pass at its first non-finite loss, as ``Trainer.train_steps`` does."""
        active = list(range(len(self.trainers)) if members is None else members)
        first = self.trainers[active[0]]
        steps = first.next_epoch_steps(states[active[0]]) if steps is None else steps
        total = min(int(steps), len(first.stream))
        log_every = max(1, int(self.settings.log_every_steps))
        totals = {i: PassTotals() for i in active}
        pending: dict[int, tuple[list, list, list, list]] = {i: ([], [], [], []) for i in active}
        streams = {i: iter(self.trainers[i].stream) for i in active}
        self._fuse(active)
        started = time.perf_counter()
        for step in range(1, total + 1):
            self._step(epoch, active, streams, states, pending)
            if step % log_every == 0 or step == total:
                stopped = [i for i in active if not self.trainers[i]._flush(*pending[i], totals[i], None)]
                if stopped:
                    active = [i for i in active if i not in stopped]
                    self._fuse(active)
                if not active:
                    break
        elapsed = time.perf_counter() - started
        for pass_totals in totals.values():
            pass_totals.time_s = elapsed
        # between passes each model has its own storage: its checkpoint holds its tensors only, and its
        # own Trainer may use it
        self.release()
        return totals

    def _step(self, epoch: int, active: list[int], streams: dict, states: list[LoopState],
              pending: dict) -> None:
        trainers = [self.trainers[i] for i in active]
        batches = [next(streams[i]) for i in active]
        lrs = [t.scheduler.get_last_lr()[0] for t in trainers]
        with trainers[0].autocast():
            logits = self.fused(self.fused.stack_inputs([x for x, _ in batches]))
            losses = [t.criterion(logits[j], y, t.model)
                      for j, (t, (_, y)) in enumerate(zip(trainers, batches))]
        self.fused.zero_grad()
        torch.stack(losses).sum().backward()
        for j, (i, trainer) in enumerate(zip(active, trainers)):
            states[i].step += 1
            trainer.optimizer.step()
            trainer.scheduler.step()
            keep_step(pending[i], losses[j], logits[j], batches[j][1],
                      {"step": states[i].step, "epoch": epoch, "lr": lrs[j]})
