"""Base networks by name: freshly initialised CNNs for any number of classes and input channels.

A model name is one of:

- a name of this registry (timm style, ``name → builder``): the CIFAR ResNets of He et al. 2016 §4.2 (``resnet20``
  … ``resnet110``: a 3×3 stem of 16 channels with stride 1 and no max-pool, three stages of ``n = (depth - 2) / 6``
  torchvision ``BasicBlock`` s with 16/32/64 channels, stride 2 at the start of stages 2 and 3 with a 1×1 conv + BN
  shortcut where the shape changes);
- a torchvision classification model (``resnet50``, ``mobilenet_v2``, ``efficientnet_b0``, ``regnet_y_400mf``,
  ``convnext_tiny``, ``densenet121``…), built with ``weights=None`` (nothing is ever downloaded);
- ``timm:<name>``: a timm model (``pip install 'nps[timm]'``), ``pretrained=False``;
- ``package.module:function``: the user's own network, a callable taking ``num_classes`` and ``in_channels``
  (keywords) and returning an ``nn.Module``.

For a torchvision model and ``in_channels != 3``, the stem (the first ``Conv2d`` reading 3 channels) is replaced by
the same conv reading ``in_channels``.
"""
from __future__ import annotations

import importlib
import re
from typing import Callable

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

from nps.pipeline.catalog import CIFAR_MODELS, TESTED_TORCHVISION
from nps.pipeline.errors import NpsError, one_line

ModelBuilder = Callable[..., nn.Module]

_REGISTRY: dict[str, ModelBuilder] = {}


_CALLABLE_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def register(builder: ModelBuilder) -> ModelBuilder:
    """Add ``builder`` to the registry under its function name (``builder(num_classes, in_channels)``)."""
    name = builder.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = builder
    return builder


def torchvision_names() -> list[str]:
    """torchvision's classification models (its registry, without the quantized variants)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def model_kind(name: str) -> str:
    """``registry``, ``torchvision``, ``timm`` or ``callable``; NpsError for a name that is none of them."""
    if not isinstance(name, str) or not name:
        raise NpsError(f"model {name!r}: give a model name")
    if name in _REGISTRY:
        return "registry"
    if name.startswith("timm:"):
        if len(name) == 5:
            raise NpsError("model 'timm:': give a timm model name, e.g. timm:mobilenetv3_small_050")
        return "timm"
    if _CALLABLE_RE.match(name):
        return "callable"
    if name in torchvision_names():
        return "torchvision"
    import difflib

    close = difflib.get_close_matches(name, list(_REGISTRY) + torchvision_names(), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise NpsError(f"unknown model {name!r}{hint}; use a torchvision classification model (e.g. resnet50, "
                   f"mobilenet_v2), a CIFAR ResNet ({', '.join(_REGISTRY)}), timm:<name>, or package.module:function")


def build_model(name: str, num_classes: int = 1000, in_channels: int = 3, *, device: str | None = None) -> nn.Module:
    """A freshly initialised base network.

    Parameters
    ----------
    name : str
        A model name (see the module docstring).
    num_classes : int
        Outputs of the classifier.
    in_channels : int
        Channels of the input image (1 for grey-scale, 3 for RGB).
    device : str, optional
        ``"meta"`` builds it without allocating weights where the builder allows (shapes only); a builder that
        computes with tensors while it builds (torchvision's RegNets) is built on the CPU and moved.

    Raises
    ------
    NpsError
        Unknown name, a user callable that cannot be imported or does not return a module, or a non-positive class
        or channel count.
    """
    kind = model_kind(name)
    for what, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise NpsError(f"{what} must be a positive integer, got {value!r}")
    if kind == "registry":
        builder = _REGISTRY[name]
    elif kind == "torchvision":
        builder = _torchvision_builder(name)
    elif kind == "timm":
        builder = _timm_builder(name)
    else:
        builder = _user_builder(name)
    model = None
    if device == "meta":
        try:
            with torch.device("meta"):
                model = builder(num_classes=num_classes, in_channels=in_channels)
        except NpsError:
            raise
        except Exception:  # noqa: BLE001 - builders that need real tensors while building: build on the CPU
            model = None
    if model is None:
        model = builder(num_classes=num_classes, in_channels=in_channels)
        if device is not None:
            model = model.to(device)
    if not isinstance(model, nn.Module):
        raise NpsError(f"model {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _replace_stem(model: nn.Module, in_channels: int) -> nn.Module:
    if in_channels == 3:
        return model
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3:
                new = nn.Conv2d(in_channels, child.out_channels, kernel_size=child.kernel_size, stride=child.stride,
                                padding=child.padding, dilation=child.dilation, groups=1,
                                bias=child.bias is not None, padding_mode=child.padding_mode,
                                device=child.weight.device, dtype=child.weight.dtype)
                if new.weight.device.type != "meta":
                    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
                setattr(parent, child_name, new)
                return model
    raise NpsError(f"{type(model).__name__} has no conv reading 3 channels to adapt to {in_channels} input channels")


def _torchvision_builder(name: str) -> ModelBuilder:
    def build(num_classes: int, in_channels: int) -> nn.Module:
        import torchvision

        return _replace_stem(torchvision.models.get_model(name, weights=None, num_classes=num_classes), in_channels)

    return build


def _timm_builder(name: str) -> ModelBuilder:
    def build(num_classes: int, in_channels: int) -> nn.Module:
        try:
            import timm
        except ModuleNotFoundError:
            raise NpsError(f"model {name!r} needs timm: pip install 'nps[timm]'") from None
        try:
            return timm.create_model(name[5:], pretrained=False, num_classes=num_classes, in_chans=in_channels)
        except RuntimeError as exc:
            raise NpsError(f"model {name!r}: {str(exc).splitlines()[0]}") from None

    return build


def _user_builder(name: str) -> ModelBuilder:
    module_name, function_name = name.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise NpsError(f"model {name!r}: cannot import {module_name} ({exc}); put its package on PYTHONPATH or "
                       "install it") from None
    except Exception as exc:  # noqa: BLE001 - the user's module failing is not an nps bug
        raise NpsError(f"model {name!r}: importing {module_name} raised {one_line(exc)}; fix the module "
                       "(nps --debug shows its traceback)") from exc
    function = getattr(module, function_name, None)
    if not callable(function):
        raise NpsError(f"model {name!r}: {module_name} has no callable {function_name!r}")

    def build(num_classes: int, in_channels: int) -> nn.Module:
        try:
            return function(num_classes=num_classes, in_channels=in_channels)
        except TypeError as exc:
            raise NpsError(f"model {name!r}: {function_name}(num_classes=..., in_channels=...) failed ({exc}); "
                           "the function must take both keywords") from exc
        except Exception as exc:  # noqa: BLE001 - the user's function failing is not an nps bug
            raise NpsError(f"model {name!r}: {function_name}(num_classes={num_classes}, in_channels={in_channels})"
                           f" raised {one_line(exc)}; fix the function (nps --debug shows its traceback)") from exc

    return build


def _init_like_torchvision(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


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


assert tuple(_REGISTRY) == CIFAR_MODELS
MODELS = CIFAR_MODELS + TESTED_TORCHVISION
"""The CIFAR ResNets and the torchvision models the test suite covers (any torchvision classification model,
``timm:<name>`` and ``package.module:function`` work too: see :func:`model_kind`)."""
