"""The model group: the built-in models (the `_target_`s of conf/model/*.yaml) and how a model is built.

A built-in model follows the protocol a user's own does (docs/extending.md): its builder is called
with every key of the model config plus `num_classes`, `in_channels`, `image_size`, a `norm(channels,
spatial)` factory and an `activation()` factory, and takes ``**kwargs`` for the ones it does not use.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from normbench.errors import ConfigError
from normbench.schema import ModelConf
from normbench.targets import BUILTIN_TARGETS, call_target

NormFactory = Callable[[int, int], nn.Module]
ActivationFactory = Callable[[], nn.Module]

VGG_A = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
# (out_channels, kernel, stride, padding, pool_after) for the study's AlexNet (224x224 input)
ALEXNET = [(96, 11, 4, 2, True), (256, 5, 1, 2, True), (384, 3, 1, 1, False), (384, 3, 1, 1, False),
           (256, 3, 1, 1, True)]
ALEXNET_CIFAR = [(96, 5, 1, 2, True), (256, 5, 1, 2, True), (384, 3, 1, 1, False), (384, 3, 1, 1, False),
                 (256, 3, 1, 1, True)]


def build_model(model_cfg, *, num_classes: int, in_channels: int, image_size: int, norm: NormFactory,
                activation: ActivationFactory, allowed_targets=BUILTIN_TARGETS) -> nn.Module:
    """Call the model config's `_target_` (an allowed one) with the protocol's keyword arguments (`width`
    and `dropout` always: ModelConf's defaults where the config has none)."""
    return call_target(model_cfg, allowed_targets, num_classes=num_classes, in_channels=in_channels,
                       image_size=image_size, norm=norm, activation=activation,
                       width=model_cfg.get("width", ModelConf.width),
                       dropout=model_cfg.get("dropout", ModelConf.dropout))


def model_name(model_cfg) -> str:
    """The model's name for per-model policies: its `_target_`'s last component (vgg_a_light is vgg_a)."""
    return str(model_cfg.get("_target_", "")).rsplit(".", 1)[-1]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------------
# the built-in models


def vgg_a(*, num_classes: int, in_channels: int, image_size: int, norm: NormFactory,
          activation: ActivationFactory, width: float = 1.0, dropout: float = 0.0, init: str = ModelConf.init,
          **_) -> nn.Module:
    """VGG-A for 32x32: conv -> norm -> activation, max-pool at each M, classifier 512-512-512-classes."""
    return initialized(VGG(norm, activation, num_classes, float(width), float(dropout), int(image_size),
                           int(in_channels)), init)


# Study 002's text gives conv2's kernels as 5x5x48 and conv4/conv5's as 3x3x192: Krizhevsky's two-GPU
# grouping (groups=2 on conv2, conv4, conv5). conv_groups=1 (the default) is the usual single-GPU AlexNet.
GROUPED_LAYERS = (2, 4, 5)
NORM_AT = ("after_pool", "before_pool")


def _alexnet(spec, hidden: int, pooled: int, *, num_classes: int, in_channels: int, image_size: int,
             norm: NormFactory, activation: ActivationFactory, width: float = 1.0, dropout: float = 0.5,
             conv_groups: int = 1, norm_at: str = "after_pool", norm_layers=(1, 2, 3, 4, 5),
             init: str = ModelConf.init, **_) -> nn.Module:
    """conv_groups: 1, or 2 for the text's grouped conv2/conv4/conv5. norm_at: after_pool (the norm follows
    the block's pooling, where the study's LayerNorm shapes [96,27,27] ... put it) or before_pool (after the
    ReLU, where Krizhevsky's LRN sits). norm_layers: which conv blocks (1-5) get a norm (LRN as in
    Krizhevsky: [1, 2])."""
    if isinstance(conv_groups, bool) or conv_groups not in (1, 2):
        raise ConfigError("model.conv_groups", conv_groups, "choose 1 (no grouping) or 2 (study 002's text: "
                                                            "grouped conv2, conv4, conv5)")
    if norm_at not in NORM_AT:
        raise ConfigError("model.norm_at", norm_at, f"choose one of {', '.join(NORM_AT)}")
    layers = tuple(norm_layers) if norm_layers is not None else ()
    if not all(isinstance(i, int) and not isinstance(i, bool) and 1 <= i <= 5 for i in layers):
        raise ConfigError("model.norm_layers", list(layers), "a list of conv block numbers 1-5, e.g. "
                          "[1,2,3,4,5]")
    return initialized(AlexNet(spec, norm, activation, num_classes, float(width), float(dropout),
                               int(image_size), int(in_channels), hidden, pooled,
                               dict.fromkeys(GROUPED_LAYERS, conv_groups), norm_at, set(layers)), init)


# The study's AlexNet (224x224 input), classifier 4096-4096-classes.
alexnet = partial(_alexnet, ALEXNET, 4096, 6)
# AlexNet-style net for native 32x32 input, classifier 1024-1024-classes.
alexnet_cifar = partial(_alexnet, ALEXNET_CIFAR, 1024, 3)


def scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


# model.init: how every conv and linear weight is drawn (biases zero); `torch` keeps PyTorch's own init.
INIT_ARGS = {"xavier_uniform": {}, "kaiming_normal": {"mode": "fan_out", "nonlinearity": "relu"}}


def initialized(model: nn.Module, init: str) -> nn.Module:
    for module in model.modules():
        if init in INIT_ARGS and isinstance(module, (nn.Conv2d, nn.Linear)):
            getattr(nn.init, f"{init}_")(module.weight, **INIT_ARGS[init])
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


def _classifier(in_features: int, hidden: int, num_classes: int, act: ActivationFactory,
                dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(2):
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += [nn.Linear(in_features, hidden), act()]
        in_features = hidden
    layers.append(nn.Linear(in_features, num_classes))
    return nn.Sequential(*layers)


def _without_identities(layers: list[nn.Module]) -> nn.Sequential:
    return nn.Sequential(*[m for m in layers if not isinstance(m, nn.Identity)])


class _ConvNet(nn.Module):
    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


class VGG(_ConvNet):
    def __init__(self, norm: NormFactory, act: ActivationFactory, num_classes: int = 10, width: float = 1.0,
                 dropout: float = 0.0, input_size: int = 32, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch, spatial = in_channels, input_size
        for item in VGG_A:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                spatial //= 2
                continue
            out_ch = scaled(item, width)
            layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1), norm(out_ch, spatial), act()]
            in_ch = out_ch
        if spatial < 1:
            raise ConfigError("model.input_size", input_size, "too small for VGG-A's five poolings (use "
                              ">= 32)")
        self.features = _without_identities(layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = _classifier(in_ch, scaled(512, width), num_classes, act, dropout)


class AlexNet(_ConvNet):
    """AlexNet-style: conv -> activation -> [max-pool] -> norm (the norm follows the pooling, as the
    study's LayerNorm shapes [96,27,27] ... [256,6,6] show), then a dropout classifier."""

    def __init__(self, spec, norm: NormFactory, act: ActivationFactory, num_classes: int, width: float,
                 dropout: float, input_size: int, in_channels: int, hidden: int, pooled: int,
                 groups: dict[int, int], norm_at: str, norm_layers: set[int]):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch, spatial = in_channels, input_size
        for index, (out, kernel, stride, padding, pool) in enumerate(spec, start=1):
            out_ch = scaled(out, width)
            g = groups.get(index, 1)
            if in_ch % g or out_ch % g:
                raise ConfigError("model.conv_groups", g, f"must divide conv{index}'s {in_ch} -> {out_ch} "
                                  "channels (use conv_groups=1 at this model.width)")
            layers += [nn.Conv2d(in_ch, out_ch, kernel, stride, padding, groups=g), act()]
            spatial = (spatial + 2 * padding - kernel) // stride + 1
            if index in norm_layers and norm_at == "before_pool":
                layers.append(norm(out_ch, spatial))
            if pool:
                layers.append(nn.MaxPool2d(3, 2))
                spatial = (spatial - 3) // 2 + 1
            if spatial < 1:
                raise ConfigError("model.input_size", input_size, "too small for this model")
            if index in norm_layers and norm_at == "after_pool":
                layers.append(norm(out_ch, spatial))
            in_ch = out_ch
        self.features = _without_identities(layers)
        self.pool = nn.AdaptiveAvgPool2d(pooled)
        self.classifier = _classifier(in_ch * pooled * pooled, scaled(hidden, width), num_classes, act,
                                      dropout)
