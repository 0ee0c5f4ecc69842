"""CIFAR-10 / CIFAR-100 through torchvision's own classes (md5-checked, torchvision's download path)."""

from __future__ import annotations

import os
import pickle
import tarfile
import urllib.error

import numpy as np
import torch

from normbench.datasets.cache import cached
from normbench.datasets.common import OFFLINE_HINT, Tensors, absolute, download_guard, short
from normbench.errors import DataNotFoundError


def cifar10(root: str = "./data", download: bool = True, **_) -> Tensors:
    from torchvision.datasets import CIFAR10

    return _torchvision_cifar(CIFAR10, "CIFAR-10", root, download)


def cifar100(root: str = "./data", download: bool = True, **_) -> Tensors:
    from torchvision.datasets import CIFAR100

    return _torchvision_cifar(CIFAR100, "CIFAR-100", root, download)


def _files(cls) -> list[str]:
    return [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]


def _missing_files(cls, folder: str) -> list[str]:
    return [f for f in _files(cls) if not os.path.isfile(os.path.join(folder, f))]


def _torchvision_cifar(cls, label: str, root, download: bool) -> Tensors:
    root_abs = absolute(root)
    base = cls.base_folder
    folder = os.path.join(root_abs, base)
    fill = f"copy {base}/ into {root_abs}; {OFFLINE_HINT}"
    if not download:
        missing = _missing_files(cls, folder)  # checked before anything else; no network
        if missing:
            raise DataNotFoundError(
                f"{label} not found in data.root={root_abs} ({base}/{missing[0]} is missing) and "
                f"data.download=false: rerun with data.download=true on a machine with network access, or "
                f"{fill}")
    else:
        try:
            with download_guard(root_abs):  # checked under the lock: another job may be extracting
                if _missing_files(cls, folder):
                    cls(root_abs, train=True, download=True)  # downloads, extracts and verifies the md5s
        except (urllib.error.URLError, OSError, RuntimeError, tarfile.TarError, EOFError) as err:
            raise DataNotFoundError(
                f"{label} not found in data.root={root_abs} and it could not be downloaded ({short(err)}): "
                f"run on a machine with network access with data.download=true, or {fill}") from err
    sources = [os.path.join(folder, f) for f in _files(cls)]

    def decode() -> Tensors:
        try:
            train = cls(root_abs, train=True, download=False)
            test = cls(root_abs, train=False, download=False)
        except (RuntimeError, OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError) as err:
            raise DataNotFoundError(
                f"{label} in data.root={root_abs} is corrupted or incomplete ({short(err)}): delete {folder} "
                f"and rerun with data.download=true, or copy a good {base}/ there; {OFFLINE_HINT}") from err
        return (*_to_tensors(train), *_to_tensors(test))

    return cached(cls.__name__.lower(), folder, sources, {}, decode)


def _to_tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    return images, torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)


