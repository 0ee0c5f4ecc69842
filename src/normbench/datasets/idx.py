"""MNIST and Fashion-MNIST through torchvision's own classes and download path. The four idx files (``.gz``
or not) are looked up in torchvision's layout (``<root>/MNIST/raw/``, where it downloads), then in
``<root>`` itself, then for Fashion-MNIST where Debian's ``dataset-fashion-mnist`` installs them.
"""

from __future__ import annotations

import gzip
import os

import numpy as np
import torch

from normbench.datasets.cache import cached
from normbench.datasets.common import (
    OFFLINE_HINT,
    SYNTHETIC_HINT,
    Tensors,
    absolute,
    fetch,
    short,
    with_channels,
)
from normbench.errors import DataNotFoundError

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
         "t10k-labels-idx1-ubyte")
IDX_UINT8 = 0x08  # the idx type code of unsigned bytes


def mnist(root: str = "./data", download: bool = True, channels: int = 1, **_) -> Tensors:
    from torchvision.datasets import MNIST

    return with_channels(_mnist_like(MNIST, "MNIST", root, download, extra_dirs=()), channels, 1)


def fashion_mnist(root: str = "./data", download: bool = True, channels: int = 1, **_) -> Tensors:
    from torchvision.datasets import FashionMNIST

    tensors = _mnist_like(FashionMNIST, "Fashion-MNIST", root, download, extra_dirs=(DEBIAN_FASHION_MNIST,),
                          apt_hint="apt-get install dataset-fashion-mnist (Debian), ")
    return with_channels(tensors, channels, 1)


def find_idx_files(folder: str) -> list[str] | None:
    found = [next(filter(os.path.isfile, (os.path.join(folder, name + ext) for ext in ("", ".gz"))), None)
             for name in FILES]
    return None if None in found else found


def read_idx(path: str) -> torch.Tensor:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != IDX_UINT8 or not 1 <= data[3] <= 3:
        raise ValueError(f"{os.path.basename(path)} is not an idx file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)):
        raise ValueError(f"{os.path.basename(path)} holds {len(data) - offset} bytes, its header says "
                         f"{shape}")
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape).copy())


def _mnist_like(cls, label: str, root, download: bool, extra_dirs: tuple[str, ...],
                apt_hint: str = "") -> Tensors:
    root_abs = absolute(root)
    tv_dir = os.path.join(root_abs, cls.__name__, "raw")
    candidates = (tv_dir, root_abs, *extra_dirs)
    # Fashion-MNIST itself is the offline route
    offline = SYNTHETIC_HINT if apt_hint else OFFLINE_HINT
    fill = f"{apt_hint}copy the four files ({FILES[0]}[.gz], ...) into {root_abs} or {tv_dir}; {offline}"

    def found() -> list[str] | None:
        return next(filter(None, map(find_idx_files, candidates)), None)

    fetch(label, root_abs, download, lambda: None if found() else f"looked in {', '.join(candidates)}",
          lambda: cls(root_abs, train=True, download=True), fill)  # torchvision's mirrors, md5-checked
    files = found()
    folder = os.path.dirname(files[0])

    def decode() -> Tensors:
        try:
            train_x, train_y, test_x, test_y = (read_idx(f) for f in files)
            for images, labels in ((train_x, train_y), (test_x, test_y)):
                if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
                    raise ValueError(f"images of shape {tuple(images.shape)} and labels of shape "
                                     f"{tuple(labels.shape)} do not match")
        except (OSError, EOFError, ValueError, gzip.BadGzipFile) as err:
            raise DataNotFoundError(
                f"{label} in {folder} is corrupted or incomplete ({short(err)}): delete the files "
                f"there and rerun with data.download=true, or {fill}") from err
        return train_x[:, None], train_y.long(), test_x[:, None], test_y.long()

    return cached(cls.__name__.lower(), folder, files, {}, decode)
