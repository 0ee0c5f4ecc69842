"""SVHN through torchvision's own class (md5-checked ``.mat`` files directly in ``data.root``; labels 0-9)."""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

from normbench.datasets.cache import cached
from normbench.datasets.common import OFFLINE_HINT, Tensors, absolute, fetch, first_missing, short
from normbench.errors import DataNotFoundError


def svhn(root: str = "./data", download: bool = True, extra: bool = False, **_) -> Tensors:
    from torchvision.datasets import SVHN

    root_abs = absolute(root)
    splits = ("train", "extra", "test") if extra else ("train", "test")
    paths = {s: os.path.join(root_abs, SVHN.split_list[s][1]) for s in splits}
    fill = f"copy {', '.join(os.path.basename(p) for p in paths.values())} into {root_abs}; {OFFLINE_HINT}"

    def get() -> None:
        for split in splits:
            if not os.path.isfile(paths[split]):
                SVHN(root_abs, split=split, download=True)  # downloads and verifies the md5

    fetch("SVHN", root_abs, download, functools.partial(first_missing, paths.values(), root_abs), get, fill)

    def decode() -> Tensors:
        parts = {}
        for split in splits:
            try:
                ds = SVHN(root_abs, split=split, download=False)  # md5 check, then scipy.io.loadmat
            except (RuntimeError, OSError, ValueError, KeyError, TypeError) as err:
                raise DataNotFoundError(
                    f"SVHN in data.root={root_abs} is corrupted or incomplete ({short(err)}): delete "
                    f"{paths[split]} and rerun with data.download=true, or {fill}") from err
            parts[split] = (torch.from_numpy(np.ascontiguousarray(ds.data)),
                            torch.as_tensor(ds.labels, dtype=torch.int64))
        train = [parts[s] for s in splits if s != "test"]
        return (torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]), *parts["test"])

    return cached("svhn", root_abs, list(paths.values()), {"extra": bool(extra)}, decode)
