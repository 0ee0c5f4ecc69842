"""Metric sinks: what a sink takes (MetricSink), the W&B run, the console and a fan-out to several sinks."""

from __future__ import annotations

import netrc
import os
import socket
import sys
import threading
from enum import Enum
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

EPOCH_METRICS = ("train/*", "val/*", "lr", "time/*", "throughput/*")
REACH_TIMEOUT_S = 3.0  # how long `auto` waits for W&B's server before it logs offline


def wandb_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


class MetricSink(Protocol):
    """Where the trainer and the run send what they measure; every row carries its training `step`."""

    def log_steps(self, rows: list[dict]) -> None: ...    # rows with "step", "epoch", "train/loss", "lr"
    def log_epoch(self, row: dict) -> None: ...           # a metrics.jsonl row
    def log_probe(self, row: dict) -> None: ...           # a probes.jsonl row
    def log_images(self, images: dict) -> None: ...       # name -> HxWx3 uint8, or float in [0, 1]
    def log_summary(self, summary: dict) -> None: ...     # the summary.json content


SINK_METHODS = ("log_steps", "log_epoch", "log_probe", "log_images", "log_summary")


class NullSink:
    """A MetricSink that keeps nothing: the base of sinks that take only some of it."""

    def _ignore(self, *args) -> None:
        pass

    log_steps = log_epoch = log_probe = log_images = log_summary = _ignore


def wandb_credentials_configured() -> bool:
    """An API key in the environment or in the netrc file for the W&B host."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(wandb_url()).hostname
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
    if not wandb_credentials_configured():
        return "offline"
    problem = wandb_unreachable(wandb_url())
    if problem is not None:
        print(f"normbench: warning: W&B credentials are configured but {problem}: logging offline "
              "(`wandb sync` uploads the run later)", file=sys.stderr, flush=True)
        return "offline"
    return "online"


class WandbSink:
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
                              resume="allow" if run_id else None)
        # online, a resumed run holds the steps before this one; offline each attempt is its own file
        self.first_step = self.run.starting_step
        self.run_id: str = self.run.id
        self.url: str | None = None if self.run.offline else self.run.url
        self.files_dir = Path(self.run.dir).parent  # the run's local dir (offline: offline-run-<time>-<id>)
        self.last_step = 0
        self._probes: list[dict] = []  # logged with the step rows they belong to (those come later)
        axes = {"step": None, "epoch": None, "step/*": "step", "probe/*": "step",
                **dict.fromkeys(EPOCH_METRICS, "epoch")}
        for pattern, axis in axes.items():
            self.run.define_metric(pattern, step_metric=axis)

    def _log(self, data: dict, step: int) -> None:
        if step < self.first_step:  # W&B holds this step already (and would drop it, with a warning)
            return
        self.run.log(data, step=step)
        self.last_step = max(self.last_step, step)

    def _flush_probes(self, upto: float) -> None:
        while self._probes and self._probes[0]["step"] <= upto:
            row = self._probes.pop(0)
            self._log({k: v for k, v in row.items() if k != "epoch"}, row["step"])

    def log_steps(self, rows: list[dict]) -> None:
        for row in rows:
            self._flush_probes(row["step"])
            step = row["step"]
            self._log({"step": step, "step/loss": row["train/loss"], "step/lr": row["lr"]}, step)

    def log_epoch(self, row: dict) -> None:
        self._flush_probes(row["step"])
        self._log(dict(row), row["step"])

    def log_probe(self, row: dict) -> None:
        self._probes.append(row)

    def log_images(self, images: dict) -> None:
        self._flush_probes(float("inf"))
        self._log({name: self._wandb.Image(image) for name, image in images.items()},
                  max(self.last_step, self.first_step))

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
        for key in ("status", "identity", "objective", "epochs_done", "diverged_epoch", "error",
                    "cut_by_max_steps"):
            value = summary.get(key)
            self.run.summary[key] = value.value if isinstance(value, Enum) else value  # not the Enum's name

    def finish(self, failed: bool = False) -> None:
        self._flush_probes(float("inf"))
        self.run.finish(exit_code=1 if failed else 0)


def _to_every_sink(method: str):
    def send(self, *args) -> None:
        for sink in self.sinks:
            getattr(sink, method)(*args)
    return send


class FanOut:
    """A MetricSink that passes each row on to every one of its sinks."""

    def __init__(self, *sinks: MetricSink | None):
        self.sinks = [s for s in sinks if s is not None]

    log_steps, log_epoch, log_probe, log_images, log_summary = map(_to_every_sink, SINK_METHODS)


class ConsoleSink(NullSink):
    """One log line per epoch (Hydra sends it to the console and the job's .log file); nothing else."""

    def __init__(self, epochs: int):
        import logging

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
    accuracy = metrics.get("test/acc")
    accuracy = f"{accuracy:.4f}" if isinstance(accuracy, (int, float)) else "-"
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
