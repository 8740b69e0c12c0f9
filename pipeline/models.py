"""Base networks by name: a registry (timm style) of builders that return freshly initialised ResNets.

Two families share one module layout so that one graph walker (``nps.pipeline.graph``) and one pruner
(``nps.pipeline.prune``) serve both:

- the torchvision ImageNet ResNets (``resnet18`` … ``resnet152``, ``wide_resnet50_2``), built with ``weights=None``
  (no download ever) and any number of classes; a stem for a different number of input channels replaces ``conv1``;
- the CIFAR ResNets of He et al. 2016 §4.2 (``resnet20`` … ``resnet110``): a 3×3 stem of 16 channels with stride 1
  and no max-pool, three stages of ``n = (depth - 2) / 6`` torchvision ``BasicBlock`` s with 16/32/64 channels,
  stride 2 at the start of stages 2 and 3 with a 1×1 conv + BN shortcut where the shape changes (option B).

Modules are named exactly as torchvision names them (``conv1``, ``bn1``, ``layer1`` … ``fc``; blocks with
``conv1``/``bn1``/``conv2``/``bn2``/``downsample.0``/``downsample.1``).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

from nps.pipeline.errors import NpsError

ModelBuilder = Callable[..., nn.Module]

_REGISTRY: dict[str, ModelBuilder] = {}


def register(builder: ModelBuilder) -> ModelBuilder:
    """Add ``builder`` to the registry under its function name (``builder(num_classes, in_channels)``)."""
    name = builder.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = builder
    return builder


def build_model(name: str, num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """A freshly initialised base network.

    Parameters
    ----------
    name : str
        A registered model name (see ``MODELS``).
    num_classes : int
        Outputs of the final ``fc`` layer.
    in_channels : int
        Channels of the input image (1 for grey-scale, 3 for RGB).

    Raises
    ------
    NpsError
        Unknown name, or a non-positive class or channel count.
    """
    builder = _REGISTRY.get(name)
    if builder is None:
        raise NpsError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    for what, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise NpsError(f"{what} must be a positive integer, got {value!r}")
    return builder(num_classes=num_classes, in_channels=in_channels)


def _init_like_torchvision(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def _torchvision_resnet(factory: Callable[..., nn.Module], num_classes: int, in_channels: int) -> nn.Module:
    model = factory(weights=None, num_classes=num_classes)
    if in_channels != 3:
        old = model.conv1
        model.conv1 = nn.Conv2d(in_channels, old.out_channels, kernel_size=old.kernel_size, stride=old.stride,
                                padding=old.padding, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


@register
def resnet18(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    return _torchvision_resnet(tv_resnet.resnet18, num_classes, in_channels)


@register
def resnet34(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    return _torchvision_resnet(tv_resnet.resnet34, num_classes, in_channels)


@register
def resnet50(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    return _torchvision_resnet(tv_resnet.resnet50, num_classes, in_channels)


@register
def resnet101(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    return _torchvision_resnet(tv_resnet.resnet101, num_classes, in_channels)


@register
def resnet152(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    return _torchvision_resnet(tv_resnet.resnet152, num_classes, in_channels)


@register
def wide_resnet50_2(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    return _torchvision_resnet(tv_resnet.wide_resnet50_2, num_classes, in_channels)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32×32 inputs, with torchvision's module names (``layer1`` … ``layer3``, ``fc``)."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks = (depth - 2) // 6
        self.inplanes = 16
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_stage(16, blocks, stride=1)
        self.layer2 = self._make_stage(32, blocks, stride=2)
        self.layer3 = self._make_stage(64, blocks, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)
        _init_like_torchvision(self)

    def _make_stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        layers = [tv_resnet.BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [tv_resnet.BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


@register
def resnet20(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return CifarResNet(20, num_classes, in_channels)


@register
def resnet32(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return CifarResNet(32, num_classes, in_channels)


@register
def resnet44(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return CifarResNet(44, num_classes, in_channels)


@register
def resnet56(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return CifarResNet(56, num_classes, in_channels)


@register
def resnet110(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return CifarResNet(110, num_classes, in_channels)


MODELS = _REGISTRY.keys()
"""Registered model names in registration order (a live view: later ``register`` calls show up)."""
