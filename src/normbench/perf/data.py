"""Training-data throughput: normbench's on-device pipeline vs the usual torchvision DataLoader pipeline.

``compare_data_pipelines`` measures steady-state training images per second of

* normbench: ``BatchStream`` over a uint8 dataset already on the device (random crop + flip + normalize,
  a fresh device-side permutation per epoch), and
* torchvision: ``datasets.CIFAR10`` + ``Compose([RandomCrop(32, padding=4), RandomHorizontalFlip(),
  ToTensor(), Normalize(mean, std)])`` + ``DataLoader(shuffle=True, num_workers=...)``, batches moved to
  the device,

on the same images, alternating the two in one process (warm-up first, then ``rounds`` timed windows of
``seconds`` each, median). Real CIFAR-10 is used when ``root`` holds it; otherwise a fake dataset in the
real on-disk format is written to a temporary directory and read back through torchvision's CIFAR10
class (its md5 table pointed at the fake files), so both pipelines do exactly the work they would do on
the real data.

CLI: ``python -m normbench.perf.data --device cpu --seconds 2``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from normbench.data import CIFAR10_MEAN, CIFAR10_STD, BatchStream, Split, fake_cifar_class, write_fake_cifar

__all__ = ["compare_data_pipelines"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cifar10_dataset(root, n_images: int, workdir: str):
    """(torchvision CIFAR10 train dataset, source label); real data from ``root`` when present."""
    from torchvision.datasets import CIFAR10

    if root is not None:
        try:
            ds = CIFAR10(os.path.abspath(os.path.expanduser(str(root))), train=True, download=False)
            ds.data, ds.targets = ds.data[:n_images], ds.targets[:n_images]
            return ds, "cifar10"
        except RuntimeError:  # absent or corrupted: fall back to the fake copy
            pass
    md5s = write_fake_cifar(workdir, "cifar10", n_train=n_images, n_test=10, seed=0)
    ds = fake_cifar_class("cifar10", md5s)(workdir, train=True, download=False)
    ds.__class__ = CIFAR10  # loaded; the plain class pickles by name for spawn-started DataLoader workers
    return ds, "fake-cifar10"


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
    from torch.utils.data import DataLoader
    from torchvision import transforms

    device = torch.device(device)
    if n_images < batch_size:
        raise ValueError(f"n_images ({n_images}) must be at least batch_size ({batch_size})")
    mean, std = CIFAR10_MEAN, CIFAR10_STD

    with tempfile.TemporaryDirectory(prefix="normbench-bench-data-") as workdir:
        ds, source = _cifar10_dataset(root, n_images, workdir)  # loaded into memory; files not needed after

    # normbench: the whole split on the device, batches from BatchStream
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous().to(device)
    labels = torch.as_tensor(ds.targets, dtype=torch.int64).to(device)
    stream = BatchStream(
        Split(images, labels), batch_size, mean, std, augment=True, crop_padding=4, flip=True
    )

    def normbench_batches():
        while True:
            yield from stream

    # torchvision: PIL transforms per sample in DataLoader workers, then a copy to the device
    ds.transform = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=True,
        num_workers=num_workers,
        drop_last=True,
        persistent_workers=num_workers > 0,
        pin_memory=device.type == "cuda",
    )
    state = {"it": iter(loader)}

    def torchvision_batches():
        while True:
            try:
                x, y = next(state["it"])
            except StopIteration:
                state["it"] = iter(loader)
                continue
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    pipelines = {"normbench": normbench_batches(), "torchvision": torchvision_batches()}

    def measure(batches, duration: float) -> float:
        _sync(device)
        count = 0
        start = time.perf_counter()
        while True:
            _x, y = next(batches)
            count += y.shape[0]
            elapsed = time.perf_counter() - start
            if elapsed >= duration:
                break
        _sync(device)
        return count / (time.perf_counter() - start)

    results: dict[str, list[float]] = {name: [] for name in pipelines}
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        for batches in pipelines.values():  # warm-up: worker start-up, allocator, first epoch permutation
            for _ in range(warmup_batches):
                next(batches)
        _sync(device)
        for _ in range(rounds):
            for name, batches in pipelines.items():
                results[name].append(measure(batches, seconds))
    finally:
        used_threads = torch.get_num_threads()
        torch.set_num_threads(old_threads)
        it = state["it"]
        if hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    nb = statistics.median(results["normbench"])
    tv = statistics.median(results["torchvision"])
    return {
        "normbench_img_s": nb,
        "torchvision_img_s": tv,
        "ratio": nb / tv,
        "device": str(device),
        "batch_size": batch_size,
        "n_images": len(ds.data),
        "num_workers": num_workers,
        "rounds": rounds,
        "seconds": seconds,
        "torch_threads": used_threads,
        "data": source,
        "normbench_rounds_img_s": results["normbench"],
        "torchvision_rounds_img_s": results["torchvision"],
    }


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
    out = compare_data_pipelines(
        args.device,
        args.batch_size,
        args.n_images,
        args.seconds,
        rounds=args.rounds,
        num_workers=args.num_workers,
        root=args.root,
        threads=args.threads or None,
    )
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
