"""User models for the tests of `package.module:function` names (imported as own_models:<function>)."""
from torch import nn


def tiny_cnn(num_classes: int, in_channels: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))


def vgg_like(num_classes: int, in_channels: int) -> nn.Module:
    """A classifier on a flattened 4x4 feature map: each kept channel is 16 inputs of the first linear layer."""
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                         nn.Linear(16 * 16, 24), nn.ReLU(), nn.Linear(24, num_classes))


def needs_positional(classes, channels):  # wrong signature on purpose
    return tiny_cnn(classes, channels)


def not_a_module(num_classes: int, in_channels: int):
    return "a string"
