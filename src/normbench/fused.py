"""Horizontal fusion: K built-in models of one architecture as one model whose operators each do the work of
K (Wang et al., "Horizontally Fused Training Array", MLSys 2021).

The K convolutions of a layer are one grouped convolution over K stacked inputs, the K BatchNorms one
BatchNorm over K*C channels (GroupNorm: K*G groups), the K linear layers one batched matmul, the K
dropouts one with each model's own probability (a model without one: 0). Activations and pooling act per
channel and are shared as they are. Dropout masks come from the global RNG, not from each run's seed.

The K unfused models stay the models: `FusedModel` concatenates their parameters and buffers into its own
tensors and points each model's tensors at its slice (``param.data`` becomes a view), so every model's
``state_dict()`` (checkpoints, records, the filter image) keeps the unfused layout and reads the current
values, each model's optimizer keeps stepping its own Parameter objects (in place, on the shared storage),
and ``unfuse()`` gives every model its own storage back. Gradients: each model parameter's ``.grad`` is a
view of the fused gradient, which `zero_grad` zeroes in place (autograd then accumulates into it in place,
so a loss term on a model's own weights, e.g. an L2 penalty, lands in the same gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normbench.models import VGG, AlexNet
from normbench.norms import BatchRenorm2d

FUSABLE_MODELS = (VGG, AlexNet)
SHARED_LAYERS = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.GELU, nn.Mish, nn.MaxPool2d, nn.AdaptiveAvgPool2d)


def unfusable_reason(model: nn.Module) -> str | None:
    """Why `model` has no fused code (None: it fuses): only the built-in VGG / AlexNet, norm none, bn or
    gn (ln with per-channel affine is a GroupNorm and fuses too; brn is a BatchNorm2d that does not)."""
    if type(model) not in FUSABLE_MODELS:
        return f"model {type(model).__name__} is not a built-in VGG or AlexNet"
    for module in model.modules():
        if isinstance(module, (nn.LocalResponseNorm, nn.LayerNorm, BatchRenorm2d)):
            return f"norm layer {type(module).__name__} has no fused code"
        if isinstance(module, nn.BatchNorm2d) and not (module.affine and module.track_running_stats):
            return "BatchNorm without affine parameters or running statistics has no fused code"
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            return f"convolution padding_mode={module.padding_mode} has no fused code"
    return None


class FusedConv2d(nn.Module):
    """K convolutions as one with K times the groups: input and output channels are K blocks."""

    def __init__(self, convs: list[nn.Conv2d]):
        super().__init__()
        first = convs[0]
        self.stride, self.padding, self.dilation = first.stride, first.padding, first.dilation
        self.groups = first.groups * len(convs)
        self.weight = nn.Parameter(torch.cat([c.weight.detach() for c in convs]))
        self.bias = None if first.bias is None else nn.Parameter(torch.cat([c.bias.detach() for c in convs]))

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class FusedLinear(nn.Module):
    """K linear layers as one batched matmul over (K, B, features) inputs."""

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in linears]))  # (K, out, in)
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in linears]))  # (K, out)

    def forward(self, x):
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))


class FusedDropout(nn.Module):
    """K dropouts over (K, B, features), model k keeping each value with probability keep[k]."""

    def __init__(self, probabilities: list[float], device):
        super().__init__()
        self.keep = torch.tensor([1.0 - p for p in probabilities], device=device).view(-1, 1, 1)

    def forward(self, x):
        if not self.training:
            return x
        keep = self.keep.to(x.dtype)
        return x * (torch.rand_like(x) < keep) / keep


def _with_dropouts(layers: nn.Sequential) -> list[tuple[float, nn.Module]]:
    """A model's layers other than dropouts, each with the probability of the dropout before it (or 0)."""
    out, p = [], 0.0
    for layer in layers:
        if isinstance(layer, nn.Dropout):
            p = layer.p
            continue
        out.append((p, layer))
        p = 0.0
    return out


