"""Datasets as uint8 tensors on the training device, augmented by batched tensor ops.

A split is ONE uint8 tensor ``(N, 3, H, W)`` plus int64 labels, both on the training device. Training
batches come from :class:`BatchStream`: a fresh permutation per epoch (``torch.randperm`` on the device),
then per batch one ``index_select``, one zero-pad and one ``gather`` that does random crop and horizontal
flip together (:func:`augment_batch`), a float conversion fused with the mean/std normalization, an
optional bilinear resize (AlexNet's 224x224 input) and an optional channels-last copy. No DataLoader, no
per-sample Python, no host-device synchronisation inside the iteration (no ``.item()``, no branching on
tensor values), and the same code on CPU and CUDA.

The crop/flip distribution is the one of torchvision's ``RandomCrop(H, padding=p)`` (zero padding, offsets
uniform in ``0..2p`` on both axes) followed by ``RandomHorizontalFlip(0.5)``; ``tests/test_data.py`` checks
it against torchvision statistically and pixel for pixel.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import pickle
import socket
import tarfile
import urllib.error
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from normbench.errors import ConfigError, DataNotFoundError

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DATASETS",
    "BatchStream",
    "DataBundle",
    "Split",
    "augment_batch",
    "channel_stats",
    "eval_batches",
    "fake_cifar_class",
    "load_data",
    "make_synthetic",
    "write_fake_cifar",
]

# Channel statistics of the training sets (pixel values scaled to [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

DATASETS = ("cifar10", "cifar100", "synthetic")


# --------------------------------------------------------------------------------------------------------
# containers


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, 3, H, W) on the device
    labels: torch.Tensor  # int64 (N,) on the device

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device | str) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


@dataclass
class DataBundle:
    train: Split
    val: Split
    test: Split
    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str


# --------------------------------------------------------------------------------------------------------
# config access (DictConfig or anything with attributes)


def _get(cfg, key: str, default=None):
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    try:
        value = getattr(cfg, key)
    except (AttributeError, KeyError):
        return default
    return default if value is None else value


def _as_int(value, key: str, lo: int | None = None, hi: int | None = None, what: str = "") -> int:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if ok:
        value = int(value)
        ok = (lo is None or value >= lo) and (hi is None or value <= hi)
    if not ok:
        lo_s = "-inf" if lo is None else str(lo)
        hi_s = "inf" if hi is None else str(hi)
        raise ConfigError(key, value, f"use an integer in [{lo_s}, {hi_s}]{what}")
    return value


# --------------------------------------------------------------------------------------------------------
# loading


def load_data(data_cfg, device: torch.device | str) -> DataBundle:
    """Load the dataset named by ``data_cfg.name`` as uint8 tensors on ``device``.

    The validation split is ``data_cfg.val_size`` images held out of the training set by a permutation
    fixed by ``data_cfg.split_seed`` (the same images on every device and every run with that seed).
    """
    device = torch.device(device)
    name = str(_get(data_cfg, "name", "")).lower()
    if name not in DATASETS:
        raise ConfigError("data.name", _get(data_cfg, "name"), f"choose one of {', '.join(DATASETS)}")
    split_seed = _as_int(_get(data_cfg, "split_seed", 0), "data.split_seed")

    if name == "synthetic":
        syn = _get(data_cfg, "synthetic")
        num_train = _as_int(_get(syn, "num_train", 10000), "data.synthetic.num_train", lo=2)
        num_test = _as_int(_get(syn, "num_test", 2000), "data.synthetic.num_test", lo=1)
        image_size = _as_int(_get(syn, "image_size", 32), "data.synthetic.image_size", lo=8)
        num_classes = _as_int(_get(syn, "num_classes", 10), "data.synthetic.num_classes", lo=2, hi=255)
        seed = _as_int(_get(syn, "seed", 0), "data.synthetic.seed")
        noise = _get(syn, "noise", 0.25)
        if not isinstance(noise, (int, float)) or isinstance(noise, bool) or not 0 <= noise < 10:
            raise ConfigError(
                "data.synthetic.noise", noise, "use a float in [0, 10) (noise std, 1 = full range)"
            )
        images, labels = make_synthetic(
            num_train + num_test,
            num_classes=num_classes,
            image_size=image_size,
            seed=seed,
            noise=float(noise),
        )
        train_images, train_labels = images[:num_train], labels[:num_train]
        test_images, test_labels = images[num_train:], labels[num_train:]
        mean = std = None
    else:
        train_images, train_labels, test_images, test_labels = _load_cifar(
            name, _get(data_cfg, "root", "./data"), bool(_get(data_cfg, "download", False))
        )
        num_classes = 10 if name == "cifar10" else 100
        image_size = int(train_images.shape[-1])
        mean, std = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)

    n = int(train_images.shape[0])
    val_size = _as_int(
        _get(data_cfg, "val_size", 5000),
        "data.val_size",
        lo=1,
        hi=n - 1,
        what=f" (images held out of the {n} training images of {name})",
    )
    train_idx, val_idx = _split_indices(n, val_size, split_seed)
    train = Split(train_images[train_idx], train_labels[train_idx])
    val = Split(train_images[val_idx], train_labels[val_idx])
    test = Split(test_images, test_labels)
    if mean is None:  # synthetic: statistics of its own training split
        mean, std = channel_stats(train.images)
    return DataBundle(
        train=train.to(device),
        val=val.to(device),
        test=test.to(device),
        num_classes=num_classes,
        image_size=image_size,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        name=name,
    )


def _split_indices(n: int, val_size: int, split_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_idx, val_idx), each sorted, disjoint, covering range(n); fixed by split_seed."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (unbiased) of uint8 images (N, C, H, W), in [0, 1] units.

    Exact and light: a 256-bin histogram per channel, statistics in float64 from the histogram.
    """
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        hist = torch.bincount(images[:, c].reshape(-1), minlength=256).to("cpu", torch.float64)
        count = hist.sum()
        mean = (hist * levels).sum() / count
        var = (hist * (levels - mean) ** 2).sum() / (count - 1).clamp_min(1)
        means.append(float(mean))
        stds.append(float(var.sqrt()))
    return tuple(means), tuple(stds)


