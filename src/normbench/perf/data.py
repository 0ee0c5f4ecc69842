"""Section ``data``, training-data throughput: normbench's on-device pipeline vs the usual torchvision
DataLoader pipeline.

``compare_data_pipelines`` measures steady-state training images per second of

* normbench: ``BatchStream`` over a uint8 dataset already on the device (random crop + flip + normalize,
  a fresh device-side permutation per epoch), and
* torchvision: ``datasets.CIFAR10`` + ``Compose([RandomCrop(32, padding=4), RandomHorizontalFlip(),
  ToTensor(), Normalize(mean, std)])`` + ``DataLoader(shuffle=True, num_workers=...)``, batches moved to
  the device,

on the same images, alternating the two in one process (warm-up first, then ``rounds`` timed windows of
``seconds`` each, median). Real CIFAR-10 is used when ``root`` holds it; otherwise torchvision's own
``CIFAR10`` class holds generated uint8 images in memory (no files: the instance is made without its
file-reading ``__init__``), so torchvision's real ``__getitem__`` + transforms + DataLoader do the
per-sample work they would do on the real data.

CLI: ``python -m normbench.perf.data --device cpu --seconds 2``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Iterator

import numpy as np
import torch

from normbench.data import BatchStream, Split, channel_stats

__all__ = ["bench_data", "compare_data_pipelines", "in_memory_cifar10"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _transform(mean, std):
    from torchvision import transforms

    return transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(), transforms.Normalize(mean, std)])


def in_memory_cifar10(n_images: int, transform=None, seed: int = 0):
    """A torchvision ``CIFAR10`` (train split) holding `n_images` generated uint8 images in memory.

    Made with ``CIFAR10.__new__`` + ``VisionDataset.__init__`` (no files read or written), then given
    ``.data`` (N, 32, 32, 3 uint8) and ``.targets``: everything else is torchvision's own class."""
    from torchvision.datasets import CIFAR10, VisionDataset

    rng = np.random.default_rng(seed)
    ds = CIFAR10.__new__(CIFAR10)
    VisionDataset.__init__(ds, "in-memory", transform=transform)
    ds.train = True
    ds.data = rng.integers(0, 256, size=(n_images, 32, 32, 3), dtype=np.uint8)
    ds.targets = rng.integers(0, 10, size=n_images).tolist()
    return ds


def _cifar10_dataset(root, n_images: int, transform):
    """(torchvision CIFAR10 train dataset, source label); real data from ``root`` when present."""
    from torchvision.datasets import CIFAR10

    if root is not None:
        try:
            ds = CIFAR10(os.path.abspath(os.path.expanduser(str(root))), train=True, download=False,
                         transform=transform)
            ds.data, ds.targets = ds.data[:n_images], ds.targets[:n_images]
            return ds, "cifar10"
        except RuntimeError:  # absent or corrupted: fall back to generated images
            pass
    return in_memory_cifar10(n_images, transform), "fake-cifar10"


def _forever(stream: BatchStream) -> Iterator:
    while True:
        yield from stream


