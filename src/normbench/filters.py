"""First-layer convolution filters as one image grid (used by the W&B sink and the report)."""

from __future__ import annotations

import math

import numpy as np
import torch


def first_conv_weight(model: torch.nn.Module) -> torch.Tensor | None:
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d) and module.in_channels == 3:
            return module.weight.detach()
    return None


def _grid(images: torch.Tensor, nrow: int, padding: int, pad_value: float) -> torch.Tensor:
    """(N, C, H, W) -> (C, rows*(H+p)+p, cols*(W+p)+p), laid out like torchvision.utils.make_grid
    (without importing torchvision: that import alone costs more than a second of start-up)."""
    n, c, h, w = images.shape
    if n == 1:  # make_grid returns a single image as it is
        return images[0]
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    cell_h, cell_w = h + padding, w + padding
    grid = images.new_full((c, rows * cell_h + padding, cols * cell_w + padding), pad_value)
    for k in range(n):
        y, x = divmod(k, cols)
        grid[:, y * cell_h + padding:(y + 1) * cell_h, x * cell_w + padding:(x + 1) * cell_w] = images[k]
    return grid


def filter_grid(weight: torch.Tensor, scale: int = 4) -> np.ndarray:
    """Each RGB filter min-max scaled on its own, tiled in a grid; returns HxWx3 uint8."""
    w = weight.detach().float().cpu()
    low = w.amin(dim=(1, 2, 3), keepdim=True)
    high = w.amax(dim=(1, 2, 3), keepdim=True)
    w = (w - low) / (high - low).clamp_min(1e-12)
    nrow = int(np.ceil(np.sqrt(w.shape[0])))
    grid = _grid(w, nrow=nrow, padding=1, pad_value=1.0)
    grid = torch.nn.functional.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