def _cifar_class(name: str):
    from torchvision.datasets import CIFAR10, CIFAR100

    return (CIFAR10, "CIFAR-10") if name == "cifar10" else (CIFAR100, "CIFAR-100")


def _short(err: BaseException, limit: int = 140) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ").strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


DOWNLOAD_SOCKET_TIMEOUT_S = 60.0


@contextlib.contextmanager
def _download_guard(root: str):
    """Serialise downloads of parallel jobs sharing one data dir (POSIX advisory lock; skipped where the
    dir cannot hold a lock file, e.g. read-only), and bound each socket operation so that a firewall that
    silently drops packets cannot hang a job."""
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_SOCKET_TIMEOUT_S)
    fh = None
    try:
        import fcntl

        os.makedirs(root, exist_ok=True)
        fh = open(os.path.join(root, ".normbench-download.lock"), "a")  # noqa: SIM115
        fcntl.flock(fh, fcntl.LOCK_EX)
    except (ImportError, OSError):  # non-POSIX or read-only: no lock (a download there fails on its own)
        if fh is not None:
            fh.close()
        fh = None
    try:
        yield
    finally:
        if fh is not None:
            fh.close()  # releases the lock
        socket.setdefaulttimeout(old_timeout)


def _missing_files(cls, folder: str) -> list[str]:
    files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    return [f for f in files if not os.path.isfile(os.path.join(folder, f))]


def _load_cifar(name: str, root, download: bool):
    cls, label = _cifar_class(name)
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

    def to_tensors(ds):
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        labels = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
        return images, labels

    return (*to_tensors(train), *to_tensors(test))


# --------------------------------------------------------------------------------------------------------
# synthetic data


