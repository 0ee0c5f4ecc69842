"""The run record: the files in a run's dir and the vocabulary of its summary.json, for everything that
writes or reads a record (the format: docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import math
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import IO

import numpy as np

from normbench.errors import warn

# The user's umask, read once (reading it means setting it): a record's files get the permissions any file
# the user makes gets (team-mates sharing a sweep dir read them), not mkstemp's 0600.
UMASK = os.umask(0o022)
os.umask(UMASK)


class Status(str, Enum):
    """A run's status in its summary.json (a str, so it compares and serialises as one)."""

    RUNNING = "running"
    COMPLETED = "completed"
    DIVERGED = "diverged"
    FAILED = "failed"
    PRUNED = "pruned"
    INTERRUPTED = "interrupted"   # stopped by SIGTERM or Ctrl-C; a re-run continues it from its checkpoint

    __str__ = str.__str__
    __format__ = str.__format__


# What a re-run skips: the same identity gives the same numbers (a divergence included).
DONE = (Status.COMPLETED, Status.DIVERGED)

# The files of a run dir.
SUMMARY = "summary.json"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
METRICS_CSV = "metrics.csv"  # metrics.jsonl as a table, for spreadsheets
STEPS = "steps.jsonl"
PROBES = "probes.jsonl"
FILTERS = "filters.png"
REJECTED = "rejected.json"  # a sweep job that failed before its run started (docs/ARCHITECTURE.md)
SKIPPED_POINTER = "skipped.json"  # a skipped sweep job's pointer to its run's record
CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"  # the weights of the best validation epoch
JSONL = (METRICS, STEPS, PROBES)
RECORD_FILES = frozenset({SUMMARY, CONFIG, METRICS, STEPS, PROBES, FILTERS, REJECTED})
# Bounds of every reader of a sweep dir: a file's size, and how deep below a root run dirs are looked for.
MAX_FILE_BYTES = 256 << 20
MAX_DIR_DEPTH = 32
# a directory holding one of these is a run dir (its subdirectories are not searched)
RUN_MARKERS = (SUMMARY, CONFIG, METRICS, REJECTED)

# summary.json keys every record has, with their types.
SUMMARY_KEYS: dict[str, type] = {
    "status": str, "identity": str, "experiment": str, "choices": dict, "overrides": list, "metrics": dict,
}
# Not required: the report derives the seedless identity from config.yaml where a summary lacks it.
SEEDLESS_IDENTITY = "seedless_identity"
# The W&B run of this record, written when it opens so that a resumed run continues it.
WANDB_RUN_ID = "wandb_run_id"
WANDB_URL = "wandb_url"
WANDB_FILES = "wandb_dir"
# Metrics every completed run reports (a value may be null where it could not be measured).
FINAL_METRICS = (
    "test/loss", "test/acc", "val/best_acc", "val/acc", "val/loss", "train/loss", "train/acc",
    "convergence/epoch", "model/params", "memory/peak_mb", "time/total_s", "throughput/img_s",
)
REQUIRED_COMPLETED_METRICS = ("test/acc", "val/best_acc")
LEARN_MARGIN = 0.05  # accuracy points above chance a run must reach to count as having learned


def learned_threshold(num_classes: int, num_images: int = 0, margin: float = LEARN_MARGIN) -> float:
    """Chance plus `margin`, or plus three binomial standard deviations of a chance-level classifier on
    `num_images` images if that is more (a small validation split reaches chance + 5 points by luck)."""
    chance = 1.0 / max(int(num_classes), 1)
    noise = 3.0 * math.sqrt(chance * (1.0 - chance) / num_images) if num_images > 0 else 0.0
    return chance + max(margin, noise)


