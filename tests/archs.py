"""Architectures the tests cover, and helpers shared by the graph, pruning and oracle tests."""
import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nps.pipeline.network.models import CIFAR_MODELS, TESTED_TORCHVISION

BIG = ("resnet101", "resnet152", "wide_resnet50_2", "regnet_y_1_6gf", "efficientnet_b3", "densenet121")
ALL_ARCHS = CIFAR_MODELS + TESTED_TORCHVISION
# One of each family for the tests that need real weights or Torch-Pruning in the default run; the rest run with
# `-m slow`.
REPRESENTATIVE = ("resnet20", "resnet18", "resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
                  "mnasnet0_5", "regnet_y_400mf", "convnext_tiny", "densenet121")
OTHERS = tuple(a for a in ALL_ARCHS if a not in REPRESENTATIVE)


def resolution_for(name: str) -> int:
    """Small but valid for every architecture (32 for the CIFAR ResNets; convnext and densenet need >= 32)."""
    return 32 if name in CIFAR_MODELS else 64


def counted(model: nn.Module, resolution: int, in_channels: int = 3) -> tuple[int, int]:
    """(MACs by FlopCounterMode, params) of one batch-1 forward pass on the meta device."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.empty(1, in_channels, resolution, resolution, device="meta"))
    flops = counter.get_total_flops()
    assert flops % 2 == 0
    return flops // 2, sum(p.numel() for p in model.parameters())


def sample_keeps(table, count: int, seed: int) -> np.ndarray:
    """Keep vectors: no pruning, the largest ratio everywhere, and random recipes of varying strength."""
    rng = np.random.default_rng(seed)
    recipes = [np.zeros(len(table)), np.full(len(table), 0.95)]
    recipes += [rng.uniform(0.0, rng.uniform(0.1, 1.0), len(table)) for _ in range(count - 2)]
    return table.keep(np.array(recipes))


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in eval mode with random normalisation parameters and statistics, so that a slicing mistake in
    any of them shows in the outputs."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
                if getattr(module, "weight", None) is not None:
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.2, 0.2)
                if getattr(module, "running_mean", None) is not None:
                    module.running_mean.uniform_(-0.2, 0.2)
                    module.running_var.uniform_(0.5, 2.0)
        for name, param in model.named_parameters():
            if name.endswith("layer_scale"):
                param.uniform_(0.5, 1.5)
    return model.eval()