def make_synthetic(
    n: int, *, num_classes: int = 10, image_size: int = 32, seed: int = 0, noise: float = 0.25
) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-shaped uint8 images (n, 3, S, S) and balanced int64 labels, fully determined by ``seed``.

    Each class has a smooth random colour template (a 4x4 grid of random RGB values, bilinearly upsampled);
    a sample is its class template shifted by up to S/8 pixels on each axis, times a random contrast in
    [0.7, 1.3], plus Gaussian pixel noise of std ``noise`` (in units of the full 0..255 range). A small CNN
    separates the classes within a few dozen SGD steps. Generated on the CPU (same bytes on every machine).
    """
    g = torch.Generator().manual_seed(int(seed))
    s = int(image_size)
    m = max(1, s // 8)
    k = 2 * m + 1  # shifts per axis
    coarse = torch.rand(num_classes, 3, 4, 4, generator=g) * 0.8 + 0.1
    templates = F.interpolate(coarse, size=(s + 2 * m,) * 2, mode="bilinear", align_corners=False) - 0.5
    # every (class, shift) crop once: (num_classes * k * k, 3*s*s), small; samples are rows of it
    bank = torch.stack([templates[:, :, dy : dy + s, dx : dx + s] for dy in range(k) for dx in range(k)], 1)
    bank = bank.reshape(num_classes * k * k, 3 * s * s)

    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    shift = torch.randint(0, k * k, (n,), generator=g)
    contrast = torch.rand(n, 1, generator=g) * 0.6 + 0.7
    x = bank.index_select(0, labels * (k * k) + shift).mul_(contrast)
    if noise > 0:
        x.add_(torch.randn(x.shape, generator=g), alpha=float(noise))
    x.add_(0.5).mul_(255.0).round_().clamp_(0, 255)
    images = x.to(torch.uint8).reshape(n, 3, s, s)
    return images, labels.to(torch.int64)


# --------------------------------------------------------------------------------------------------------
# augmentation and batching


def _randint(high: int, size: tuple[int, ...], generator: torch.Generator | None, device: torch.device):
    """Random ints on ``device``; drawn on the generator's device (keep the generator there for no syncs)."""
    if generator is None or generator.device == device:
        return torch.randint(0, high, size, generator=generator, device=device)
    return torch.randint(0, high, size, generator=generator, device=generator.device).to(device)


def _randperm(n: int, generator: torch.Generator | None, device: torch.device):
    if generator is None or generator.device == device:
        return torch.randperm(n, generator=generator, device=device)
    return torch.randperm(n, generator=generator, device=generator.device).to(device)


