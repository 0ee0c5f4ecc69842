"""The training loop. It knows nothing about Hydra or W&B: metrics go to a MetricSink.

Nothing in a training step waits for the device: the per-step losses and predictions stay there and are read
in one transfer every ``log_every_steps`` steps. What the hot path does and its measurements against a
hand-written loop: docs/PERFORMANCE.md, "The fast path".
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from normbench.data import eval_batches
from normbench.device import NORM_TYPES, keep_norms_fp32
from normbench.record import Status

BATCH_STATS_NORMS = torch.nn.modules.batchnorm._NormBase  # the norms whose output depends on the batch


@dataclass
class LoopSettings:
    epochs: int
    max_steps_per_epoch: int | None = None
    max_steps: int | None = None    # the run's budget of optimizer steps, over all its epochs
    max_eval_batches: int | None = None
    eval_batch_size: int = 1000
    log_every_steps: int = 25
    batchstats_images: int = 0
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    progress: bool = True
    patience: int | None = None   # early stopping (trainer.early_stopping); None or 0: off
    min_delta: float = 0.0

    def steps_per_epoch(self, batches: int) -> int:
        """Training steps of an epoch of `batches` batches (max_steps_per_epoch caps it)."""
        return min(batches, self.max_steps_per_epoch or batches)

    def total_steps(self, batches: int) -> int:
        """Optimizer steps of the whole run: its epochs', or max_steps when that is fewer."""
        return min(self.epochs * self.steps_per_epoch(batches), self.max_steps or math.inf)


@dataclass
class LoopState:
    """Everything needed to continue a run after its last finished epoch."""
    epochs_done: int = 0
    step: int = 0
    images: int = 0                 # training images seen
    history: list[dict] = field(default_factory=list)
    status: Status = Status.RUNNING   # then completed, diverged or pruned
    diverged_epoch: int | None = None
    train_time_s: float = 0.0
    stop_reason: str | None = None   # "early_stopping": completed before its last epoch

    @property
    def best_val_acc(self) -> float:
        return max((row["val/acc"] for row in self.history), default=0.0)

    @property
    def best_epoch(self) -> int | None:
        """The first epoch of the best validation accuracy (best.pt's)."""
        return max(self.history, key=lambda row: row["val/acc"], default={}).get("epoch")

    def stop_early(self, settings: LoopSettings) -> bool:
        """Whether validation accuracy has not improved by more than `min_delta` on its best so far for
        `patience` epochs; then the run is completed, with its stop reason. Read from the history alone,
        so that a resumed run counts as the uninterrupted one would."""
        best, waited = -math.inf, 0
        for acc in (row["val/acc"] for row in self.history):
            best, waited = (acc, 0) if acc > best + settings.min_delta else (best, waited + 1)
        if not settings.patience or waited < settings.patience:
            return False
        self.status, self.stop_reason = Status.COMPLETED, "early_stopping"
        return True


@dataclass
class PassTotals:
    """What one pass of training steps saw (host-side numbers, read at the logging points)."""
    steps: int = 0
    seen: int = 0
    loss_sum: float = 0.0     # sum over steps of loss x batch size
    correct: int = 0
    finite: bool = True
    time_s: float = 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.seen, 1)

    @property
    def acc(self) -> float:
        return self.correct / max(self.seen, 1)


def convergence_epoch(history: list[dict], tolerance: float = 0.01,
                      learned_above: float | None = None) -> int | None:
    """First epoch whose validation accuracy is within `tolerance` (1 point) of the run's best; None for
    a run without epochs or, given `learned_above` (see normbench.record.learned_threshold), one whose best
    validation accuracy never exceeds it: a run that never learns has no convergence epoch."""
    if not history:
        return None
    best = max(row["val/acc"] for row in history)
    if learned_above is not None and not best > learned_above:
        return None
    return next(row["epoch"] for row in history if row["val/acc"] >= best - tolerance)


def keep_step(pending: tuple[list, list, list, list], loss, logits, labels, row: dict) -> None:
    """A step's loss, predictions, labels and row, kept on the device until the next logging point."""
    for kept, value in zip(pending, (loss.detach(), logits.detach().argmax(1), labels, row)):
        kept.append(value)


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm  # only when a terminal shows it

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


