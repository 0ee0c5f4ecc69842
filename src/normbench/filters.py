"""First-layer convolution filters as one image grid (used by the W&B sink and the report)."""

from __future__ import annotations

import numpy as np
import torch


def first_conv_weight(model: torch.nn.Module) -> torch.Tensor | None:
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            return module.weight.detach()
    return None


def filter_grid(weight: torch.Tensor, scale: int = 4) -> np.ndarray:
    """Each filter min-max scaled on its own, tiled in a grid; returns HxWx3 uint8. RGB filters show in
    colour, one-channel filters in grey, others as the mean over their input channels."""
    # Imported here, at the end of a run: torchvision's import would add to every run's start-up.
    from torchvision.utils import make_grid

    w = torch.nan_to_num(weight.detach().float().cpu())  # a diverged run's weights may be non-finite
    if w.shape[1] not in (1, 3):
        w = w.mean(dim=1, keepdim=True)
    low = w.amin(dim=(1, 2, 3), keepdim=True)
    high = w.amax(dim=(1, 2, 3), keepdim=True)
    w = (w - low) / (high - low).clamp_min(1e-12)
    nrow = int(np.ceil(np.sqrt(w.shape[0])))
    grid = make_grid(w, nrow=nrow, padding=1, pad_value=1.0)
    grid = torch.nn.functional.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
