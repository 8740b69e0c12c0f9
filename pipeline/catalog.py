"""The names and defaults the `nps` command shows before it imports anything heavy: defined here once, imported by
the modules that use them (the model registry, the layer table, pruning, the analysis), so `nps --help` lists them
without importing torch or numpy."""

CIFAR_MODELS = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")
"""The CIFAR ResNets of :mod:`nps.pipeline.network.models` (He et al. 2016, 3 stages of basic blocks)."""

TESTED_TORCHVISION = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "resnext50_32x4d",
    "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "efficientnet_b1",
    "efficientnet_b2", "efficientnet_b3", "mnasnet0_5", "mnasnet1_0", "regnet_x_400mf", "regnet_y_400mf",
    "regnet_y_1_6gf", "convnext_tiny", "densenet121",
)
"""torchvision models whose layer tables, pruning and complexity the test suite checks."""

FLOPS_CONVENTIONS = ("macs", "paper")
"""``macs``: conv and linear multiply-accumulates; ``paper``: ptflops' count (see the layer table)."""

CRITERIA = ("l2", "l1", "fpgm", "random")
"""Filter-importance criteria (:mod:`nps.pipeline.network.prune`)."""

DEFAULT_EDF_POINTS = 200
DEFAULT_BOOTSTRAP = 1000
DEFAULT_BAND = (2.5, 97.5)
