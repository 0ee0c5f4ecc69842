"""Metric sinks: what a sink takes (MetricSink), the W&B run, TensorBoard, the console and a fan-out to
several sinks."""

from __future__ import annotations

import logging
import netrc
import os
import socket
import sys
import threading
from enum import Enum
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

import numpy as np

EPOCH_METRICS = ("train/*", "val/*", "lr", "time/*", "throughput/*")
# W&B's list of every installed package (requirements.txt) is most of an offline init's time (0.4 s of
# 0.45 here); the summary's "versions" names the packages a run depends on.
WANDB_SETTINGS = {"x_save_requirements": False}
REACH_TIMEOUT_S = 3.0  # how long `auto` waits for W&B's server before it logs offline


class MetricSink(Protocol):
    """Where the trainer and the run send what they measure; every row carries its training `step`."""

    def log_steps(self, rows: list[dict]) -> None: ...    # rows with "step", "epoch", "train/loss", "lr"
    def log_epoch(self, row: dict) -> None: ...           # a metrics.jsonl row
    def log_probe(self, row: dict) -> None: ...           # a probes.jsonl row
    def log_images(self, images: dict) -> None: ...       # name -> HxWx3 uint8, or float in [0, 1]
    def log_summary(self, summary: dict) -> None: ...     # the summary.json content


SINK_METHODS = ("log_steps", "log_epoch", "log_probe", "log_images", "log_summary")
# What a tracker's run summary holds besides the metrics.
SUMMARY_FIELDS = ("status", "identity", "objective", "epochs_done", "diverged_epoch", "error", "stop_reason",
                  "stopped_epoch", "best_epoch", "test_on", "tested_epoch", "cut_by_max_steps")


def wandb_credentials_configured(url: str) -> bool:
    """An API key in the environment or in the netrc file for the W&B host at `url`."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(url).hostname
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_unreachable(url: str, timeout: float = REACH_TIMEOUT_S) -> str | None:
    """Why W&B's server at `url` cannot be reached; None when it accepts a connection within `timeout`
    seconds, the name lookup included (in a thread: a lookup with no network has no timeout of its own)."""
    parsed = urlparse(url)
    address = (parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80))
    outcome: list[OSError | None] = []

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(err)

    thread = threading.Thread(target=connect, name="normbench-wandb-reach", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        return f"{url} did not answer within {timeout:g} s"
    return None if outcome[0] is None else f"{url} is not reachable ({outcome[0]})"


def wandb_mode(setting: str) -> str:
    """WANDB_MODE wins; otherwise `auto` means online only when credentials are configured and W&B's
    server answers within REACH_TIMEOUT_S (else offline, said in one line: a run never waits on the
    network)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if setting != "auto":
        return setting
    url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    if not wandb_credentials_configured(url):
        return "offline"
    problem = wandb_unreachable(url)
    if problem is not None:
        print(f"normbench: warning: W&B credentials are configured but {problem}: logging offline "
              "(`wandb sync` uploads the run later)", file=sys.stderr, flush=True)
        return "offline"
    return "online"


class TrackerSink:
    """A tracker's MetricSink (W&B, TensorBoard): each row is one `_log(data, step)` of the subclass at its
    training step, in step order (a probe row waits until the step rows reach its step), step rows as
    step/loss and step/lr; `first_step`: the steps before it are the tracker's already (not sent again)."""

    def __init__(self, first_step: int = 0):
        self.first_step, self.last_step = first_step, 0
        self._probes: list[dict] = []  # logged with the step rows they belong to (those come later)

    def _send(self, data: dict, step: int) -> None:
        if step >= self.first_step:
            self._log(data, step)
            self.last_step = max(self.last_step, step)

    def _flush_probes(self, upto: float) -> None:
        while self._probes and self._probes[0]["step"] <= upto:
            row = self._probes.pop(0)
            self._send({k: v for k, v in row.items() if k != "epoch"}, row["step"])

    def log_steps(self, rows: list[dict]) -> None:
        for row in rows:
            self._flush_probes(row["step"])
            step = row["step"]
            self._send({"step": step, "step/loss": row["train/loss"], "step/lr": row["lr"]}, step)

    def log_epoch(self, row: dict) -> None:
        self._flush_probes(row["step"])
        self._send(dict(row), row["step"])

    def log_probe(self, row: dict) -> None:
        self._probes.append(row)

    def log_images(self, images: dict) -> None:
        self._flush_probes(float("inf"))
        self._send(images, max(self.last_step, self.first_step))


