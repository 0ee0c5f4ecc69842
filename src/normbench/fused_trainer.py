"""The training loop of K runs fused into one model (normbench.fused).

Each run keeps its own `normbench.trainer.Trainer` -- its unfused model, criterion, optimizer, scheduler,
batch stream (its own data order and augmentation), settings and sink -- and `FusedTrainer` replaces only
the step: one forward of the fused model on the K runs' batches, each run's loss on its own logits, one
backward of their sum (each run's gradient is that of its own loss: the runs share no weights), then each
run's own optimizer and scheduler step (runs that all use plain SGD step together: `FusedSGD`). Each run's
step rows, epoch rows, validation and divergence check are its own Trainer's (``_flush``, ``end_epoch``),
on its own model, which reads the fused values in place.

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
from normbench.fused import FusedModel, pieces
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


class FusedSGD:
    """The runs' `torch.optim.SGD` steps as one over the fused tensors, by SGD's update rule, when every
    run's optimizer is a plain SGD (one parameter group, no hooks) with the same settings but its lr (read
    at every step, as its scheduler set it). While fused, the momentum buffers in each run's optimizer
    state are views of the fused ones (`release` gives them their own storage again)."""

    SAME = ("momentum", "dampening", "weight_decay", "nesterov", "maximize")

    def __init__(self, fused: FusedModel, optimizers: list[torch.optim.Optimizer]):
        self.optimizers, self.k = optimizers, len(optimizers)
        self.hyper = {key: optimizers[0].param_groups[0][key] for key in self.SAME}
        self.entries = []  # [fused parameter, stacked, the runs' parameters, fused momentum buffer]
        for param, stacked, own in fused.linked_parameters():
            buffers = [opt.state.get(p, {}).get("momentum_buffer") for opt, p in zip(optimizers, own)]
            join = torch.stack if stacked else torch.cat
            self.entries.append([param, stacked, own, None if buffers[0] is None else join(buffers)])
            if buffers[0] is not None:
                self._share(self.entries[-1])

    @classmethod
    def build(cls, fused: FusedModel, optimizers: list) -> FusedSGD | None:
        """None unless every optimizer qualifies (then each run steps its own optimizer)."""
        groups = [opt.param_groups for opt in optimizers]
        plain = all(type(opt) is torch.optim.SGD and len(g) == 1 and not g[0]["differentiable"]
                    and not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
                    for opt, g in zip(optimizers, groups))
        if not plain or len({tuple(g[0][key] for key in cls.SAME) for g in groups}) != 1:
            return None
        linked = [own for _, _, own in fused.linked_parameters()]
        if any({id(p) for p in g[0]["params"]} != {id(params[k]) for params in linked}
               for k, g in enumerate(groups)):  # each optimizer steps exactly its model's parameters
            return None
        started = {opt.state.get(params[k], {}).get("momentum_buffer") is not None
                   for params in linked for k, opt in enumerate(optimizers)}
        return cls(fused, optimizers) if len(started) == 1 else None

    def _share(self, entry) -> None:
        for opt, p, piece in zip(self.optimizers, entry[2], pieces(entry[3], self.k, entry[1])):
            opt.state[p]["momentum_buffer"] = piece  # a view of the fused buffer

    @torch.no_grad()
    def step(self) -> None:
        """SGD's update of every fused tensor at once: one Python call of a few foreach kernels, where the
        runs' own steps are K calls (K fused kernels on a GPU, K loops over their tensors on a CPU)."""
        momentum, dampening, decay, nesterov, maximize = (self.hyper[key] for key in self.SAME)
        params = [entry[0] for entry in self.entries]
        d_p = torch._foreach_neg([p.grad for p in params]) if maximize else [p.grad for p in params]
        if decay:
            d_p = torch._foreach_add(d_p, params, alpha=decay)
        if momentum:
            if self.entries[0][3] is None:  # the first step: the buffers start as d_p
                for entry, d in zip(self.entries, d_p):
                    entry[3] = d.detach().clone()
                    self._share(entry)
            else:
                torch._foreach_mul_([entry[3] for entry in self.entries], momentum)
                torch._foreach_add_([entry[3] for entry in self.entries], d_p, alpha=1 - dampening)
            buffers = [entry[3] for entry in self.entries]
            d_p = torch._foreach_add(d_p, buffers, alpha=momentum) if nesterov else buffers
        lrs = [opt.param_groups[0]["lr"] for opt in self.optimizers]
        if len(set(lrs)) == 1:
            torch._foreach_add_(params, d_p, alpha=-lrs[0])
        else:  # each run its own lr, on its pieces of every tensor
            split = [zip(pieces(p, self.k, entry[1]), pieces(d, self.k, entry[1]))
                     for p, d, entry in zip(params, d_p, self.entries)]
            for lr, own in zip(lrs, zip(*split)):
                torch._foreach_add_([p for p, _ in own], [d for _, d in own], alpha=-lr)
        for opt in self.optimizers:
            opt._opt_called = True  # what the schedulers' check of the step order reads

    def release(self) -> None:
        for _, _, own, fused_buffer in self.entries:
            for opt, p in zip(self.optimizers, own if fused_buffer is not None else ()):
                opt.state[p]["momentum_buffer"] = opt.state[p]["momentum_buffer"].clone()


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
        self.fused_sgd: FusedSGD | None = None
        self._members: tuple[int, ...] = ()

    def _fuse(self, members: list[int]) -> None:
        """Fuse exactly the runs `members` (indices into trainers); the others get their own storage."""
        if tuple(members) == self._members:
            return
        if self.fused is not None:
            self.fused.unfuse()
        if self.fused_sgd is not None:
            self.fused_sgd.release()
        self.fused, self.fused_sgd = None, None
        if members:
            self.fused = FusedModel([self.trainers[i].model for i in members], self.settings.channels_last)
            if self.settings.amp_dtype is not None:
                keep_norms_fp32(self.fused)
            self.fused.train()
            self.fused_sgd = FusedSGD.build(self.fused, [self.trainers[i].optimizer for i in members])
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
        if self.fused_sgd is not None:
            self.fused_sgd.step()
        for j, (i, trainer) in enumerate(zip(active, trainers)):
            states[i].step += 1
            if self.fused_sgd is None:
                trainer.optimizer.step()
            trainer.scheduler.step()
            keep_step(pending[i], losses[j], logits[j], batches[j][1],
                      {"step": states[i].step, "epoch": epoch, "lr": lrs[j]})
