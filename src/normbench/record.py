"""The run record: files in the job's output dir (format in docs/ARCHITECTURE.md)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

SUMMARY = "summary.json"
TERMINAL = ("completed", "diverged", "failed", "pruned")


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same dir + rename, so a killed job never leaves a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def read_summary(run_dir: Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / SUMMARY).read_text())
    except (OSError, ValueError):
        return None


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


JSONL = ("metrics", "steps", "probes")


class RecordSink:
    """MetricSink that appends JSON lines to the run dir and writes the summary atomically."""

    def __init__(self, run_dir: Path, append: bool = False):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not append:
            for name in JSONL:
                (self.run_dir / f"{name}.jsonl").write_text("")

    def truncate_to(self, step: int, history: list[dict]) -> None:
        """On resume: keep what the checkpoint covers, drop rows written after it."""
        for name in ("steps", "probes"):
            path = self.run_dir / f"{name}.jsonl"
            lines = path.read_text().splitlines() if path.exists() else []
            atomic_write_text(path, "".join(f"{line}\n" for line in lines if _step_of(line) <= step))
        atomic_write_text(self.run_dir / "metrics.jsonl",
                          "".join(json.dumps(row, default=_json_default) + "\n" for row in history))

    def _write(self, name: str, rows: list[dict]) -> None:
        # Opened per call (calls come at logging points only), so nothing stays open between them.
        with open(self.run_dir / f"{name}.jsonl", "a") as handle:
            handle.writelines(json.dumps(row, default=_json_default) + "\n" for row in rows)

    def log_steps(self, rows: list[dict]) -> None:
        self._write("steps", rows)

    def log_epoch(self, row: dict) -> None:
        self._write("metrics", [row])

    def log_probe(self, row: dict) -> None:
        self._write("probes", [row])

    def log_images(self, images: dict) -> None:
        from PIL import Image  # not matplotlib: its import costs ~0.5 s per job

        for name, image in images.items():
            array = np.asarray(image)
            if array.dtype != np.uint8:  # float in [0, 1]
                array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
            Image.fromarray(array).save(self.run_dir / f"{name.split('/')[-1]}.png")

    def log_summary(self, summary: dict) -> None:
        atomic_write_json(self.run_dir / SUMMARY, summary)