class WandbSink(TrackerSink):
    """One W&B run per run record. Epoch metrics use `epoch` as x-axis, per-step ones `step`; every row
    is logged at its training step (W&B's `_step`), so that a resumed run can send its record again
    and W&B keeps each step once: rows before the step W&B resumed at are not sent.

    `run_id`: continue that W&B run (`resume="allow"`) instead of starting a new one. `run_dir`: where
    W&B keeps its files (None: W&B's own choice, i.e. `WANDB_DIR`)."""

    def __init__(self, *, project: str, entity: str | None, group: str, name: str, tags: list[str],
                 config: dict, run_dir: Path | None, mode: str, run_id: str | None = None):
        import wandb

        self._wandb = wandb
        self.run = wandb.init(project=project, entity=entity, group=group, name=name, tags=tags,
                              config=config, dir=str(run_dir) if run_dir is not None else None, mode=mode,
                              reinit="create_new", job_type="train", id=run_id,
                              resume="allow" if run_id else None, settings=wandb.Settings(**WANDB_SETTINGS))
        # online, a resumed run holds the steps before this one; offline each attempt is its own file
        super().__init__(first_step=self.run.starting_step)
        self.run_id: str = self.run.id
        self.url: str | None = None if self.run.offline else self.run.url
        self.files_dir = Path(self.run.dir).parent  # the run's local dir (offline: offline-run-<time>-<id>)
        axes = {"step": None, "epoch": None, "step/*": "step", "probe/*": "step",
                **dict.fromkeys(EPOCH_METRICS, "epoch")}
        for pattern, axis in axes.items():
            self.run.define_metric(pattern, step_metric=axis)

    def _log(self, data: dict, step: int) -> None:
        self.run.log({k: self._wandb.Image(v) if isinstance(v, np.ndarray) else v for k, v in data.items()},
                     step=step)

    def replay(self, steps: list[dict], epochs: list[dict], probes: list[dict]) -> None:
        """A resumed run's record so far (what its checkpoint covers), in step order: W&B keeps the
        steps it lacks (offline: all of them, so that the resumed attempt's file holds every epoch)."""
        self._probes.extend(probes)  # held back until the step rows reach their step, as in training
        rows = sorted([(row["step"], 0, row) for row in steps] + [(row["step"], 1, row) for row in epochs],
                      key=lambda item: item[:2])  # at one step: the step row, then the epoch row
        for _, is_epoch, row in rows:
            if is_epoch:
                self.log_epoch(row)
            else:
                self.log_steps([row])

    def log_summary(self, summary: dict) -> None:
        self.run.summary.update(summary.get("metrics", {}))
        for key in SUMMARY_FIELDS:
            value = summary.get(key)
            self.run.summary[key] = value.value if isinstance(value, Enum) else value  # not the Enum's name

    def log_model(self, path: Path, metadata: dict) -> None:
        """`path` (best.pt) as this run's model artifact, alias `best` (offline: kept for `wandb sync`)."""
        artifact = self._wandb.Artifact(f"model-{self.run_id}", type="model", metadata=metadata)
        artifact.add_file(str(path))
        self.run.log_artifact(artifact, aliases=["best"])

    def finish(self, failed: bool = False) -> None:
        self._flush_probes(float("inf"))
        self.run.finish(exit_code=1 if failed else 0)


