"""What the built-in datasets share: the download, error text, the grayscale channel option."""

from __future__ import annotations

import contextlib
import os
import socket
import tarfile
import urllib.error
from collections.abc import Callable, Iterable

import torch
from filelock import FileLock

from normbench.errors import ConfigError, DataNotFoundError

Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
DOWNLOAD_SOCKET_TIMEOUT_S = 60.0
# What every "files are missing" line ends with: the ways to train offline, real data first.
SYNTHETIC_HINT = "or data=synthetic to train with no files at all (a smoke test: every run reaches 100%)"
OFFLINE_HINT = ("or train offline on the Fashion-MNIST files Debian ships (apt-get install "
                "dataset-fashion-mnist) with data=fashion_mnist, e.g. the quick BN-vs-plain comparison: "
                f"python bench/train.py -m +experiment=fmnist_quick seed=0,1,2; {SYNTHETIC_HINT}")


def absolute(root) -> str:
    return os.path.abspath(os.path.expanduser(str(root)))


def short(err: BaseException, limit: int = 140) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ").strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def download_guard(root: str):
    """Serialise the downloads of parallel jobs sharing one data dir (a lock file there; none where the
    dir cannot hold one, e.g. read-only), and bound each socket operation so that a firewall that silently
    drops packets cannot hang a job."""
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_SOCKET_TIMEOUT_S)
    try:
        with contextlib.ExitStack() as stack:
            with contextlib.suppress(OSError):  # read-only: no lock (a download there fails on its own)
                os.makedirs(root, exist_ok=True)
                stack.enter_context(FileLock(os.path.join(root, ".normbench-download.lock")))
            yield
    finally:
        socket.setdefaulttimeout(old_timeout)


def first_missing(paths: Iterable[str], root: str) -> str | None:
    return next((f"{os.path.relpath(p, root)} is missing" for p in paths if not os.path.isfile(p)), None)


def fetch(label: str, root: str, download: bool, missing: Callable[[], str | None], get: Callable[[], object],
          fill: str) -> None:
    """Returns when `missing()` finds every file (else it says what is missing), after `get()` downloaded
    them with data.download (torchvision's mirrors, md5-checked); otherwise one line naming the fixes."""
    absent = missing()
    if absent is not None and not download:
        raise DataNotFoundError(
            f"{label} not found in data.root={root} ({absent}) and data.download=false: rerun with "
            f"data.download=true on a machine with network access, or {fill}")
    if absent is not None:
        try:
            with download_guard(root):  # checked under the lock: another job may be extracting
                if missing() is not None:
                    get()
                if (absent := missing()) is not None:
                    raise RuntimeError(f"{absent} after the download")
        except (urllib.error.URLError, OSError, RuntimeError, tarfile.TarError, EOFError) as err:
            raise DataNotFoundError(
                f"{label} not found in data.root={root} and it could not be downloaded ({short(err)}): "
                f"run on a machine with network access with data.download=true, or {fill}") from err


def with_channels(tensors: Tensors, channels, native: int) -> Tensors:
    """A grayscale dataset as 1 channel, or as 3 equal ones (for models that expect RGB)."""
    allowed = (1, 3) if native == 1 else (native,)
    if isinstance(channels, bool) or channels not in allowed:
        raise ConfigError("data.channels", channels,
                          f"this dataset has {native} channel{'s' if native > 1 else ''}: use "
                          + " or ".join(map(str, allowed))
                          + (" (3 repeats the gray channel)" if native == 1 else ""))
    if channels == native:
        return tensors
    train_x, train_y, test_x, test_y = tensors
    return train_x.expand(-1, channels, -1, -1), train_y, test_x.expand(-1, channels, -1, -1), test_y
