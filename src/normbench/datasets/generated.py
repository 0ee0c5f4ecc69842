"""`data=synthetic`: CIFAR-shaped images generated from a seed (no files, no network)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from normbench.datasets.common import Tensors
from normbench.errors import ConfigError


def _integer(key: str, value, lo: int, hi: int | None = None) -> int:
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo
            or (hi and value > hi)):
        raise ConfigError(key, value, f"use an integer in [{lo}, {hi if hi else 'inf'}]")
    return int(value)


def synthetic(num_train: int = 10000, num_test: int = 2000, num_classes: int = 10, image_size: int = 32,
              channels: int = 3, generator_seed: int = 0, noise: float = 0.25, **_) -> Tensors:
    num_train = _integer("data.num_train", num_train, 2)
    num_test = _integer("data.num_test", num_test, 1)
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise < 10:
        raise ConfigError("data.noise", noise, "use a float in [0, 10) (noise std, 1 = full range)")
    images, labels = make_synthetic(
        num_train + num_test, num_classes=_integer("data.num_classes", num_classes, 2, 255),
        image_size=_integer("data.image_size", image_size, 8),
        channels=_integer("data.channels", channels, 1),
        seed=_integer("data.generator_seed", generator_seed, 0), noise=float(noise))
    return images[:num_train], labels[:num_train], images[num_train:], labels[num_train:]


def make_synthetic(n: int, *, num_classes: int = 10, image_size: int = 32, channels: int = 3, seed: int = 0,
                   noise: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images and balanced labels, determined by ``seed`` (generated on the CPU: same bytes on every
    machine). A sample is its class's smooth random template shifted by up to S/8 pixels, times a random
    contrast, plus Gaussian noise: a small CNN separates the classes within a few dozen SGD steps."""
    g = torch.Generator().manual_seed(int(seed))
    s = int(image_size)
    m = max(1, s // 8)
    k = 2 * m + 1  # shifts per axis
    coarse = torch.rand(num_classes, channels, 4, 4, generator=g) * 0.8 + 0.1
    templates = F.interpolate(coarse, size=(s + 2 * m,) * 2, mode="bilinear", align_corners=False) - 0.5
    # every (class, shift) crop once: (num_classes * k * k, C*s*s), small; samples are rows of it
    bank = torch.stack([templates[:, :, dy : dy + s, dx : dx + s] for dy in range(k) for dx in range(k)], 1)
    bank = bank.reshape(num_classes * k * k, channels * s * s)

    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    shift = torch.randint(0, k * k, (n,), generator=g)
    contrast = torch.rand(n, 1, generator=g) * 0.6 + 0.7
    x = bank.index_select(0, labels * (k * k) + shift).mul_(contrast)
    if noise > 0:
        x.add_(torch.randn(x.shape, generator=g), alpha=float(noise))
    x.add_(0.5).mul_(255.0).round_().clamp_(0, 255)
    return x.to(torch.uint8).reshape(n, channels, s, s), labels.to(torch.int64)