def _fused_batchnorm(norms: list[nn.BatchNorm2d]) -> nn.BatchNorm2d:
    first = norms[0]
    fused = nn.BatchNorm2d(first.num_features * len(norms), eps=first.eps, momentum=first.momentum,
                           device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(fused, name).copy_(torch.cat([getattr(n, name) for n in norms]))
        fused.num_batches_tracked.copy_(first.num_batches_tracked)
    return fused


def _fused_groupnorm(norms: list[nn.GroupNorm]) -> nn.GroupNorm:
    first = norms[0]
    k = len(norms)
    fused = nn.GroupNorm(first.num_groups * k, first.num_channels * k, eps=first.eps, affine=first.affine,
                         device=first.weight.device if first.affine else None,
                         dtype=first.weight.dtype if first.affine else None)
    if first.affine:
        with torch.no_grad():
            fused.weight.copy_(torch.cat([n.weight for n in norms]))
            fused.bias.copy_(torch.cat([n.bias for n in norms]))
    return fused


FUSED_LAYERS = {nn.Conv2d: FusedConv2d, nn.Linear: FusedLinear, nn.BatchNorm2d: _fused_batchnorm,
                nn.GroupNorm: _fused_groupnorm}


def _fuse_layer(layers: list[nn.Module]) -> nn.Module:
    fuse = next((f for kind, f in FUSED_LAYERS.items() if isinstance(layers[0], kind)), None)
    if fuse is None and not isinstance(layers[0], SHARED_LAYERS):
        raise TypeError(f"no fused code for {type(layers[0]).__name__}")
    return layers[0] if fuse is None else fuse(layers)


def pieces(fused: torch.Tensor, k: int, stacked: bool) -> tuple[torch.Tensor, ...]:
    """The K per-model views of a fused tensor: stacked (K, ...) or concatenated (K*n, ...)."""
    if fused.dim() == 0:
        return (fused,) * k
    return fused.unbind(0) if stacked else fused.unflatten(0, (k, -1)).unbind(0)


class FusedModel(nn.Module):
    """K built-in models (same architecture, width, norm, activation, dropout, dtype, device) as one.

    ``forward`` takes the K models' batches interleaved as channels, (B, K*C, H, W) (`stack_inputs`), and
    returns the K models' logits as (K, B, classes)."""

    def __init__(self, models: list[nn.Module], channels_last: bool = False):
        super().__init__()
        for model in models:
            reason = unfusable_reason(model)
            if reason:
                raise ValueError(f"cannot fuse: {reason}")
        self.k, self.channels_last = len(models), channels_last
        self.models = list(models)  # a plain list: the fused model does not own (or save) them
        self._pairs: list[tuple[nn.Module, list[nn.Module]]] = []
        self.features = self._fuse_sequence([m.features for m in models])
        self.pool = models[0].pool
        self.classifier = self._fuse_sequence([m.classifier for m in models])
        self._links = self._link()

    def _fuse_sequence(self, sequences: list[nn.Sequential]) -> nn.Sequential:
        """One fused layer per position (a FusedDropout before it where any model has a dropout there);
        the models' layers must match position by position, which one architecture guarantees."""
        fused: list[nn.Module] = []
        positions = [_with_dropouts(seq) for seq in sequences]
        if len({len(p) for p in positions}) != 1:
            raise ValueError("cannot fuse: the models' layers differ")
        device = next(self.models[0].parameters()).device
        for column in zip(*positions):
            probabilities = [p for p, _ in column]
            if any(probabilities):
                fused.append(FusedDropout(probabilities, device))
            layers = [layer for _, layer in column]
            if len({type(layer) for layer in layers}) != 1:
                raise ValueError("cannot fuse: the models' layers differ")
            fused.append(_fuse_layer(layers))
            self._pairs.append((fused[-1], layers))
        return nn.Sequential(*fused)

    def _link(self) -> list[tuple]:
        """Point the models' parameters, gradients and buffers at their slices of the fused ones."""
        links = []
        for fused, members in self._pairs:
            stacked = isinstance(fused, FusedLinear)
            for name, param in fused.named_parameters(recurse=False):
                param.grad = torch.zeros_like(param)
                views = zip(pieces(param.data, self.k, stacked), pieces(param.grad, self.k, stacked))
                for member, (data, grad) in zip(members, views):
                    own = getattr(member, name)
                    own.data, own.grad = data, grad
                links.append((fused, name, members, stacked, True))
            for name, buffer in fused.named_buffers(recurse=False):
                for member, piece in zip(members, pieces(buffer, self.k, stacked)):
                    member._buffers[name] = piece
                links.append((fused, name, members, stacked, False))
        return links

    def linked_parameters(self) -> list[tuple[nn.Parameter, bool, list[nn.Parameter]]]:
        """Each fused parameter, whether it is stacked (K, ...) rather than concatenated, and the models'
        parameters that are its views."""
        return [(getattr(fused, name), stacked, [getattr(member, name) for member in members])
                for fused, name, members, stacked, is_param in self._links if is_param]

    def unfuse(self) -> None:
        """Give every model its own copy of its parameters and buffers (no gradient); this fused model is
        unusable afterwards."""
        for fused, name, members, _stacked, is_param in self._links:
            for member in members:
                if is_param:
                    own = getattr(member, name)
                    own.data, own.grad = own.data.clone(), None
                else:
                    member._buffers[name] = member._buffers[name].clone()
        self._links = []

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero the fused gradients in place (the models' gradients are views of them)."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            torch._foreach_zero_(grads)

    def stack_inputs(self, batches: list[torch.Tensor]) -> torch.Tensor:
        """The K models' (B, C, H, W) batches as the fused input (B, K*C, H, W)."""
        x = torch.stack(batches, 1).flatten(1, 2)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward(self, x):
        h = self.pool(self.features(x))
        return self.classifier(h.reshape(h.shape[0], self.k, -1).transpose(0, 1))
