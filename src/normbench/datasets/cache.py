"""The decoded-dataset cache: a dataset's four uint8/int64 tensors saved as one torch file, so that the
next run skips the decoding (gunzip, .mat parsing, md5 checks, thousands of PIL images).

The file lives in ``<data dir>/.normbench-cache/`` next to the source files, or, where that dir cannot be
written (a read-only system dir such as /usr/share/datasets), in the user's cache dir
(``$XDG_CACHE_HOME/normbench``, default ``~/.cache/normbench``). Its name holds a hash of the dataset, its
decoding parameters and every source file's path, size and modification time: a changed, added or
removed source file gives another name, so a stale cache is never read (and is deleted when the new one
is written). An unreadable cache file is decoded again and replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from normbench.datasets.common import Tensors
from normbench.record import atomic_write

CACHE_FORMAT = 1
CACHE_DIR_NAME = ".normbench-cache"
KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "normbench"


def _digest(obj, size: int) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:size]


def sources_key(sources: Iterable[str]) -> str:
    """A hash of every source file's path, size and modification time."""
    stats = []
    for path in sorted(sources):
        st = os.stat(path)
        stats.append((os.path.abspath(path), st.st_size, st.st_mtime_ns))
    return _digest(stats, 16)


def cache_dirs(data_dir: str) -> list[Path]:
    """Where a cache file may be: next to the data, then the user's cache dir."""
    return [Path(data_dir) / CACHE_DIR_NAME, user_cache_dir()]


def cached(name: str, data_dir: str, sources: Iterable[str], params: dict, decode: Callable[[], Tensors]) -> Tensors:
    """The dataset's tensors from its cache file when one matches the sources, else ``decode()``d and saved."""
    # <dataset>-<data dir and parameters>-<sources>.pt: a cache of older sources shares the prefix
    prefix = f"{name}-{_digest([CACHE_FORMAT, os.path.abspath(data_dir), params], 10)}-"
    filename = prefix + sources_key(sources) + ".pt"
    for folder in cache_dirs(data_dir):
        path = folder / filename
        if path.is_file():
            try:
                saved = torch.load(path, weights_only=True)
                return tuple(saved[k] for k in KEYS)
            except (RuntimeError, OSError, EOFError, KeyError, TypeError, ValueError, pickle.UnpicklingError):
                # truncated or foreign file: decode again and replace it
                path.unlink(missing_ok=True)
    tensors = tuple(t.contiguous() for t in decode())
    for folder in cache_dirs(data_dir):
        if _save(folder, filename, prefix, tensors):
            break
    return tensors


def _save(folder: Path, filename: str, prefix: str, tensors) -> bool:
    try:  # atomic: parallel jobs never read a half-written file
        with atomic_write(folder / filename, "wb") as handle:
            torch.save(dict(zip(KEYS, tensors)), handle)
    except OSError:  # a read-only data dir: the next place
        return False
    for stale in folder.glob(f"{prefix}*.pt"):  # caches of older versions of the sources
        if stale.name != filename:
            stale.unlink(missing_ok=True)
    return True
