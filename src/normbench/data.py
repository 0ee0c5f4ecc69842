"""The data group: a dataset's four tensors become uint8 splits on the training device, augmented there.

A dataset is a config whose `_target_` (README "Your own dataset") is called with every key of the data
config and returns train images uint8 (N, C, H, W), train labels int64 (N,), test images and test labels.

Training batches (:class:`BatchStream`) are made on the device: no DataLoader, no per-sample Python, no
host-device synchronisation, the same code on CPU and CUDA (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from normbench.errors import ConfigError
from normbench.schema import DataConf, parse_data
from normbench.targets import BUILTIN_TARGETS, call_target, check_target


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, C, H, W) on the device
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
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    folder: str | None = None  # where the dataset's files were read from (None: generated)


def dataset_name(data_cfg) -> str:
    """`normbench.datasets.cifar10` -> `cifar10`."""
    return str(data_cfg["_target_"]).rsplit(".", 1)[-1]


def load_data(data_cfg: DictConfig, device: torch.device | str, allowed_targets=BUILTIN_TARGETS,
              input_size: int | None = None, pipeline: DataConf | None = None) -> DataBundle:
    """The dataset's splits on ``device``, checked against the config (``pipeline``: its shared keys as the
    run parsed them). With ``fit: pad`` the images are zero-padded to the model's larger ``input_size``
    once, here (28x28 MNIST into a 32x32 VGG); else batches are resized."""
    device = torch.device(device)
    if not isinstance(data_cfg, DictConfig):
        data_cfg = OmegaConf.create(data_cfg)
    spec = pipeline or parse_data(data_cfg)
    check_target("data._target_", data_cfg, allowed_targets)
    tensors = _dataset_tensors(data_cfg, allowed_targets)
    train_images, train_labels, test_images, test_labels = _checked(data_cfg, spec, tensors)
    n, val_size, train_size = len(train_labels), spec.val_size, spec.train_size
    if val_size > n - 1:
        raise ConfigError("data.val_size", val_size,
                          f"use an integer in [0, {n - 1}] (images held out of the {n} training images of "
                          f"{dataset_name(data_cfg)}; 0: train on all, validate on the test set)")
    if train_size is not None and train_size > n - val_size:
        raise ConfigError("data.train_size", train_size,
                          f"use null (all) or an integer in [1, {n - val_size}] (training images left after "
                          "the validation hold-out)")
    train_idx, val_idx = _split_indices(n, val_size, spec.split_seed, train_size)
    pad = _padding(spec, input_size)

    def on_device(images: torch.Tensor, labels: torch.Tensor) -> Split:
        images = images.to(device)
        return Split(F.pad(images, (pad,) * 4) if pad else images, labels.to(device))

    train = on_device(train_images[train_idx], train_labels[train_idx])
    test = on_device(test_images, test_labels)
    # val_size 0 is study 002's setup: every training image trains; "validation" is the test set (one copy)
    val = test if val_size == 0 else on_device(train_images[val_idx], train_labels[val_idx])
    mean, std = spec.mean, spec.std
    if mean is None or std is None:
        mean, std = channel_stats(train.images)
    mean, std = (tuple(float(v) for v in (list(m) * spec.channels if len(m) == 1 else m))
                 for m in (mean, std))
    if not all(v > 0 for v in std):  # blank images (std 0) cannot be normalized
        raise ConfigError("data.std", list(std),
                          f"each channel's std must be > 0 (null: computed from the {len(train)} training "
                          f"images of {dataset_name(data_cfg)}); check the images")
    return DataBundle(train=train, val=val, test=test, num_classes=spec.num_classes,
                      image_size=spec.image_size + 2 * pad, channels=spec.channels, mean=mean, std=std,
                      name=dataset_name(data_cfg), folder=getattr(tensors, "folder", None))


_last_dataset: list = []  # [(config key, tensors)]: the builtin dataset this process read last


def _dataset_tensors(data_cfg: DictConfig, allowed_targets) -> tuple:
    """The dataset's four tensors (never written to). A sweep's jobs share a process: a builtin dataset (its
    config decides its tensors) that the job before loaded with the same config is reused, a user's not."""
    builtin = str(data_cfg["_target_"]).startswith("normbench.datasets.")
    key = json.dumps(OmegaConf.to_container(data_cfg, resolve=True), sort_keys=True, default=str)
    if builtin and _last_dataset and _last_dataset[0][0] == key:
        return _last_dataset[0][1]
    _last_dataset.clear()  # the one before is freed before the next is read
    tensors = call_target(data_cfg, allowed_targets)
    if builtin:
        _last_dataset.append((key, tensors))
    return tensors


