"""CIFAR-10 / CIFAR-100 through torchvision's own classes (md5-checked, torchvision's download path)."""

from __future__ import annotations

import functools
import os
import pickle

import numpy as np
import torch

from normbench.datasets.cache import cached
from normbench.datasets.common import OFFLINE_HINT, Tensors, absolute, fetch, first_missing, short
from normbench.errors import DataNotFoundError


def cifar10(root: str = "./data", download: bool = True, **_) -> Tensors:
    from torchvision.datasets import CIFAR10

    return _torchvision_cifar(CIFAR10, "CIFAR-10", root, download)


def cifar100(root: str = "./data", download: bool = True, **_) -> Tensors:
    from torchvision.datasets import CIFAR100

    return _torchvision_cifar(CIFAR100, "CIFAR-100", root, download)


def _torchvision_cifar(cls, label: str, root, download: bool) -> Tensors:
    root_abs, base = absolute(root), cls.base_folder
    folder = os.path.join(root_abs, base)
    names = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    sources = [os.path.join(folder, f) for f in names]
    fetch(label, root_abs, download, functools.partial(first_missing, sources, root_abs),
          lambda: cls(root_abs, train=True, download=True), f"copy {base}/ into {root_abs}; {OFFLINE_HINT}")

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
