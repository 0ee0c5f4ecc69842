"""Small datasets in the real on-disk CIFAR format, for tests that read them through torchvision's own
CIFAR10/CIFAR100 classes (normbench.datasets)."""

from __future__ import annotations

import hashlib
import os
import pickle

import numpy as np


def write_fake_cifar(
    root, name: str = "cifar10", *, n_train: int = 100, n_test: int = 20, seed: int = 0
) -> dict[str, str]:
    """Write a small dataset in the real on-disk CIFAR python format under ``root``; returns {file: md5}.

    CIFAR-10: ``cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta``; CIFAR-100:
    ``cifar-100-python/train, test, meta``. Pickles hold str keys (what the original Python-2 pickles load
    as) with ``data`` an (n, 3072) uint8 array in CHW order. torchvision's classes verify the md5s of the
    original files, so a reader must be told these md5s (tests patch the class attributes with them).
    """
    rng = np.random.default_rng(seed)
    num_classes = 10 if name == "cifar10" else 100
    folder_name = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    folder = os.path.join(os.fspath(root), folder_name)
    os.makedirs(folder, exist_ok=True)
    md5s: dict[str, str] = {}

    def dump(fname: str, obj) -> None:
        path = os.path.join(folder, fname)
        with open(path, "wb") as fh:
            pickle.dump(obj, fh, protocol=2)
        with open(path, "rb") as fh:
            md5s[fname] = hashlib.md5(fh.read()).hexdigest()

    def batch(n: int, label: str) -> dict:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, num_classes, size=n).tolist()
        entry = {"batch_label": label, "data": data, "filenames": [f"img_{i}.png" for i in range(n)]}
        if name == "cifar10":
            entry["labels"] = labels
        else:
            entry["fine_labels"] = labels
            entry["coarse_labels"] = [lab // 5 for lab in labels]
        return entry

    if name == "cifar10":
        for i, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
            dump(f"data_batch_{i}", batch(len(part), f"training batch {i} of 5"))
        dump("test_batch", batch(n_test, "testing batch 1 of 1"))
        dump("batches.meta", {"label_names": [f"class_{i}" for i in range(10)], "num_vis": 3072})
    elif name == "cifar100":
        dump("train", batch(n_train, "training batch 1 of 1"))
        dump("test", batch(n_test, "testing batch 1 of 1"))
        dump(
            "meta",
            {
                "fine_label_names": [f"fine_{i}" for i in range(100)],
                "coarse_label_names": [f"coarse_{i}" for i in range(20)],
            },
        )
    else:
        raise ValueError(f"write_fake_cifar: name must be cifar10 or cifar100, got {name!r}")
    return md5s