def _padding(spec: DataConf, input_size: int | None) -> int:
    """Zero pixels added on each side with ``fit: pad`` (0 when the model takes the images as they are)."""
    image_size = spec.image_size
    if spec.fit != "pad" or input_size is None or input_size == image_size:
        return 0
    if input_size < image_size or (input_size - image_size) % 2 or input_size > 2 * image_size:
        # beyond twice the size the images would be a small patch of a mostly black input (AlexNet's 224)
        raise ConfigError("data.fit", spec.fit,
                          f"cannot pad {image_size}x{image_size} images to the model's input_size "
                          f"{input_size} (it must be larger by an even number, at most twice the size); "
                          "use data.fit=resize")
    return (input_size - image_size) // 2


def _checked(data_cfg, spec: DataConf, tensors) -> tuple[torch.Tensor, ...]:
    """The dataset's four tensors, or one clear error naming the dataset and what is wrong."""
    target = data_cfg["_target_"]

    def bad(what: str) -> ConfigError:
        return ConfigError("data._target_", target,
                           f"{what} (a dataset returns train images uint8 (N, C, H, W), "
                           "train labels int64 (N,), test images, test labels)")

    if not isinstance(tensors, (tuple, list)) or len(tensors) != 4:
        raise bad(f"returned {type(tensors).__name__}, not four tensors")
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        raise bad("returned something that is not a torch.Tensor")
    expected = (spec.channels, spec.image_size, spec.image_size)
    for split, (images, labels) in (("train", tensors[:2]), ("test", tensors[2:])):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise bad(f"{split} images are {images.dtype} of shape {tuple(images.shape)}, not uint8 (N, C, "
                      "H, W)")
        if tuple(images.shape[1:]) != expected:
            raise ConfigError("data.image_size" if images.shape[1] == expected[0] else "data.channels",
                              spec.image_size if images.shape[1] == expected[0] else spec.channels,
                              f"the dataset returned {split} images of shape (C, H, W) = "
                              f"{tuple(images.shape[1:])}; set data.channels and data.image_size to match")
        if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
            raise bad(f"{split} labels are {labels.dtype} of shape {tuple(labels.shape)}, not int64 "
                      f"({images.shape[0]},)")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= spec.num_classes):
            raise ConfigError("data.num_classes", spec.num_classes,
                              f"the dataset's {split} labels run from {int(labels.min())} to "
                              f"{int(labels.max())}")
    return tuple(t.contiguous() for t in tensors)


def _split_indices(n: int, val_size: int, split_seed: int,
                   train_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_idx, val_idx), sorted and disjoint: the first `val_size` of a permutation fixed by
    `split_seed` (the same images on every device), then the next `train_size` (None: all the rest)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    end = n if train_size is None else val_size + train_size
    # each split's indices in ascending order, in O(n): a sort of 55k indices could take 0.2 s on two busy
    # cores (the OpenMP sort waits for a descheduled worker), 1 ms on one
    split = torch.zeros(n, dtype=torch.int8)
    split[perm[:val_size]], split[perm[val_size:end]] = 1, 2
    return (split == 2).nonzero().squeeze(1), (split == 1).nonzero().squeeze(1)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (unbiased) of uint8 images (N, C, H, W), in [0, 1] units: exact and light,
    from a 256-bin histogram per channel."""
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    hist = torch.stack([torch.bincount(images[:, c].reshape(-1), minlength=256)
                        for c in range(images.shape[1])]).to("cpu", torch.float64)  # (C, 256)
    count = hist.sum(1)
    mean = (hist * levels).sum(1) / count
    var = (hist * (levels - mean[:, None]) ** 2).sum(1) / (count - 1).clamp_min(1)
    return tuple(mean.tolist()), tuple(var.sqrt().tolist())


def _random(draw, *args, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``draw(*args)`` (torch.randint, torch.randperm) on ``device``, drawn on the generator's device (keep
    the generator there for no host-device copies)."""
    return draw(*args, generator=generator, device=device if generator is None
                else generator.device).to(device)