class Trainer:
    """Trains `model` on batches from `stream`; see the module docstring for what the hot path does.

    With an autocast dtype (``settings.amp_dtype``) the norm layers are made to compute in float32
    (``normbench.device.keep_norms_fp32``): under CUDA autocast BatchNorm would otherwise run on the bf16
    convolution output, and under CPU autocast every norm would.
    """

    def __init__(self, model, criterion, optimizer, scheduler, data, stream, settings: LoopSettings,
                 sink, probes=(), device: torch.device | None = None):
        self.model, self.criterion = model, criterion
        self.optimizer, self.scheduler = optimizer, scheduler
        self.data, self.stream, self.settings, self.sink = data, stream, settings, sink
        self.probes = list(probes)
        self.device = device or next(model.parameters()).device
        self.resize_to = getattr(stream, "resize_to", None)
        if settings.amp_dtype is not None:
            keep_norms_fp32(model)
        # fp16 needs loss scaling against gradient underflow; bf16 (the CUDA default) does not.
        self.scaler = (torch.amp.GradScaler(self.device.type)
                       if settings.amp_dtype == torch.float16 else None)

    def autocast(self):
        if self.settings.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.settings.amp_dtype)

    def steps_per_epoch(self) -> int:
        return self.settings.steps_per_epoch(len(self.stream))

    def next_epoch_steps(self, state: LoopState) -> int:
        """The steps of the run's next epoch: an epoch's, fewer where the step budget ends in it, 0 when
        the run has no steps left."""
        return max(0, min(self.steps_per_epoch(), self.settings.total_steps(len(self.stream)) - state.step))

    def evaluate(self, split, batch_size: int | None = None, max_batches: int | None = None,
                 batch_stats: bool = False, first: int = 0) -> tuple[float, ...]:
        """Loss and accuracy on `split` (default batches: eval_batch_size, max_eval_batches) in eval mode, or
        with `batch_stats` with the norm layers in train mode (each batch normalized by its own statistics)
        and dropout off, every buffer restored afterwards; with `first`, then those of its first images."""
        self.model.eval()
        saved = [(b, b.clone()) for b in self.model.buffers()] if batch_stats else []
        for module in self.model.modules() if batch_stats else ():
            module.training = isinstance(module, NORM_TYPES)
        sums = torch.zeros(4, device=self.device)  # loss, hits: of every image, of the first `first`
        count = 0
        with torch.inference_mode(), self.autocast():
            for x, y in eval_batches(split, batch_size or self.settings.eval_batch_size, self.data.mean,
                                     self.data.std, resize_to=self.resize_to,
                                     channels_last=self.settings.channels_last,
                                     max_batches=max_batches or self.settings.max_eval_batches):
                logits = self.model(x)
                n, hits = y.numel(), logits.argmax(1) == y
                loss = self.criterion(logits, y).float() * n
                sums[:2] += torch.stack([loss, hits.sum().float()])
                if (k := min(n, first - count)) > 0:
                    head = loss if k == n else self.criterion(logits[:k], y[:k]).float() * k
                    sums[2:] += torch.stack([head, hits[:k].sum().float()])
                count += n
            values = sums.tolist()  # one sync
            for buffer, value in saved:
                buffer.copy_(value)
        self.model.train()
        seen = (max(count, 1),) * 2 + (max(min(first, count), 1),) * 2
        return tuple(value / n for value, n in zip(values, seen))[:4 if first else 2]

    def validate(self) -> dict[str, float]:
        """Validation loss and accuracy, and the batch-stats gap: the first `batchstats_images` images in
        whole batches of the training batch size in eval mode (`val/*_evalmode`, from the validation's own
        passes when they cover them) and with batch statistics (`val/*_batchstats`; a model without
        batch-statistics norms computes the same numbers both ways). No random numbers are drawn."""
        batch_size, settings = self.stream.batch_size, self.settings
        batches = min(settings.batchstats_images, len(self.data.val)) // batch_size
        images, limit = batches * batch_size, settings.max_eval_batches  # no limit: validation reads all
        covered = not limit or images <= settings.eval_batch_size * limit
        values = self.evaluate(self.data.val, first=images if covered else 0)
        row = {"val/loss": values[0], "val/acc": values[1]}
        if batches:
            evalmode = values[2:] or self.evaluate(self.data.val, batch_size, batches)
            batchstats = evalmode if not any(isinstance(m, BATCH_STATS_NORMS) for m in self.model.modules()) \
                else self.evaluate(self.data.val, batch_size, batches, True)
            for mode, (loss, acc) in (("evalmode", evalmode), ("batchstats", batchstats)):
                row[f"val/loss_{mode}"], row[f"val/acc_{mode}"] = loss, acc
        return row

    def run(self, state: LoopState | None = None,
            on_epoch_end: Callable[[LoopState], bool] | None = None) -> LoopState:
        """Train until the configured epochs or steps are done, early stopping ends the run, the loss
        diverges, or on_epoch_end asks to stop; the last epoch may be cut short by the step budget (it still
        validates)."""
        state = state or LoopState()
        for epoch in range(state.epochs_done + 1, self.settings.epochs + 1):
            if state.stop_early(self.settings):
                return state
            if not self.next_epoch_steps(state):
                break
            started = time.perf_counter()
            if not self.end_epoch(epoch, state, self.train_steps(epoch, state), started):
                return state
            if on_epoch_end is not None and on_epoch_end(state):
                state.status = Status.PRUNED
                return state
        state.status = Status.COMPLETED
        return state

    def end_epoch(self, epoch: int, state: LoopState, totals: PassTotals, started: float) -> bool:
        """After the epoch's training steps (`totals`): validation and the epoch row; False when the loss
        became non-finite (the run diverged). `started`: when the epoch began (perf_counter)."""
        state.images += totals.seen
        if not totals.finite or not math.isfinite(totals.loss):
            state.status, state.diverged_epoch = Status.DIVERGED, epoch
            return False
        validated = self.validate()
        state.train_time_s += totals.time_s
        row = {"epoch": epoch, "step": state.step, "train/loss": totals.loss, "train/acc": totals.acc,
               "val/loss": validated.pop("val/loss"), "val/acc": validated.pop("val/acc"),
               "lr": self.scheduler.get_last_lr()[0], "time/epoch_s": time.perf_counter() - started,
               "train/images": state.images, "throughput/img_s": totals.seen / max(totals.time_s, 1e-9),
               **validated}
        state.history.append(row)
        self.sink.log_epoch(row)
        state.epochs_done = epoch
        return True

    def train_steps(self, epoch: int, state: LoopState, steps: int | None = None) -> PassTotals:
        """One pass over the stream: `steps` training steps (default: the run's next epoch's), stopping at a
        non-finite loss. Step rows go to the sink at each logging point. This is the hot path that
        `bench/perf.py` times against a hand-written loop."""
        model, optimizer, scheduler, criterion = self.model, self.optimizer, self.scheduler, self.criterion
        log_every = max(1, int(self.settings.log_every_steps))
        total = self.next_epoch_steps(state) if steps is None else min(int(steps), len(self.stream))
        totals, pending = PassTotals(), ([], [], [], [])
        bar = _progress_bar(total, f"epoch {epoch}/{self.settings.epochs}", self.settings.progress)
        probes, scaler = self.probes, self.scaler
        # under autocast, the probes' fp32 gradient is recomputed with the training forward's RNG state
        track_rng = bool(probes) and self.settings.amp_dtype is not None
        if track_rng:
            from normbench.probes import capture_rng, reads_gradient
        rng = None
        model.train()
        started = time.perf_counter()
        for x, y in itertools.islice(self.stream, total):
            lr = scheduler.get_last_lr()[0]
            if track_rng:
                rng = capture_rng() if reads_gradient(probes, state.step + 1) else None
            with self.autocast():
                logits = model(x)
                loss = criterion(logits, y, model)
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
            else:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)  # probes and the step see true gradients
            state.step += 1
            if probes:
                self._run_probes(state.step, epoch, x, y, lr, rng)
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)
                scaler.update()
            scheduler.step()
            if bar is not None:  # every step (tqdm redraws at most every 0.1 s): an ETA from the first step
                bar.update()
            keep_step(pending, loss, logits, y, {"step": state.step, "epoch": epoch, "lr": lr})
            if len(pending[3]) >= log_every and not self._flush(*pending, totals, bar):
                break
        if pending[3]:  # the last, partial interval (or a stream that ended early)
            self._flush(*pending, totals, bar)
        totals.time_s = time.perf_counter() - started
        if bar is not None:
            bar.close()
        return totals

    def _flush(self, losses: list, preds: list, labels: list, rows: list[dict], totals: PassTotals,
               bar) -> bool:
        """Read the pending losses and hit count in one device->host transfer; log the step rows."""
        hits = (torch.cat(preds) == torch.cat(labels)).sum().float()
        values = torch.cat([torch.stack(losses).float(), hits[None]]).tolist()  # the one sync
        step_losses, hit_count = values[:-1], int(values[-1])
        batch_sizes = [int(y.shape[0]) for y in labels]
        for row, value in zip(rows, step_losses):
            row["train/loss"] = value
        self.sink.log_steps(list(rows))
        totals.steps += len(rows)
        totals.seen += sum(batch_sizes)
        totals.loss_sum += sum(v * b for v, b in zip(step_losses, batch_sizes))
        totals.correct += hit_count
        finite = all(math.isfinite(v) for v in step_losses)
        totals.finite = totals.finite and finite
        if bar is not None:
            bar.set_postfix(loss=f"{step_losses[-1]:.4f}", refresh=False)
        for pending in (losses, preds, labels, rows):
            pending.clear()
        return finite

    def _run_probes(self, step: int, epoch: int, x, y, lr: float, rng=None) -> None:
        """The probes see float32 whatever the training precision: their closure runs with autocast off,
        and under autocast the mini-batch gradient they read is recomputed in float32 (the loop's bf16
        gradients would inflate β at small learning rates ~5x: the rounding noise of two bf16 gradients
        divided by a tiny step)."""
        from normbench.probes import fp32_closure, run_probes  # imported only by runs that have probes

        closure = fp32_closure(lambda: self.criterion(self.model(x), y, self.model))
        row = run_probes(self.probes, step, self.model, closure, lr,
                         loop_grads_fp32=self.settings.amp_dtype is None, rng_at_forward=rng)
        if row:
            self.sink.log_probe({"step": step, "epoch": epoch, **row})
