"""Metric sinks: the W&B run and a fan-out to several sinks."""

from __future__ import annotations

import netrc
import os
from enum import Enum
from pathlib import Path
from urllib.parse import urlparse

EPOCH_METRICS = ("train/*", "val/*", "lr", "time/*", "throughput/*")


def wandb_credentials_configured() -> bool:
    """An API key in the environment or in the netrc file for the W&B host."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(setting: str) -> str:
    """WANDB_MODE wins; otherwise `auto` means online only when credentials are configured."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if setting == "auto":
        return "online" if wandb_credentials_configured() else "offline"
    return setting


class WandbSink:
    """One W&B run per training job. Epoch metrics use `epoch` as x-axis, per-step ones `step`."""

    def __init__(self, *, project: str, entity: str | None, group: str, name: str, tags: list[str],
                 config: dict, run_dir: Path, mode: str):
        import wandb

        self._wandb = wandb
        self.run = wandb.init(project=project, entity=entity, group=group, name=name, tags=tags,
                              config=config, dir=str(run_dir), mode=mode, reinit="create_new",
                              job_type="train")
        self.run.define_metric("step")
        self.run.define_metric("epoch")
        self.run.define_metric("step/*", step_metric="step")
        self.run.define_metric("probe/*", step_metric="step")
        for pattern in EPOCH_METRICS:
            self.run.define_metric(pattern, step_metric="epoch")

    def log_steps(self, rows: list[dict]) -> None:
        for row in rows:
            self.run.log({"step": row["step"], "step/loss": row["train/loss"], "step/lr": row["lr"]})

    def log_epoch(self, row: dict) -> None:
        self.run.log(dict(row))

    def log_probe(self, row: dict) -> None:
        self.run.log({k: v for k, v in row.items() if k != "epoch"})

    def log_images(self, images: dict) -> None:
        self.run.log({name: self._wandb.Image(image) for name, image in images.items()})

    def log_summary(self, summary: dict) -> None:
        for key, value in summary.get("metrics", {}).items():
            self.run.summary[key] = value
        for key in ("status", "identity", "objective", "epochs_done", "diverged_epoch", "error"):
            value = summary.get(key)
            self.run.summary[key] = value.value if isinstance(value, Enum) else value  # W&B stores an Enum's name

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class FanOut:
    """Sends every call to each sink."""

    def __init__(self, *sinks):
        self.sinks = [s for s in sinks if s is not None]

    def __getattr__(self, name):
        def call(*args, **kwargs):
            for sink in self.sinks:
                getattr(sink, name)(*args, **kwargs)
        return call


class ConsoleSink:
    """One log line per epoch (Hydra sends it to the console and the job's .log file)."""

    def __init__(self, epochs: int):
        import logging

        self.log = logging.getLogger("normbench")
        self.epochs = epochs

    def log_epoch(self, row: dict) -> None:
        self.log.info("epoch %d/%d  train/loss %.4f  train/acc %.4f  val/loss %.4f  val/acc %.4f  "
                      "%.0f img/s", row["epoch"], self.epochs, row["train/loss"], row["train/acc"],
                      row["val/loss"], row["val/acc"], row["throughput/img_s"])

    def log_summary(self, summary: dict) -> None:
        metrics = summary.get("metrics", {})
        self.log.info("%s: test/acc %s  val/best_acc %s  (%s)", summary["status"], metrics.get("test/acc"),
                      metrics.get("val/best_acc"), summary["identity"])

    def __getattr__(self, name):  # steps, probes, images: nothing to print
        return lambda *args, **kwargs: None