def augment_batch(
    images_uint8: torch.Tensor, *, crop_padding: int, flip: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop with zero padding + random horizontal flip of a uint8 batch (B, C, H, W) -> same shape.

    Same distribution as torchvision ``RandomCrop((H, W), padding=crop_padding)`` then
    ``RandomHorizontalFlip(0.5)``: the crop offsets are uniform in ``0..2*crop_padding`` on each axis,
    independently per sample. Crop and flip are one ``gather`` on the padded batch. With
    ``crop_padding=0`` and ``flip=False`` the input is returned as is.
    """
    x = images_uint8
    if x.dim() != 4:
        raise ValueError(f"augment_batch expects (B, C, H, W), got shape {tuple(x.shape)}")
    p = int(crop_padding)
    if p < 0:
        raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
    if p == 0 and not flip:
        return x
    b, c, h, w = x.shape
    dev = x.device
    hp, wp = h + 2 * p, w + 2 * p
    if p:
        xp = F.pad(x, (p, p, p, p))
        dy = _randint(2 * p + 1, (b,), generator, dev)
        dx = _randint(2 * p + 1, (b,), generator, dev)
    else:
        xp = x.contiguous()
        dy = dx = torch.zeros(b, dtype=torch.long, device=dev)
    col = torch.arange(w, device=dev)
    if flip:
        flipped = _randint(2, (b,), generator, dev).bool()
        cols = torch.where(flipped[:, None], (w - 1) - col, col)  # (B, W)
    else:
        cols = col.expand(b, w)
    rows = dy[:, None] + torch.arange(h, device=dev)  # (B, H)
    index = rows[:, :, None] * wp + (dx[:, None] + cols)[:, None, :]  # (B, H, W) into the padded plane
    index = index.reshape(b, 1, h * w).expand(b, c, h * w)
    return xp.reshape(b, c, hp * wp).gather(2, index).reshape(b, c, h, w)


class _Normalizer:
    """uint8 (B, C, H, W) -> float32 normalized, optionally resized and channels-last."""

    def __init__(self, mean, std, device: torch.device, resize_to: int | None, channels_last: bool):
        mean_t = torch.as_tensor([float(v) for v in mean], dtype=torch.float32)
        std_t = torch.as_tensor([float(v) for v in std], dtype=torch.float32)
        if mean_t.numel() != 3 or std_t.numel() != 3 or bool((std_t <= 0).any()):
            raise ValueError(f"mean/std must be 3 values with std > 0, got mean={mean} std={std}")
        # (x/255 - mean)/std == x * scale + shift
        self.scale = (1.0 / (255.0 * std_t)).view(1, 3, 1, 1).to(device)
        self.shift = (-mean_t / std_t).view(1, 3, 1, 1).to(device)
        self.resize_to = None if resize_to is None else int(resize_to)
        if self.resize_to is not None and self.resize_to < 1:
            raise ValueError(f"resize_to must be a positive size, got {resize_to}")
        self.channels_last = bool(channels_last)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # normalise first (cheaper at the native size; bilinear resize commutes with the per-channel affine)
        out = torch.addcmul(self.shift, x.to(torch.float32), self.scale)
        size = self.resize_to
        if size is not None and (size != out.shape[-2] or size != out.shape[-1]):
            out = F.interpolate(
                out, size=(size, size), mode="bilinear", align_corners=False, antialias=size < out.shape[-1]
            )
        if self.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out


class BatchStream:
    """Training batches for one run: a fresh device-side permutation each epoch, augmented on the device.

    ``for x, y in stream`` runs one epoch: x float32 normalized (B, 3, S, S) with S = ``resize_to`` or the
    native size, y int64 (B,). Randomness comes from ``generator`` (keep it on the data's device to avoid
    host transfers) or from the global RNG of the device when None (seeded by ``torch.manual_seed``).
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        mean,
        std,
        *,
        augment: bool = True,
        crop_padding: int = 4,
        flip: bool = True,
        resize_to: int | None = None,
        channels_last: bool = False,
        drop_last: bool = True,
        generator: torch.Generator | None = None,
    ):
        n = len(split)
        batch_size = _as_int(batch_size, "batch_size", lo=1)
        if drop_last and batch_size > n:
            raise ConfigError("batch_size", batch_size, f"use at most {n}, the number of training images")
        if int(crop_padding) < 0:
            raise ConfigError("data.crop_padding", crop_padding, "use an integer >= 0 (0 turns cropping off)")
        self.split = split
        self.batch_size = batch_size
        self.augment = bool(augment)
        self.crop_padding = int(crop_padding)
        self.flip = bool(flip)
        self.drop_last = bool(drop_last)
        self.generator = generator
        self.device = split.images.device
        self._finish = _Normalizer(mean, std, self.device, resize_to, channels_last)

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    @property
    def resize_to(self) -> int | None:
        """The square size batches are resized to (None: the dataset's own size)."""
        return self._finish.resize_to

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, bs = len(self.split), self.batch_size
        perm = _randperm(n, self.generator, self.device)
        images, labels = self.split.images, self.split.labels
        for i in range(len(self)):
            idx = perm[i * bs : (i + 1) * bs]
            x = images.index_select(0, idx)
            y = labels.index_select(0, idx)
            if self.augment:
                x = augment_batch(x, crop_padding=self.crop_padding, flip=self.flip, generator=self.generator)
            yield self._finish(x), y


def eval_batches(
    split: Split,
    batch_size: int,
    mean,
    std,
    *,
    resize_to: int | None = None,
    channels_last: bool = False,
    max_batches: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Evaluation batches in dataset order (last batch may be short), normalized, no augmentation."""
    batch_size = _as_int(batch_size, "trainer.eval_batch_size", lo=1)
    finish = _Normalizer(mean, std, split.images.device, resize_to, channels_last)  # built eagerly
    n = len(split)
    count = math.ceil(n / batch_size)
    if max_batches is not None:
        count = min(count, max(0, int(max_batches)))

    def batches():
        for i in range(count):
            sl = slice(i * batch_size, min(n, (i + 1) * batch_size))
            yield finish(split.images[sl]), split.labels[sl]

    return batches()


# --------------------------------------------------------------------------------------------------------
# fake on-disk CIFAR (tests and benchmarks)


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


def fake_cifar_class(name: str, md5s: dict[str, str]):
    """A subclass of torchvision's CIFAR10/CIFAR100 whose md5 table matches files from write_fake_cifar.

    For benchmarks and tests only: production code uses torchvision's classes unchanged.
    """
    cls, _ = _cifar_class(name)
    attrs = {
        "train_list": [[f, md5s[f]] for f, _ in cls.train_list],
        "test_list": [[f, md5s[f]] for f, _ in cls.test_list],
        "meta": {**cls.meta, "md5": md5s[cls.meta["filename"]]},
    }
    return type(f"Fake{cls.__name__}", (cls,), attrs)
