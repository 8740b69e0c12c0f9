import pytest
import torch
from torch import nn

from nps.pipeline.errors import NpsError
from nps.pipeline.models import MODELS, build_model, register

torch.set_num_threads(1)

TORCHVISION = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2")
CIFAR = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")

# torchvision's documented parameter counts (1000 classes); CIFAR ones with 1x1-conv shortcuts (option B).
GOLDEN_PARAMS = {
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "resnet101": 44_549_160,
    "resnet152": 60_192_808, "wide_resnet50_2": 68_883_240,
    "resnet20": 272_474, "resnet32": 466_906, "resnet44": 661_338, "resnet56": 855_770, "resnet110": 1_730_714,
}


def test_registry_lists_every_family():
    assert set(MODELS) == set(TORCHVISION) | set(CIFAR)


@pytest.mark.parametrize("name", list(MODELS))
def test_param_counts_and_output_shape(name):
    classes = 1000 if name in TORCHVISION else 10
    with torch.device("meta"):  # shapes only: no weights are allocated or initialised
        model = build_model(name, num_classes=classes)
    assert sum(p.numel() for p in model.parameters()) == GOLDEN_PARAMS[name]
    resolution = 64 if name in TORCHVISION else 32
    out = model.eval()(torch.empty(2, 3, resolution, resolution, device="meta"))
    assert out.shape == (2, classes)


@pytest.mark.parametrize("name", ["resnet18", "resnet20"])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_real_forward_any_classes_and_input_channels(name, in_channels):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=in_channels).eval()
    assert model.conv1.in_channels == in_channels
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, 28, 28))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("depth", [20, 56, 110])
def test_cifar_resnet_structure(depth):
    with torch.device("meta"):
        model = build_model(f"resnet{depth}", num_classes=10)
    n = (depth - 2) // 6
    assert not hasattr(model, "maxpool") and not hasattr(model, "layer4")
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.out_channels == 16
    modules = dict(model.named_modules())
    for stage, width in ((1, 16), (2, 32), (3, 64)):
        layer = getattr(model, f"layer{stage}")
        assert len(layer) == n
        assert all(block.conv2.out_channels == width for block in layer)
        assert layer[0].conv1.stride == ((1, 1) if stage == 1 else (2, 2))
        has_shortcut = [block.downsample is not None for block in layer]
        assert has_shortcut == [stage > 1] + [False] * (n - 1)
    for name in ("layer2.0.downsample.0", "layer2.0.downsample.1", "layer3.0.conv2", "layer3.0.bn2", "fc"):
        assert name in modules
    assert isinstance(modules["layer2.0.downsample.0"], nn.Conv2d)
    assert modules["layer2.0.downsample.0"].kernel_size == (1, 1)
    # 6n + 2 weighted layers: the stem, 2 convs per block, the classifier.
    convs = [m for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and "downsample" not in name]
    assert len(convs) + 1 == depth


def test_unknown_model_names_the_known_ones():
    with pytest.raises(NpsError, match="resnet50") as info:
        build_model("resnet51")
    assert "resnet51" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs", [{"num_classes": 0}, {"in_channels": 0}, {"num_classes": 2.5}])
def test_bad_sizes_rejected(kwargs):
    with pytest.raises(NpsError):
        build_model("resnet20", **kwargs)


def test_register_adds_to_live_listing():
    from nps.pipeline import models

    def tiny_test_resnet(num_classes=10, in_channels=3):
        return models.CifarResNet(8, num_classes, in_channels)

    register(tiny_test_resnet)
    try:
        assert "tiny_test_resnet" in MODELS
        assert build_model("tiny_test_resnet", num_classes=3).fc.out_features == 3
        with pytest.raises(ValueError):
            register(tiny_test_resnet)
    finally:
        del models._REGISTRY["tiny_test_resnet"]