def now_iso() -> str:
    """A record's timestamps: UTC, ISO 8601, seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class MalformedRecord(ValueError):
    pass


def validate_summary(summary) -> None:
    """Raise MalformedRecord naming what does not follow the summary.json format."""
    if not isinstance(summary, dict):
        raise MalformedRecord(f"summary.json is a JSON {type(summary).__name__}, not an object")
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    if missing:
        raise MalformedRecord(f"summary.json misses key(s) {', '.join(missing)}")
    for key, kind in SUMMARY_KEYS.items():
        if not isinstance(summary[key], kind):
            raise MalformedRecord(f"summary.json {key!r} is {type(summary[key]).__name__}, "
                                  f"expected {kind.__name__}")
    statuses = [s.value for s in Status]
    if summary["status"] not in statuses:
        raise MalformedRecord(f"summary.json status {summary['status']!r} is not one of "
                              f"{', '.join(statuses)}")
    if not summary["identity"]:
        raise MalformedRecord("summary.json identity is empty")
    if not all(isinstance(o, str) for o in summary["overrides"]):
        raise MalformedRecord("summary.json overrides must be a list of strings")
    for key, value in summary["choices"].items():
        if not isinstance(value, (str, int, float, bool)) and value is not None:
            raise MalformedRecord(f"summary.json choices[{key!r}] is {type(value).__name__}")
    for key, value in summary["metrics"].items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise MalformedRecord(f"summary.json metrics[{key!r}] is {type(value).__name__}, not a number")
        if "acc" in key.rsplit("/", 1)[-1] and value is not None and math.isfinite(value) \
                and not 0 <= value <= 1:
            raise MalformedRecord(f"summary.json metrics[{key!r}] is {value}, not an accuracy in [0, 1]")
    if summary["status"] == Status.COMPLETED:
        missing = [k for k in FINAL_METRICS if k not in summary["metrics"]]
        if missing:
            raise MalformedRecord(f"completed run's metrics miss {', '.join(missing)}")
        nulls = [k for k in REQUIRED_COMPLETED_METRICS if summary["metrics"][k] is None]
        if nulls:
            raise MalformedRecord(f"completed run has null {', '.join(nulls)}")


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """A handle on a temp file in `path`'s dir that replaces `path` whole (fsync, rename) when the block
    ends, so that a killed writer never leaves a half file; the temp file goes when the block fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~UMASK)
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_write(path) as handle:
        handle.write(text)


def atomic_write_json(path: str | Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def remove_temp_files(run_dir: Path) -> list[str]:
    """The temp files a killed writer left in a run dir (`.<name>.tmp`, `.<name>.<random>.tmp`):
    removed before a job writes there again, so a kill never leaves a half-written file taking space."""
    removed = []
    for path in Path(run_dir).glob(".*.tmp"):
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path.name)
    return removed


def set_aside(path: Path, kind: str, reason: str, then: str = "the run starts from scratch") -> None:
    """Keep the file under a name no run reads (`<name>.<kind>-<UTC time>`), with one warning line."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target, n = path.with_name(f"{path.name}.{kind}-{stamp}"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{kind}-{stamp}.{n}")
    path.replace(target)
    warn(f"{path} {reason}; kept as {target.name}, {then}")


def set_aside_damaged_summary(run_dir: Path) -> None:
    """A summary.json a run is about to replace that cannot be read (damaged by hand, by a disk): kept."""
    try:
        if not (run_dir / SUMMARY).exists() or isinstance(load_json(run_dir / SUMMARY), dict):
            return
        reason = "is no JSON object"
    except (OSError, ValueError) as err:
        reason = f"cannot be read ({getattr(err, 'strerror', None) or err})"
    set_aside(run_dir / SUMMARY, "damaged", reason, then="this run's record is written anew")


def write_rejected(run_dir: Path, *, error: str, error_type: str, overrides: list[str]) -> None:
    atomic_write_json(Path(run_dir) / REJECTED, {"status": "failed", "error": error, "error_type": error_type,
                                                 "overrides": list(overrides), "at": now_iso()})


def write_skipped_pointer(job_dir: Path, *, identity: str, record: Path, status: str) -> None:
    atomic_write_json(Path(job_dir) / SKIPPED_POINTER, {"identity": identity, "record": str(record),
                                                       "status": status, "at": now_iso()})


def record_dir(job_dir: Path) -> Path:
    """The job dir itself, or the dir its skipped.json points at."""
    record = (read_json(Path(job_dir) / SKIPPED_POINTER) or {}).get("record")
    return Path(record) if isinstance(record, str) else Path(job_dir)


def read_bytes(path: str | Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """A record's or the index's file: only a regular file of at most `limit` bytes, opened without
    blocking (a FIFO named summary.json never hangs the reader) and checked once open (a symlink to
    /dev/zero is a device); anything else is an OSError naming the path."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
        if info.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", os.fspath(path))
        with open(fd, "rb", closefd=False) as handle:
            return handle.read(limit)
    finally:
        os.close(fd)


def load_json(path: str | Path):
    """The JSON value of a record's or the index's file (read_bytes's bounds); OSError or ValueError (a
    nesting too deep for the parser included) saying what is wrong."""
    try:
        return json.loads(read_bytes(path))
    except RecursionError as err:
        raise ValueError("nested too deeply") from err


