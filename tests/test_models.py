import pytest
import torch
from torch import nn

from nps.pipeline.errors import NpsError
from nps.pipeline.network.models import CIFAR_MODELS, MODELS, TESTED_TORCHVISION, build_model, model_kind, register

torch.set_num_threads(1)

TORCHVISION = TESTED_TORCHVISION
CIFAR = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")

# torchvision's documented parameter counts (1000 classes); CIFAR ones with 1x1-conv shortcuts (option B).
GOLDEN_PARAMS = {
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "resnet101": 44_549_160,
    "resnet152": 60_192_808, "wide_resnet50_2": 68_883_240, "resnext50_32x4d": 25_028_904,
    "mobilenet_v2": 3_504_872, "mobilenet_v3_small": 2_542_856, "mobilenet_v3_large": 5_483_032,
    "efficientnet_b0": 5_288_548, "efficientnet_b1": 7_794_184, "efficientnet_b2": 9_109_994,
    "efficientnet_b3": 12_233_232, "mnasnet0_5": 2_218_512, "mnasnet1_0": 4_383_312, "regnet_x_400mf": 5_495_976,
    "regnet_y_400mf": 4_344_144, "regnet_y_1_6gf": 11_202_430, "convnext_tiny": 28_589_128,
    "densenet121": 7_978_856,
    "resnet20": 272_474, "resnet32": 466_906, "resnet44": 661_338, "resnet56": 855_770, "resnet110": 1_730_714,
}


def test_registry_lists_every_family():
    assert set(MODELS) == set(TORCHVISION) | set(CIFAR) and CIFAR_MODELS == CIFAR
    assert {model_kind(n) for n in TORCHVISION} == {"torchvision"} and model_kind("resnet20") == "registry"
    assert model_kind("timm:resnet10t") == "timm" and model_kind("my.pkg:build") == "callable"
    assert model_kind("vgg11") == "torchvision"  # any torchvision classification model is accepted


@pytest.mark.parametrize("name", list(MODELS))
def test_param_counts_and_output_shape(name):
    classes = 1000 if name in TORCHVISION else 10
    model = build_model(name, num_classes=classes, device="meta")  # shapes only: no weights are allocated
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == GOLDEN_PARAMS[name]
    resolution = 64 if name in TORCHVISION else 32
    out = model.eval()(torch.empty(2, 3, resolution, resolution, device="meta"))
    assert out.shape == (2, classes)


@pytest.mark.parametrize("name", ["resnet18", "resnet20", "mobilenet_v3_small", "regnet_x_400mf"])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_real_forward_any_classes_and_input_channels(name, in_channels):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=in_channels).eval()
    stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert stem.in_channels == in_channels
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
    from nps.pipeline.network import models

    def tiny_test_resnet(num_classes=10, in_channels=3):
        return models.CifarResNet(8, num_classes, in_channels)

    register(tiny_test_resnet)
    try:
        assert model_kind("tiny_test_resnet") == "registry"
        assert build_model("tiny_test_resnet", num_classes=3).fc.out_features == 3
        with pytest.raises(ValueError):
            register(tiny_test_resnet)
    finally:
        del models._REGISTRY["tiny_test_resnet"]


def test_user_models_by_module_and_function(monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    model = build_model("own_models:tiny_cnn", num_classes=5, in_channels=1)
    assert model[-1].out_features == 5 and model[0].in_channels == 1
    for name, match in (("no_such_package_xyz:net", "cannot import no_such_package_xyz"),
                        ("own_models:missing", "has no callable 'missing'"),
                        ("own_models:needs_positional", "must take both keywords"),
                        ("own_models:not_a_module", "not a torch.nn.Module")):
        with pytest.raises(NpsError, match=match) as info:
            build_model(name, num_classes=5, in_channels=1)
        assert "\n" not in str(info.value)


def test_timm_models():
    pytest.importorskip("timm")
    model = build_model("timm:resnet10t", num_classes=4, in_channels=1, device="meta")
    assert model.get_classifier().out_features == 4
    with pytest.raises(NpsError, match="timm:no_such_model"):
        build_model("timm:no_such_model", num_classes=4)
