"""Fused sweep jobs (``hydra/launcher=fused``): which jobs may train as one fused model, and how a group of
them runs as K whole jobs in one process.

Each job of a group runs the ordinary job code (``normbench.job``: validation, the skip of a run already
done, its record dir, identity lock, W&B run, checkpoint and resume, pruner, final metrics, the sweep
index, the objective it returns) in a thread of its own, one thread at a time: a job that gets as far as
training parks its trainer at its `Seat` (``train``, called by ``Run.execute``) and the next job starts.
When every job has parked or ended (skipped, failed), the parked trainers train as one fused model in
this (the main) thread (``normbench.fused_trainer``; each epoch end runs the job's own checkpoint and
pruning callback), then the jobs finish one at a time in reverse order, so that each job's Hydra context
(its config, its environment variables) is restored as it was nested. An interruption (SIGTERM, Ctrl-C)
or an error of the fused training reaches every parked job as its own, which records it as it would
alone (interrupted: a re-run resumes every unfinished run from its checkpoint).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf

FUSABLE_TARGETS = ("normbench.models.vgg_a", "normbench.models.alexnet", "normbench.models.alexnet_cifar")
# What may differ between the runs of a group (each run has its own): everything else must be equal.
PER_RUN_GROUPS = ("seed", "optimizer", "scheduler", "loss", "logger", "pruning", "experiment_name")

_here = threading.local()


def unfusable_job_reason(cfg: DictConfig) -> str | None:
    """Why a job's config has no fused code (None: it fuses with the jobs of its `fuse_key`)."""
    target = OmegaConf.select(cfg, "model._target_")
    if target not in FUSABLE_TARGETS:
        return f"model {target} (only the built-in vgg_a, alexnet, alexnet_cifar fuse)"
    norm = cfg.norm.get("name")
    if norm in ("lrn", "brn") or (norm == "ln" and cfg.norm.get("affine") == "element"):
        return f"norm={norm}{' affine=element' if norm == 'ln' else ''}"
    if OmegaConf.select(cfg, "probe.name", default="none") != "none":
        return "probes"
    trainer = cfg.trainer
    if trainer.get("fault"):
        return "an injected fault (trainer.fault)"
    if trainer.get("compile"):
        return "trainer.compile=true"
    if trainer.get("precision") == "fp16":
        return "trainer.precision=fp16 (loss scaling)"
    return None


def fuse_key(cfg: DictConfig) -> str:
    """Equal for jobs that may train as one fused model: the same config outside the per-run groups
    (model and width, norm, activation, batch size, data and its pipeline, trainer: epochs and steps,
    precision, device, ...); a model's dropout may differ."""
    container = OmegaConf.to_container(cfg, resolve=True)
    shared = {k: v for k, v in container.items() if k not in PER_RUN_GROUPS and k != "hydra"}
    shared["model"] = {k: v for k, v in shared.get("model", {}).items() if k != "dropout"}
    return json.dumps(shared, sort_keys=True, default=str)


def plan_groups(keys: list[str | None], identities: list[str], max_fuse: int) -> list[list[int]]:
    """Jobs (by index) in groups of at most `max_fuse` with one key and distinct identities (a second
    job of one identity waits for the first to finish, then skips it); a job without a key (unfusable)
    is a group of its own. Groups keep the jobs' order."""
    groups: list[list[int]] = []
    open_groups: dict[str, list[int]] = {}
    for index, key in enumerate(keys):
        group = open_groups.get(key) if key is not None else None
        if group is None or len(group) >= max_fuse or identities[index] in {identities[i] for i in group}:
            group = [index]
            groups.append(group)
            if key is not None:
                open_groups[key] = group
        else:
            group.append(index)
    return groups


def train(trainer, state, on_epoch_end):
    """``Run.execute``'s training: alone, or, in a job thread of a fused group, with its group."""
    seat = getattr(_here, "seat", None)
    if seat is None:
        return trainer.run(state, on_epoch_end=on_epoch_end)
    return seat.park(trainer, state, on_epoch_end)


class Seat:
    """One job's place in a fused group."""

    def __init__(self):
        self.arrived = threading.Event()  # the job parked its trainer, or ended without training
        self.go = threading.Event()  # the group's training is over: `result` is this job's
        self.parked = False
        self.trainer = self.state = self.on_epoch_end = None
        self.result = None  # the job's LoopState, or the exception the training raised
        self.outcome = None  # what the job returned, or raised
        self.thread: threading.Thread | None = None

    def park(self, trainer, state, on_epoch_end):
        self.trainer, self.state, self.on_epoch_end, self.parked = trainer, state, on_epoch_end, True
        self.arrived.set()
        self.go.wait()
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result

    def start(self, job: Callable[[], object], name: str) -> None:
        def body() -> None:
            _here.seat = self
            try:
                self.outcome = job()
            except BaseException as exc:  # noqa: BLE001 - handed to the launcher with the job's outcome
                self.outcome = exc
            finally:
                self.arrived.set()

        self.thread = threading.Thread(target=body, name=name, daemon=True)
        self.thread.start()

    def finish(self, result) -> None:
        self.result = result
        self.go.set()
        if self.thread is not None:
            self.thread.join()


def _train_parked(seats: list[Seat]) -> list:
    """Each parked job's LoopState (or the exception that ended the training, for every job)."""
    from normbench.fused_trainer import FusedTrainer

    if len(seats) == 1:  # nothing to fuse with: exactly the job's own training
        seat = seats[0]
        return [seat.trainer.run(seat.state, on_epoch_end=seat.on_epoch_end)]
    print(f"normbench: {len(seats)} runs train as one fused model", flush=True)
    return FusedTrainer([seat.trainer for seat in seats]).run([seat.state for seat in seats],
                                                              lambda i, state: seats[i].on_epoch_end(state))


def run_group(jobs: list[Callable[[], object]]) -> list:
    """Run `jobs` (each a whole job: it returns what the job returns) as one fused group; their
    outcomes in order (an exception a job raised is its outcome). An interruption of the training is
    raised again once every job has recorded it."""
    seats: list[Seat] = []
    interrupted: BaseException | None = None
    try:
        for number, job in enumerate(jobs):
            seat = Seat()
            seats.append(seat)
            seat.start(job, f"fused-job-{number}")
            seat.arrived.wait()
        parked = [seat for seat in seats if seat.parked]
        try:
            results = _train_parked(parked) if parked else []
        except BaseException as exc:  # noqa: BLE001 - every parked job records it as its own
            results, interrupted = [exc] * len(parked), exc
    except BaseException as exc:  # noqa: BLE001 - interrupted while the jobs were starting
        parked, interrupted = [s for s in seats if s.parked], exc
        results = [exc] * len(parked)
    for seat, result in reversed(list(zip(parked, results))):
        seat.finish(result)
    # ended without training (or, when interrupted, still starting: it gets the interruption)
    for seat in seats:
        if not seat.go.is_set():
            seat.finish(interrupted)
    if isinstance(interrupted, KeyboardInterrupt):
        raise interrupted
    return [seat.outcome for seat in seats]
