"""Small datasets in torchvision's on-disk formats (MNIST idx files, SVHN .mat files) and ImageFolder
trees, for tests that read them through normbench.datasets and torchvision's own classes."""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")


def idx_bytes(array: np.ndarray) -> bytes:
    """The idx format of unsigned bytes: magic 0x0000 08 <ndim>, big-endian dims, the bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_fake_mnist(folder, *, n_train: int = 120, n_test: int = 30, gz: bool = False, seed: int = 0,
                     images: tuple[np.ndarray, ...] | None = None) -> dict[str, np.ndarray]:
    """The four idx files (28x28 images, labels 0-9) in ``folder`` -- e.g. ``<root>/MNIST/raw`` (torchvision's
    layout) or a flat folder like Debian's; ``.gz`` with ``gz``. Returns the arrays written."""
    rng = np.random.default_rng(seed)
    if images is None:
        images = (rng.integers(0, 256, (n_train, 28, 28)), rng.integers(0, 10, n_train),
                  rng.integers(0, 256, (n_test, 28, 28)), rng.integers(0, 10, n_test))
    os.makedirs(folder, exist_ok=True)
    arrays = {}
    for name, array in zip(IDX_FILES, images):
        data = idx_bytes(array)
        path = Path(folder) / (name + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(data) if gz else data)
        arrays[name] = np.asarray(array, dtype=np.uint8)
    return arrays


def write_fake_svhn(root, splits=("train", "test"), *, n: int = 80, seed: int = 0) -> dict[str, tuple]:
    """``<split>_32x32.mat`` in ``root`` as SVHN stores them (X: 32x32x3xN uint8, y: Nx1 with 10 for the
    digit 0); returns {split: (md5, images (N, 3, 32, 32), labels 0-9)}. torchvision checks the md5s of the
    original files: tests patch ``SVHN.split_list`` with these."""
    import scipy.io

    rng = np.random.default_rng(seed)
    out = {}
    for split in splits:
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
        path = os.path.join(root, f"{split}_32x32.mat")
        os.makedirs(root, exist_ok=True)
        scipy.io.savemat(path, {"X": x, "y": y})
        with open(path, "rb") as fh:
            md5 = hashlib.md5(fh.read()).hexdigest()
        labels = y[:, 0].astype(np.int64)
        labels[labels == 10] = 0
        out[split] = (md5, np.transpose(x, (3, 2, 0, 1)), labels)
    return out


def write_image_folder(root, split: str, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
    """PNG files ``<root>/<split>/<class>/<i>.png`` of uint8 images (N, H, W) or (N, H, W, 3)."""
    from PIL import Image

    for i, (image, label) in enumerate(zip(images, labels)):
        folder = Path(root) / split / classes[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(folder / f"{i:05d}.png")