def read_json(path: str | Path) -> dict | None:
    """A JSON object file of a record or of the sweep index; None when it is missing, torn or no object."""
    try:
        data = load_json(path)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_config(run_dir: str | Path) -> dict:
    """A record's config.yaml ({} when it holds no mapping); OSError or ValueError when it cannot be read,
    is no YAML, nests too deeply or has aliases (normbench writes none; an alias bomb has no bound)."""
    import yaml

    data, loader = read_bytes(Path(run_dir) / CONFIG), getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(data, Loader=loader)):
            raise ValueError("it has YAML aliases (*name)")
        config = yaml.load(data, Loader=loader)
    except (yaml.YAMLError, RecursionError) as err:
        raise ValueError(" ".join(str(err).split())) from err
    return config if isinstance(config, dict) else {}


def read_summary(run_dir: str | Path) -> dict | None:
    return read_json(Path(run_dir) / SUMMARY)


def read_jsonl(path: str | Path) -> tuple[list[dict], int]:
    """A JSON-lines file's rows and how many lines were no JSON object; a missing file is ([], 1)."""
    try:
        data = read_bytes(path)
    except OSError:
        return [], 1
    parsed = [_json_object(line) for line in data.splitlines() if line.strip()]
    rows = [row for row in parsed if row is not None]
    return rows, len(parsed) - len(rows)


def _json_object(text: bytes) -> dict | None:
    try:
        row = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return row if isinstance(row, dict) else None


def read_rows(path: str | Path) -> list[dict]:
    return read_jsonl(path)[0]


def _step(row: dict) -> float:
    step = row.get("step")
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else math.inf


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, default=_json_default) + "\n" for row in rows)


def run_dirs(root: str | Path) -> Iterator[tuple[str, frozenset[str]]]:
    """The dirs under `root` (itself included) that hold a run record, in name order, with its record files;
    not entered: hidden dirs, wandb/, a run dir's subdirs and dirs deeper than MAX_DIR_DEPTH."""
    stack = [(os.fspath(root), 0)]
    while stack:
        path, depth = stack.pop()
        names, subdirs = set(), []
        try:
            with os.scandir(path) as entries:
                for entry in entries:
                    if entry.name in RECORD_FILES:
                        names.add(entry.name)
                    elif not entry.name.startswith(".") and entry.name != "wandb" \
                            and entry.is_dir(follow_symlinks=False):
                        subdirs.append(entry.path)
        except OSError:
            continue
        if any(m in names for m in RUN_MARKERS):
            yield path, frozenset(names)
        elif depth < MAX_DIR_DEPTH:
            stack.extend((subdir, depth + 1) for subdir in sorted(subdirs, reverse=True))


class RecordSink:
    """MetricSink that appends JSON lines to the run dir and writes the summary atomically; metrics.csv is
    metrics.jsonl again, rewritten whole (atomically) at each epoch: its columns are every row's keys."""

    def __init__(self, run_dir: Path, append: bool = False):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.epochs: list[dict] = []
        if not append:
            for name in JSONL:
                (self.run_dir / name).write_text("")

    def truncate_to(self, step: int, history: list[dict]) -> None:
        """On resume: keep what the checkpoint covers, drop rows written after it."""
        for name in (STEPS, PROBES):
            rows = read_rows(self.run_dir / name)
            atomic_write_text(self.run_dir / name, _jsonl([row for row in rows if _step(row) <= step]))
        atomic_write_text(self.run_dir / METRICS, _jsonl(history))
        self.epochs = list(history)
        self._write_csv()

    def _write_csv(self) -> None:
        columns = list(dict.fromkeys(key for row in self.epochs for key in row))
        with atomic_write(self.run_dir / METRICS_CSV) as handle:
            writer = csv.DictWriter(handle, columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.epochs)

    def _write(self, name: str, rows: list[dict]) -> None:
        # Opened per call (calls come at logging points only), so nothing stays open between them.
        with open(self.run_dir / name, "a") as handle:
            handle.write(_jsonl(rows))

    def log_steps(self, rows: list[dict]) -> None:
        self._write(STEPS, rows)

    def log_epoch(self, row: dict) -> None:
        self._write(METRICS, [row])
        self.epochs.append(row)
        self._write_csv()

    def log_probe(self, row: dict) -> None:
        self._write(PROBES, [row])

    def log_images(self, images: dict) -> None:
        from PIL import Image  # not matplotlib: its import costs ~0.5 s per job

        for name, image in images.items():
            array = np.asarray(image)
            if array.dtype != np.uint8:  # float in [0, 1]
                array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
            Image.fromarray(array).save(self.run_dir / f"{name.split('/')[-1]}.png")

    def log_summary(self, summary: dict) -> None:
        atomic_write_json(self.run_dir / SUMMARY, summary)
