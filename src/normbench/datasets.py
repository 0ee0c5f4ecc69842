"""The built-in datasets: the `_target_`s of conf/data/*.yaml.

They follow the protocol a user's dataset follows (README, "Your own dataset"): a callable called with
every key of the data config as a keyword argument (so it takes ``**kwargs`` for the keys it does not
use) that returns four tensors: train images uint8 (N, C, H, W), train labels int64 (N,), test images,
test labels. Everything after that -- the validation hold-out, normalization, augmentation, the
on-device pipeline -- is the same for every dataset (normbench.data).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import tarfile
import urllib.error

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock

from normbench.errors import ConfigError, DataNotFoundError

Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
DOWNLOAD_SOCKET_TIMEOUT_S = 60.0


# --------------------------------------------------------------------------------------------------------
# CIFAR through torchvision's own classes (md5-checked, torchvision's download path)


def cifar10(root: str = "./data", download: bool = True, **_) -> Tensors:
    """CIFAR-10 from ``<root>/cifar-10-batches-py/`` (downloaded there when missing and allowed)."""
    from torchvision.datasets import CIFAR10

    return _torchvision_cifar(CIFAR10, "CIFAR-10", root, download)


def cifar100(root: str = "./data", download: bool = True, **_) -> Tensors:
    """CIFAR-100 (fine labels) from ``<root>/cifar-100-python/``."""
    from torchvision.datasets import CIFAR100

    return _torchvision_cifar(CIFAR100, "CIFAR-100", root, download)


def _short(err: BaseException, limit: int = 140) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ").strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _download_guard(root: str):
    """Serialise the downloads of parallel jobs sharing one data dir (a lock file there; none where the
    dir cannot hold one, e.g. read-only), and bound each socket operation so that a firewall that silently
    drops packets cannot hang a job."""
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_SOCKET_TIMEOUT_S)
    lock = None
    try:
        try:
            os.makedirs(root, exist_ok=True)
            lock = FileLock(os.path.join(root, ".normbench-download.lock"))
            lock.acquire()
        except OSError:  # read-only: no lock (a download there fails on its own)
            lock = None
        yield
    finally:
        if lock is not None:
            lock.release()
        socket.setdefaulttimeout(old_timeout)


def _missing_files(cls, folder: str) -> list[str]:
    files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    return [f for f in files if not os.path.isfile(os.path.join(folder, f))]


def _torchvision_cifar(cls, label: str, root, download: bool) -> Tensors:
    root_abs = os.path.abspath(os.path.expanduser(str(root)))
    base = cls.base_folder
    folder = os.path.join(root_abs, base)
    fill = f"copy {base}/ into {root_abs}; or use data=synthetic to train offline"
    if not download:
        missing = _missing_files(cls, folder)  # checked before anything else; no network
        if missing:
            raise DataNotFoundError(
                f"{label} not found in data.root={root_abs} ({base}/{missing[0]} is missing) and "
                f"data.download=false: rerun with data.download=true on a machine with network access, or {fill}"
            )
    else:
        try:
            with _download_guard(root_abs):  # checked under the lock: another job may be extracting
                if _missing_files(cls, folder):
                    cls(root_abs, train=True, download=True)  # downloads, extracts and verifies the md5s
        except (urllib.error.URLError, OSError, RuntimeError, tarfile.TarError, EOFError) as err:
            raise DataNotFoundError(
                f"{label} not found in data.root={root_abs} and it could not be downloaded ({_short(err)}): "
                f"run on a machine with network access with data.download=true, or {fill}"
            ) from err
    try:
        train = cls(root_abs, train=True, download=False)
        test = cls(root_abs, train=False, download=False)
    except (RuntimeError, OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError) as err:
        raise DataNotFoundError(
            f"{label} in data.root={root_abs} is corrupted or incomplete ({_short(err)}): delete {folder} and "
            f"rerun with data.download=true, or copy a good {base}/ there; or use data=synthetic"
        ) from err
    return (*_to_tensors(train), *_to_tensors(test))


def _to_tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    return images, torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)


# --------------------------------------------------------------------------------------------------------
# synthetic data (no files, no network)


def _integer(key: str, value, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo or (hi and value > hi):
        raise ConfigError(key, value, f"use an integer in [{lo}, {hi if hi else 'inf'}]")
    return int(value)


def synthetic(num_train: int = 10000, num_test: int = 2000, num_classes: int = 10, image_size: int = 32,
              channels: int = 3, generator_seed: int = 0, noise: float = 0.25, **_) -> Tensors:
    """CIFAR-shaped images of smooth class templates (see make_synthetic): the first `num_train` are
    the training split, the next `num_test` the test split."""
    num_train = _integer("data.num_train", num_train, 2)
    num_test = _integer("data.num_test", num_test, 1)
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise < 10:
        raise ConfigError("data.noise", noise, "use a float in [0, 10) (noise std, 1 = full range)")
    images, labels = make_synthetic(
        num_train + num_test, num_classes=_integer("data.num_classes", num_classes, 2, 255),
        image_size=_integer("data.image_size", image_size, 8), channels=_integer("data.channels", channels, 1),
        seed=_integer("data.generator_seed", generator_seed, 0), noise=float(noise))
    return images[:num_train], labels[:num_train], images[num_train:], labels[num_train:]


def make_synthetic(n: int, *, num_classes: int = 10, image_size: int = 32, channels: int = 3, seed: int = 0,
                   noise: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (n, channels, S, S) and balanced int64 labels, fully determined by ``seed``.

    Each class has a smooth random template (a 4x4 grid of random values per channel, bilinearly
    upsampled); a sample is its class template shifted by up to S/8 pixels on each axis, times a random
    contrast in [0.7, 1.3], plus Gaussian pixel noise of std ``noise`` (in units of the full 0..255 range).
    A small CNN separates the classes within a few dozen SGD steps. Generated on the CPU (same bytes on
    every machine).
    """
    g = torch.Generator().manual_seed(int(seed))
    s = int(image_size)
    m = max(1, s // 8)
    k = 2 * m + 1  # shifts per axis
    coarse = torch.rand(num_classes, channels, 4, 4, generator=g) * 0.8 + 0.1
    templates = F.interpolate(coarse, size=(s + 2 * m,) * 2, mode="bilinear", align_corners=False) - 0.5
    # every (class, shift) crop once: (num_classes * k * k, C*s*s), small; samples are rows of it
    bank = torch.stack([templates[:, :, dy : dy + s, dx : dx + s] for dy in range(k) for dx in range(k)], 1)
    bank = bank.reshape(num_classes * k * k, channels * s * s)

    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    shift = torch.randint(0, k * k, (n,), generator=g)
    contrast = torch.rand(n, 1, generator=g) * 0.6 + 0.7
    x = bank.index_select(0, labels * (k * k) + shift).mul_(contrast)
    if noise > 0:
        x.add_(torch.randn(x.shape, generator=g), alpha=float(noise))
    x.add_(0.5).mul_(255.0).round_().clamp_(0, 255)
    return x.to(torch.uint8).reshape(n, channels, s, s), labels.to(torch.int64)