class TensorBoardSink(TrackerSink):
    """Event files in the record dir (torch.utils.tensorboard) with W&B's names and steps, and at the end
    the final metrics with `hparams` (HParams dashboard). A resumed run purges the events a killed attempt
    wrote after the checkpoint it resumes from (TensorBoard drops them as it reads the files)."""

    def __init__(self, run_dir: Path, hparams: dict, resumed_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        super().__init__()
        purge = None if resumed_step is None else resumed_step + 1
        self.writer, self.hparams, self.tags = SummaryWriter(str(run_dir), purge_step=purge), hparams, set()

    def _log(self, data: dict, step: int) -> None:
        for key, value in data.items():
            if isinstance(value, np.ndarray):
                self.writer.add_image(key, value, step, dataformats="HWC")
            elif key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)
                self.tags.add(key)

    def log_epoch(self, row: dict) -> None:
        super().log_epoch(row)
        self.writer.flush()  # on disk before the epoch's checkpoint: a killed run resumes after them

    def log_summary(self, summary: dict) -> None:
        if summary.get("status") in (None, "running"):
            return
        from torch.utils.tensorboard.summary import hparams

        metrics = {k: v for k, v in summary.get("metrics", {}).items() if isinstance(v, (int, float))}
        for part in hparams(self.hparams, metrics):
            self.writer.file_writer.add_summary(part, self.last_step)
        self._send({k: v for k, v in metrics.items() if k not in self.tags}, self.last_step)

    def finish(self, failed: bool = False) -> None:
        self._flush_probes(float("inf"))
        self.writer.close()


def _to_every_sink(method: str):
    def send(self, *args) -> None:
        for sink in self.sinks:
            if hasattr(sink, method):  # a sink may take only some of it (the console: the epoch rows)
                getattr(sink, method)(*args)
    return send


class FanOut:
    """A MetricSink that passes each row on to every one of its sinks that takes it."""

    def __init__(self, *sinks: MetricSink | None):
        self.sinks = [s for s in sinks if s is not None]

    log_steps, log_epoch, log_probe, log_images, log_summary = map(_to_every_sink, SINK_METHODS)


class ConsoleSink:
    """One log line per epoch (Hydra sends it to the console and the job's .log file); nothing else."""

    def __init__(self, epochs: int):
        self.log = logging.getLogger("normbench")
        self.epochs = epochs

    def log_epoch(self, row: dict) -> None:
        self.log.info("epoch %d/%d  train/loss %.4f  train/acc %.4f  val/loss %.4f  val/acc %.4f  "
                      "%.0f img/s", row["epoch"], self.epochs, row["train/loss"], row["train/acc"],
                      row["val/loss"], row["val/acc"], row["throughput/img_s"])


def shown_path(path: Path | str) -> str:
    """A path relative to the current dir when it is below it (as the user typed the command)."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def final_line(summary: dict, run_dir: Path, wandb_sink: WandbSink | None) -> str:
    """The run's last console line: status, test accuracy, steps and images, the record dir, the W&B run."""
    status = str(summary["status"])  # a Status is its value as a str
    if summary.get("error_type"):
        status = f"{status} ({summary['error_type']})"
    metrics = summary.get("metrics", {})
    accuracy = f"{metrics['test/acc']:.4f}" if isinstance(metrics.get("test/acc"), (int, float)) else "-"
    if "train/steps" in metrics:  # the run's budget, once its training ended
        cut = " (cut by trainer.max_steps)" if summary.get("cut_by_max_steps") else ""
        accuracy += f"  steps {metrics['train/steps']}{cut}  images {metrics['train/images']}"
    if wandb_sink is None:
        tracked = "W&B off"
    elif wandb_sink.url:
        tracked = f"W&B {wandb_sink.url}"
    else:
        files = shown_path(wandb_sink.files_dir)
        tracked = f"W&B offline run {wandb_sink.run_id}: wandb sync {files}"
    return f"normbench: {status}  test/acc {accuracy}  record {shown_path(run_dir)}  {tracked}"
