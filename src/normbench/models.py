"""VGG-A and AlexNet builders that take the chosen norm, activation, dropout and a width multiplier."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from normbench.errors import ConfigError
from normbench.norms import NormSpec

VGG_A = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
# (out_channels, kernel, stride, padding, pool_after) for the study's AlexNet (224x224 input)
ALEXNET = [(96, 11, 4, 2, True), (256, 5, 1, 2, True), (384, 3, 1, 1, False), (384, 3, 1, 1, False),
           (256, 3, 1, 1, True)]
ALEXNET_CIFAR = [(96, 5, 1, 2, True), (256, 5, 1, 2, True), (384, 3, 1, 1, False), (384, 3, 1, 1, False),
                 (256, 3, 1, 1, True)]
MODELS = ("vgg_a", "vgg_a_light", "alexnet", "alexnet_cifar")


def scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def _xavier_init(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def _classifier(in_features: int, hidden: int, num_classes: int, act: Callable[[], nn.Module],
                dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(2):
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += [nn.Linear(in_features, hidden), act()]
        in_features = hidden
    layers.append(nn.Linear(in_features, num_classes))
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG-A for 32x32: conv -> norm -> activation, max-pool at each M, classifier 512-512-512-classes."""

    def __init__(self, norm: NormSpec, act: Callable[[], nn.Module], num_classes: int = 10,
                 width: float = 1.0, dropout: float = 0.0, input_size: int = 32):
        super().__init__()
        channels = [scaled(c, width) for c in VGG_A if c != "M"]
        norm.check_channels(channels)
        layers: list[nn.Module] = []
        in_ch, spatial = 3, input_size
        for item in VGG_A:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                spatial //= 2
                continue
            out_ch = scaled(item, width)
            layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1), norm.make(out_ch, spatial), act()]
            in_ch = out_ch
        self.features = nn.Sequential(*[m for m in layers if not isinstance(m, nn.Identity)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = _classifier(in_ch, scaled(512, width), num_classes, act, dropout)
        _xavier_init(self)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


class AlexNet(nn.Module):
    """AlexNet-style: conv -> activation -> [max-pool] -> norm (the norm follows the pooling, as the
    study's LayerNorm shapes [96,27,27] ... [256,6,6] show), then a dropout classifier."""

    def __init__(self, spec, norm: NormSpec, act: Callable[[], nn.Module], num_classes: int,
                 width: float, dropout: float, input_size: int, hidden: int, pooled: int):
        super().__init__()
        channels = [scaled(c[0], width) for c in spec]
        norm.check_channels(channels)
        layers: list[nn.Module] = []
        in_ch, spatial = 3, input_size
        for (out, kernel, stride, padding, pool), out_ch in zip(spec, channels):
            layers += [nn.Conv2d(in_ch, out_ch, kernel, stride, padding), act()]
            spatial = (spatial + 2 * padding - kernel) // stride + 1
            if pool:
                layers.append(nn.MaxPool2d(3, 2))
                spatial = (spatial - 3) // 2 + 1
            if spatial < 1:
                raise ConfigError("model.input_size", input_size, "too small for this model")
            if norm.name != "none":
                layers.append(norm.make(out_ch, spatial))
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(pooled)
        self.classifier = _classifier(in_ch * pooled * pooled, scaled(hidden, width), num_classes, act,
                                      dropout)
        _xavier_init(self)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def build_model(model_cfg, norm: NormSpec, act: Callable[[], nn.Module], num_classes: int) -> nn.Module:
    name = model_cfg.name
    width, dropout, size = float(model_cfg.width), float(model_cfg.dropout), int(model_cfg.input_size)
    if name in ("vgg_a", "vgg_a_light"):
        return VGG(norm, act, num_classes, width, dropout, size)
    if name == "alexnet":
        return AlexNet(ALEXNET, norm, act, num_classes, width, dropout, size, hidden=4096, pooled=6)
    if name == "alexnet_cifar":
        return AlexNet(ALEXNET_CIFAR, norm, act, num_classes, width, dropout, size, hidden=1024, pooled=3)
    raise ConfigError("model.name", name, f"choose one of {', '.join(MODELS)}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
