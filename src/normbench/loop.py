"""The training loop. It knows nothing about Hydra or W&B: metrics go to a MetricSink.

No host-device sync inside the step loop: per-step losses stay on the device and are read in one
transfer every `log_every_steps` steps (and at epoch end), which is also where divergence is noticed.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from normbench.data import eval_batches


@dataclass
class LoopSettings:
    epochs: int
    max_steps_per_epoch: int | None = None
    max_eval_batches: int | None = None
    eval_batch_size: int = 1000
    log_every_steps: int = 25
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    progress: bool = True


@dataclass
class LoopState:
    """Everything needed to continue a run after its last finished epoch."""
    epochs_done: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)
    status: str = "running"          # running | completed | diverged | pruned
    diverged_epoch: int | None = None
    train_time_s: float = 0.0

    @property
    def best_val_acc(self) -> float:
        return max((row["val/acc"] for row in self.history), default=0.0)


def convergence_epoch(history: list[dict], tolerance: float = 0.01) -> int | None:
    """First epoch whose validation accuracy is within `tolerance` (1 point) of the run's best."""
    if not history:
        return None
    best = max(row["val/acc"] for row in history)
    return next(row["epoch"] for row in history if row["val/acc"] >= best - tolerance)


class Trainer:
    def __init__(self, model, criterion, optimizer, scheduler, data, stream, settings: LoopSettings,
                 sink, probes=(), device: torch.device | None = None):
        self.model, self.criterion = model, criterion
        self.optimizer, self.scheduler = optimizer, scheduler
        self.data, self.stream, self.settings, self.sink = data, stream, settings, sink
        self.probes = list(probes)
        self.device = device or next(model.parameters()).device
        self.resize_to = stream.resize_to if hasattr(stream, "resize_to") else None

    def autocast(self):
        if self.settings.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.settings.amp_dtype)

    def steps_per_epoch(self) -> int:
        limit = self.settings.max_steps_per_epoch
        return min(len(self.stream), limit) if limit else len(self.stream)

    def evaluate(self, split) -> tuple[float, float]:
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        count = 0
        with torch.inference_mode(), self.autocast():
            for x, y in eval_batches(split, self.settings.eval_batch_size, self.data.mean, self.data.std,
                                     resize_to=self.resize_to, channels_last=self.settings.channels_last,
                                     max_batches=self.settings.max_eval_batches):
                logits = self.model(x)
                loss_sum += self.criterion(logits, y) * y.numel()
                correct += (logits.argmax(1) == y).sum()
                count += y.numel()
        self.model.train()
        loss, acc = (loss_sum / max(count, 1)).item(), correct.item() / max(count, 1)
        return loss, acc

    def run(self, state: LoopState | None = None,
            on_epoch_end: Callable[[LoopState], bool] | None = None) -> LoopState:
        """Train until the configured epochs are done, the loss diverges, or on_epoch_end asks to stop."""
        state = state or LoopState()
        for epoch in range(state.epochs_done + 1, self.settings.epochs + 1):
            if not self._train_epoch(epoch, state):
                state.status, state.diverged_epoch = "diverged", epoch
                return state
            state.epochs_done = epoch
            if on_epoch_end is not None and on_epoch_end(state):
                state.status = "pruned"
                return state
        state.status = "completed"
        return state

    def _train_epoch(self, epoch: int, state: LoopState) -> bool:
        """One epoch; False when the loss became non-finite."""
        model, settings = self.model, self.settings
        model.train()
        total = self.steps_per_epoch()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        pending_losses: list[torch.Tensor] = []
        pending_rows: list[dict] = []
        bar = tqdm(total=total, desc=f"epoch {epoch}/{settings.epochs}", leave=False, dynamic_ncols=True,
                   disable=not settings.progress)
        started = time.perf_counter()
        finite = True
        for index, (x, y) in enumerate(self.stream):
            if index >= total:
                break
            lr = self.scheduler.get_last_lr()[0]
            with self.autocast():
                logits = model(x)
                loss = self.criterion(logits, y, model)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            state.step += 1
            self._run_probes(state.step, epoch, x, y, lr)
            self.optimizer.step()
            self.scheduler.step()
            detached = loss.detach()
            loss_sum += detached * y.numel()
            correct += (logits.detach().argmax(1) == y).sum()
            seen += y.numel()
            pending_losses.append(detached)
            pending_rows.append({"step": state.step, "epoch": epoch, "lr": lr})
            if len(pending_losses) >= settings.log_every_steps or index + 1 == total:
                finite = self._flush_steps(pending_losses, pending_rows, bar)
                pending_losses, pending_rows = [], []
                if not finite:
                    break
            bar.update(1)
        bar.close()
        if not finite:
            return False
        train_loss = (loss_sum / max(seen, 1)).item()
        train_acc = correct.item() / max(seen, 1)
        train_time = time.perf_counter() - started
        if not math.isfinite(train_loss):
            return False
        val_loss, val_acc = self.evaluate(self.data.val)
        state.train_time_s += train_time
        row = {"epoch": epoch, "step": state.step, "train/loss": train_loss, "train/acc": train_acc,
               "val/loss": val_loss, "val/acc": val_acc, "lr": self.scheduler.get_last_lr()[0],
               "time/epoch_s": time.perf_counter() - started,
               "throughput/img_s": seen / max(train_time, 1e-9)}
        state.history.append(row)
        self.sink.log_epoch(row)
        return True

    def _flush_steps(self, losses: list[torch.Tensor], rows: list[dict], bar) -> bool:
        values = torch.stack(losses).float().tolist()  # the one sync per log interval
        for row, value in zip(rows, values):
            row["train/loss"] = value
        self.sink.log_steps(rows)
        bar.set_postfix(loss=f"{values[-1]:.4f}", refresh=False)
        return all(math.isfinite(v) for v in values)

    def _run_probes(self, step: int, epoch: int, x, y, lr: float) -> None:
        if not self.probes:
            return

        def closure():
            with self.autocast():
                return self.criterion(self.model(x), y, self.model)

        row = {}
        for probe in self.probes:
            result = probe.on_step(step, self.model, closure, lr)
            if result:
                row.update(result)
        if row:
            self.sink.log_probe({"step": step, "epoch": epoch, **row})