class _LoaderBatches:
    """Endless batches of a DataLoader, moved to the device; shuts its workers down on close()."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device, self.it = loader, device, iter(loader)

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            try:
                x, y = next(self.it)
            except StopIteration:
                self.it = iter(self.loader)
                continue
            return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def close(self) -> None:
        if hasattr(self.it, "_shutdown_workers"):
            self.it._shutdown_workers()


def _pipelines(ds, batch_size: int, num_workers: int, device: torch.device, mean, std
               ) -> tuple[Iterator, _LoaderBatches]:
    """normbench's batches (the whole split on the device, BatchStream) and torchvision's (PIL transforms
    per sample in DataLoader workers, then a copy to the device), over the same images."""
    from torch.utils.data import DataLoader

    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous().to(device)
    labels = torch.as_tensor(ds.targets, dtype=torch.int64).to(device)
    stream = BatchStream(Split(images, labels), batch_size, mean, std, augment=True, crop_padding=4, flip=True)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=num_workers, drop_last=True,
                        persistent_workers=num_workers > 0, pin_memory=device.type == "cuda")
    return _forever(stream), _LoaderBatches(loader, device)


def _measure(batches: Iterator, duration: float, device: torch.device) -> float:
    """Images/s drawing batches for about `duration` seconds."""
    _sync(device)
    count = 0
    start = time.perf_counter()
    while True:
        _x, y = next(batches)
        count += y.shape[0]
        if time.perf_counter() - start >= duration:
            break
    _sync(device)
    return count / (time.perf_counter() - start)


def _alternate(pipelines: dict, warmup_batches: int, rounds: int, seconds: float, device) -> dict:
    for batches in pipelines.values():  # warm-up: worker start-up, allocator, first epoch permutation
        for _ in range(warmup_batches):
            next(batches)
    _sync(device)
    results: dict[str, list[float]] = {name: [] for name in pipelines}
    for _ in range(rounds):
        for name, batches in pipelines.items():
            results[name].append(_measure(batches, seconds, device))
    return results


def compare_data_pipelines(
    device: torch.device | str = "cpu",
    batch_size: int = 128,
    n_images: int = 10_000,
    seconds: float = 2.0,
    *,
    rounds: int = 3,
    num_workers: int = 2,
    root=None,
    warmup_batches: int = 10,
    threads: int | None = 1,
) -> dict:
    """Median training images/s of both pipelines and their ratio (normbench / torchvision).

    ``threads``: torch intra-op threads of this process during the measurement (restored after; None
    leaves it). One by default: the per-batch tensor ops are small, and on a shared or oversubscribed CPU
    OpenMP's multi-thread barriers can make them 20-50x slower; it is also the fair comparison, since each
    DataLoader worker runs with one torch thread.

    Returns ``{"normbench_img_s", "torchvision_img_s", "ratio"}`` plus the settings and per-round numbers.
    """
    device = torch.device(device)
    if n_images < batch_size:
        raise ValueError(f"n_images ({n_images}) must be at least batch_size ({batch_size})")
    ds, source = _cifar10_dataset(root, n_images, None)
    mean, std = channel_stats(torch.from_numpy(ds.data).permute(0, 3, 1, 2))  # both normalize alike
    ds.transform = _transform(mean, std)
    normbench, torchvision = _pipelines(ds, batch_size, num_workers, device, mean, std)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        results = _alternate({"normbench": normbench, "torchvision": torchvision}, warmup_batches, rounds,
                             seconds, device)
    finally:
        used_threads = torch.get_num_threads()
        torch.set_num_threads(old_threads)
        torchvision.close()
    nb, tv = statistics.median(results["normbench"]), statistics.median(results["torchvision"])
    return {
        "normbench_img_s": nb, "torchvision_img_s": tv, "ratio": nb / tv, "device": str(device),
        "batch_size": batch_size, "n_images": len(ds.data), "num_workers": num_workers, "rounds": rounds,
        "seconds": seconds, "torch_threads": used_threads, "data": source,
        "normbench_rounds_img_s": results["normbench"], "torchvision_rounds_img_s": results["torchvision"],
    }


def bench_data(s, device: torch.device) -> dict:
    """The ``data`` section of bench/perf.py (batch 128; real CIFAR-10 from $NORMBENCH_DATA when there)."""
    return compare_data_pipelines(device, batch_size=128, n_images=s.data_images, seconds=s.data_seconds,
                                  rounds=3 if s.quick else 5, num_workers=s.data_workers,
                                  root=os.environ.get("NORMBENCH_DATA"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--n-images", type=int, default=10_000)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--root", default=os.environ.get("NORMBENCH_DATA"))
    p.add_argument("--threads", type=int, default=1, help="torch threads while measuring (0: leave as is)")
    args = p.parse_args(argv)
    out = compare_data_pipelines(args.device, args.batch_size, args.n_images, args.seconds, rounds=args.rounds,
                                 num_workers=args.num_workers, root=args.root, threads=args.threads or None)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
