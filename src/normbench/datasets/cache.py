"""The decoded-dataset cache: a dataset's four uint8/int64 tensors saved as one torch file, so that the
next run skips the decoding (gunzip, .mat parsing, md5 checks, thousands of PIL images).

The file lives next to the source files or, where that dir cannot be written (/usr/share/datasets), in
the user's cache dir. Its name hashes the dataset, its decoding parameters and every source file's path,
size and modification time, so a stale cache is never read; a hash of its tensors' bytes catches a
corrupted one. Each problem is said in one line, and the dataset decoded again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from normbench.datasets.common import Tensors, short
from normbench.errors import warn
from normbench.record import atomic_write

CACHE_FORMAT = 1
CACHE_DIR_NAME = ".normbench-cache"
KEYS = ("train_images", "train_labels", "test_images", "test_labels")
HASH_KEY = "sha256"


def user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "normbench"


def _digest(obj, size: int) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:size]


def sources_key(sources: Iterable[str]) -> str:
    """A hash of every source file's path, size and modification time."""
    return _digest([(os.path.abspath(path), (st := os.stat(path)).st_size, st.st_mtime_ns)
                    for path in sorted(sources)], 16)


def cache_dirs(data_dir: str) -> list[Path]:
    """Where a cache file may be: next to the data, then the user's cache dir."""
    return [Path(data_dir) / CACHE_DIR_NAME, user_cache_dir()]


class ReadFrom(tuple):
    """A dataset's four tensors and the folder its files were read from (the run records it)."""

    def __new__(cls, tensors, folder: str):
        loaded = super().__new__(cls, tensors)
        loaded.folder = os.path.abspath(folder)
        return loaded


def cached(name: str, data_dir: str, sources: Iterable[str], params: dict,
           decode: Callable[[], Tensors]) -> Tensors:
    """The dataset's tensors from its cache file when one matches the sources, else ``decode()``d, saved."""
    # <dataset>-<data dir and parameters>-<sources>.pt: a cache of older sources shares the prefix
    prefix = f"{name}-{_digest([CACHE_FORMAT, os.path.abspath(data_dir), params], 10)}-"
    filename = prefix + sources_key(sources) + ".pt"
    for folder in cache_dirs(data_dir):
        path = folder / filename
        if path.is_file():
            tensors = _load(path)
            if tensors is not None:
                return ReadFrom(tensors, data_dir)
    tensors = tuple(t.contiguous() for t in decode())
    for folder in cache_dirs(data_dir):
        if _save(folder, filename, prefix, tensors):
            break
    return ReadFrom(tensors, data_dir)


def content_hash(tensors) -> str:
    """sha256 of the tensors' dtypes, shapes and bytes (contiguous CPU tensors)."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.numpy().data if t.numel() else b"")
    return digest.hexdigest()


def _load(path: Path):
    """The tensors of a cache file whose content matches its hash; else None, said in one line, the file
    deleted (the caller decodes again and replaces it)."""
    try:
        saved = torch.load(path, weights_only=True)
        tensors = tuple(saved[k] for k in KEYS)
        problem = None if saved[HASH_KEY] == content_hash(tensors) else "its content does not match its hash"
    except (RuntimeError, OSError, EOFError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as err:
        problem = f"it cannot be read ({short(err, 100)})"
    if problem is None:
        return tensors
    warn(f"the data cache {path} is damaged: {problem}; decoding the dataset again")
    path.unlink(missing_ok=True)
    return None


def _save(folder: Path, filename: str, prefix: str, tensors) -> bool:
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK):  # a read-only data dir: the next place
        return False
    try:  # atomic: parallel jobs never read a half-written file, a failed write leaves no partial one
        with atomic_write(folder / filename, "wb") as handle:
            torch.save({**dict(zip(KEYS, tensors)), HASH_KEY: content_hash(tensors)}, handle)
    except (OSError, RuntimeError) as err:  # torch.save's RuntimeError on a full disk wraps the OSError
        cause = err.__context__ if isinstance(err.__context__, OSError) else err
        then = f"trying {user_cache_dir()}" if folder != user_cache_dir() else "the dataset is not cached"
        warn(f"cannot write the data cache {folder / filename} ({short(cause)}); its partial file is "
             f"removed, {then}")
        return False
    for stale in folder.glob(f"{prefix}*.pt"):  # caches of older versions of the sources
        if stale.name != filename:
            stale.unlink(missing_ok=True)
    return True