def augment_batch(images_uint8: torch.Tensor, *, crop_padding: int, flip: bool,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """A uint8 batch (B, C, H, W) randomly cropped from its zero padding and flipped, as one ``gather``:
    the distribution of torchvision's ``RandomCrop((H, W), padding=crop_padding)`` then
    ``RandomHorizontalFlip(0.5)`` (tests/test_data.py checks it)."""
    x = images_uint8
    if x.dim() != 4:
        raise ValueError(f"augment_batch expects (B, C, H, W), got shape {tuple(x.shape)}")
    p = int(crop_padding)
    if p == 0 and not flip:
        return x
    (b, c, h, w), dev = x.shape, x.device
    hp, wp = h + 2 * p, w + 2 * p
    if p:
        xp = F.pad(x, (p, p, p, p))
        dy = _random(torch.randint, 2 * p + 1, (b,), generator=generator, device=dev)
        dx = _random(torch.randint, 2 * p + 1, (b,), generator=generator, device=dev)
    else:
        xp = x.contiguous()
        dy = dx = torch.zeros(b, dtype=torch.long, device=dev)
    col = torch.arange(w, device=dev)
    if flip:
        flipped = _random(torch.randint, 2, (b,), generator=generator, device=dev).bool()
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
        # load_data checked the statistics (std > 0), the schema the size (input_size >= 8)
        mean_t, std_t = (torch.tensor([float(v) for v in m], dtype=torch.float32).view(1, -1, 1, 1)
                         for m in (mean, std))
        # (x/255 - mean)/std == x * scale + shift
        self.scale, self.shift = (1.0 / (255.0 * std_t)).to(device), (-mean_t / std_t).to(device)
        self.resize_to = None if resize_to is None else int(resize_to)
        self.channels_last = bool(channels_last)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # normalise first (cheaper at the native size; bilinear resize commutes with the per-channel affine)
        out = torch.addcmul(self.shift, x.to(torch.float32), self.scale)
        size = self.resize_to
        if size is not None and (size != out.shape[-2] or size != out.shape[-1]):
            out = F.interpolate(out, size=(size, size), mode="bilinear", align_corners=False,
                                antialias=size < out.shape[-1])
        if self.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out


class BatchStream:
    """``for x, y in stream`` runs one epoch of a fresh device-side permutation, augmented on the device:
    x float32 normalized, y int64. Randomness comes from ``generator`` (keep it on the data's device to
    avoid host transfers), else from the device's global RNG."""

    def __init__(self, split: Split, batch_size: int, mean, std, *, augment: bool = True,
                 crop_padding: int = 4,
                 flip: bool = True, resize_to: int | None = None, channels_last: bool = False,
                 drop_last: bool = True, generator: torch.Generator | None = None):
        self.split, self.batch_size = split, int(batch_size)
        if drop_last and self.batch_size > len(split):
            raise ConfigError("batch_size", batch_size,
                              f"use at most {len(split)}, the number of training images")
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
        perm = _random(torch.randperm, n, generator=self.generator, device=self.device)
        images, labels = self.split.images, self.split.labels
        for i in range(len(self)):
            idx = perm[i * bs : (i + 1) * bs]
            x, y = images.index_select(0, idx), labels.index_select(0, idx)
            if self.augment:
                x = augment_batch(x, crop_padding=self.crop_padding, flip=self.flip, generator=self.generator)
            yield self._finish(x), y


def eval_batches(split: Split, batch_size: int, mean, std, *, resize_to: int | None = None,
                 channels_last: bool = False, max_batches: int | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Evaluation batches in dataset order (last batch may be short), normalized, no augmentation."""
    batch_size = int(batch_size)  # trainer.eval_batch_size, checked by its schema
    finish = _Normalizer(mean, std, split.images.device, resize_to, channels_last)  # built eagerly
    starts = range(0, len(split), batch_size)[: None if max_batches is None else max(0, int(max_batches))]
    return ((finish(split.images[i : i + batch_size]), split.labels[i : i + batch_size]) for i in starts)
