"""Section ``data`` (docs/PERFORMANCE.md): ``BatchStream`` against torchvision's ``CIFAR10`` + transforms +
``DataLoader`` on the same images. Without real CIFAR-10, torchvision's own class holds generated images in
memory, so its real per-sample work is still timed."""

from __future__ import annotations

import contextlib
import functools
import os
import statistics
import time
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from normbench.data import BatchStream, Split, channel_stats
from normbench.device import synchronize
from normbench.perf.common import alternate


def _cifar10_dataset(root, n_images: int):
    """(torchvision CIFAR10 train set, source label): real data from ``root`` when it holds it, else
    `n_images` generated images in torchvision's own class (made without its file-reading ``__init__``)."""
    from torchvision.datasets import CIFAR10, VisionDataset

    if root is not None:
        with contextlib.suppress(RuntimeError):  # absent or corrupted: generated images instead
            ds = CIFAR10(os.path.abspath(os.path.expanduser(str(root))), train=True, download=False)
            ds.data, ds.targets = ds.data[:n_images], ds.targets[:n_images]
            return ds, "cifar10"
    rng = np.random.default_rng(0)
    ds = CIFAR10.__new__(CIFAR10)
    VisionDataset.__init__(ds, "in-memory")
    ds.train = True
    ds.data = rng.integers(0, 256, size=(n_images, 32, 32, 3), dtype=np.uint8)
    ds.targets = rng.integers(0, 10, size=n_images).tolist()
    return ds, "fake-cifar10"


def _endless(batches: Iterable, device: torch.device) -> Iterator:
    """`batches` epoch after epoch, moved to `device`."""
    while True:
        for x, y in batches:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _rate(batches: Iterator, seconds: float, device: torch.device) -> float:
    """Images/s drawing batches for about `seconds`."""
    synchronize(device)
    count, start = 0, time.perf_counter()
    while True:
        count += next(batches)[1].shape[0]
        if time.perf_counter() - start >= seconds:
            break
    synchronize(device)
    return count / (time.perf_counter() - start)


def compare_data_pipelines(device: torch.device | str = "cpu", batch_size: int = 128, n_images: int = 10_000,
                           seconds: float = 2.0, *, rounds: int = 3, num_workers: int = 2, root=None,
                           warmup_batches: int = 10, threads: int | None = 1) -> dict:
    """Median training images/s of both pipelines and their ratio (normbench / torchvision).

    ``threads``: torch threads of this process while measuring (restored after; None leaves it). One by
    default: the per-batch ops are small, on a busy CPU OpenMP's barriers can make them 20-50x slower, and
    each DataLoader worker runs with one torch thread too (the fair comparison)."""
    from torch.utils.data import DataLoader
    from torchvision import transforms

    device = torch.device(device)
    if n_images < batch_size:
        raise ValueError(f"n_images ({n_images}) must be at least batch_size ({batch_size})")
    ds, source = _cifar10_dataset(root, n_images)
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2)
    mean, std = channel_stats(images)  # both normalize alike
    ds.transform = transforms.Compose([transforms.RandomCrop(32, padding=4),
                                       transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                       transforms.Normalize(mean, std)])
    split = Split(images.contiguous().to(device), torch.as_tensor(ds.targets, dtype=torch.int64).to(device))
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=num_workers, drop_last=True,
                        persistent_workers=num_workers > 0, pin_memory=device.type == "cuda")
    pipelines = {"normbench": _endless(BatchStream(split, batch_size, mean, std, augment=True, crop_padding=4,
                                                   flip=True), device),
                 "torchvision": _endless(loader, device)}
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        for batches in pipelines.values():  # warm-up: worker start-up, allocator, first epoch permutation
            for _ in range(warmup_batches):
                next(batches)
        results = alternate({name: functools.partial(_rate, batches, seconds, device)
                             for name, batches in pipelines.items()}, rounds, warmup=0)
    finally:
        used_threads = torch.get_num_threads()
        torch.set_num_threads(old_threads)
        if loader._iterator is not None:  # the persistent workers
            loader._iterator._shutdown_workers()
    nb, tv = statistics.median(results["normbench"]), statistics.median(results["torchvision"])
    return {
        "normbench_img_s": nb, "torchvision_img_s": tv, "ratio": nb / tv, "device": str(device),
        "batch_size": batch_size, "n_images": len(ds.data), "num_workers": num_workers, "rounds": rounds,
        "seconds": seconds, "torch_threads": used_threads, "data": source,
        "normbench_rounds_img_s": results["normbench"], "torchvision_rounds_img_s": results["torchvision"],
    }


def bench_data(s, paths, device: torch.device, workdir) -> dict:
    """The ``data`` section of bench/perf.py (batch 128; real CIFAR-10 from $NORMBENCH_DATA when there)."""
    return compare_data_pipelines(device, batch_size=128, n_images=s.data_images, seconds=s.data_seconds,
                                  rounds=3 if s.quick else 5, num_workers=s.data_workers,
                                  root=os.environ.get("NORMBENCH_DATA"))
