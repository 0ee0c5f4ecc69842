"""Training criteria. Each is called as criterion(logits, targets, model) -> scalar loss."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from normbench.schema import LossConf, parse


class Criterion(nn.Module):
    """Cross-entropy family with optional label smoothing, focal modulation and weight penalties.

    The L1 / L2 penalties apply to the weights of convolutions and linear layers (not biases or norm
    parameters): `loss.l1 * sum|w|` and `loss.l2 * sum w^2`.
    """

    def __init__(self, name: str, l1: float = 0.0, l2: float = 0.0, smoothing: float = 0.0,
                 gamma: float = 0.0):
        super().__init__()
        self.name, self.l1, self.l2, self.smoothing, self.gamma = name, l1, l2, smoothing, gamma

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, model: nn.Module | None = None):
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 up, float64 kept
        if self.gamma > 0:
            log_p = F.log_softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
            loss = (-(1 - log_p.exp()) ** self.gamma * log_p).mean()
        else:
            loss = F.cross_entropy(logits, targets, label_smoothing=self.smoothing)
        if model is not None and (self.l1 > 0 or self.l2 > 0):
            weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
            if self.l1 > 0:
                loss = loss + self.l1 * sum(w.abs().sum() for w in weights)
            if self.l2 > 0:
                loss = loss + self.l2 * sum(w.pow(2).sum() for w in weights)
        return loss


def build_criterion(loss_cfg) -> Criterion:
    return Criterion(**dataclasses.asdict(parse("loss", LossConf, loss_cfg)))
