"""Layer tables from the fx graph: groups, modes, granularity and the closed forms against independent counters."""
import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from archs import ALL_ARCHS, BIG, OTHERS, REPRESENTATIVE, counted, resolution_for, sample_keeps
from torch import nn

from nps.pipeline.errors import NpsError
from nps.pipeline.network.channel_graph import UnsupportedPattern
from nps.pipeline.network.layer_table import MODES, LayerTable, build_layer_table, feasible_range, table_from_model
from nps.pipeline.network.models import CIFAR_MODELS, build_model
from nps.pipeline.network.prune import prune_model

torch.set_num_threads(1)

GOLDEN = Path(__file__).parent / "data" / "resnet_tables_v1.json"


def _digest(table: LayerTable) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([table.names, table.members, table.channels.tolist(), table.base_flops,
                         table.base_params]).encode())
    for f in (table.flops, table.params):
        h.update(json.dumps([f.const, f.linear.tolist(), f.pair_a.tolist(), f.pair_b.tolist(),
                             f.pair_w.tolist()]).encode())
    return h.hexdigest()


@pytest.mark.zoo
def test_resnet_tables_equal_the_resnet_walkers():
    # Digests of the tables the ResNet-only walker built (nps before the graph mechanism): groups, channel counts,
    # members and both forms are unchanged, so results files written then stay valid.
    golden = json.loads(GOLDEN.read_text())
    assert len(golden) == 44
    for key, digest in golden.items():
        name, mode, resolution, in_channels = key.split("/")
        table = build_layer_table(name, mode, int(resolution), 10, int(in_channels))
        assert _digest(table) == digest, key
        assert np.all(table.granularity == 1)


def _fast_then_slow(names):
    """The representative architectures in the default run, the others with ``-m slow``."""
    return [n for n in names if n in REPRESENTATIVE or n in ("resnet56", "resnet50")] + \
        [pytest.param(n, marks=pytest.mark.slow) for n in names if n in OTHERS and n not in ("resnet56", "resnet50")]


@pytest.mark.zoo
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", _fast_then_slow(ALL_ARCHS))
def test_closed_form_matches_flop_counter_on_pruned_models(name, mode):
    resolution = resolution_for(name)
    table = build_layer_table(name, mode, resolution, num_classes=10)
    model = build_model(name, num_classes=10, device="meta")
    # The random criterion reads no weights, so the whole check runs on shapes only (meta device).
    keeps = sample_keeps(table, 4 if name in BIG else 8, seed=len(name))
    for keep, flops, params in zip(keeps, table.flops_of(keeps), table.params_of(keeps)):
        pruned = prune_model(model, table, keep, criterion="random")
        assert counted(pruned, resolution) == (flops, params)
    assert (table.base_flops, table.base_params) == counted(model, resolution)


@pytest.mark.zoo
@pytest.mark.parametrize("name", _fast_then_slow(ALL_ARCHS))
def test_paper_convention_matches_ptflops_on_pruned_models(name):
    ptflops = pytest.importorskip("ptflops")
    resolution = resolution_for(name)
    table = build_layer_table(name, "all", resolution, num_classes=10, flops="paper")
    model = build_model(name, num_classes=10, device="meta")

    def count(m):
        return ptflops.get_model_complexity_info(m, (3, resolution, resolution), as_strings=False,
                                                 print_per_layer_stat=False, backend="pytorch",
                                                 backend_specific_config={"count_functional": False})

    assert count(model) == (table.base_flops, table.base_params)
    for keep in sample_keeps(table, 3 if name in BIG else 5, seed=7):
        assert count(prune_model(model, table, keep, criterion="random")) == (table.flops_of(keep),
                                                                              table.params_of(keep))


def test_resnet50_uniform_half_in_both_conventions(capsys):
    # Paper Table 1: ResNet-50 (ImageNet, 224 px) has 4.12 G FLOPs, ptflops' count; conv + linear MACs are 4.09 G.
    imagenet = [build_layer_table("resnet50", "all", 224, num_classes=1000, flops=f) for f in ("macs", "paper")]
    assert [t.base_flops for t in imagenet] == [4_089_184_256, 4_121_925_096]
    # Paper §3.1 (CIFAR-10 at 224): uniform r = 0.5 "reduces 74.1% FLOPs (c_flops = 0.259)". conv + linear MACs give
    # 0.2572; ptflops' count (BN 2/element, ReLU and pooling 1/element) gives 0.2591.
    macs = build_layer_table("resnet50", "all", 224, num_classes=10)
    paper = build_layer_table("resnet50", "all", 224, num_classes=10, flops="paper")
    assert macs.names == paper.names and macs.params == paper.params
    keep = macs.keep(np.full(len(macs), 0.5))
    assert np.array_equal(keep * 2, macs.channels)  # every count is even: no rounding involved
    assert float(macs.c_flops(keep)) == pytest.approx(0.25722, abs=1e-5)
    assert float(paper.c_flops(keep)) == pytest.approx(0.25915, abs=1e-5)
    with capsys.disabled():
        print(f"\nResNet-50 all@224 uniform r=0.5: c_flops {float(macs.c_flops(keep)):.4f} (macs), "
              f"{float(paper.c_flops(keep)):.4f} (paper; the paper says 0.259)")


def test_group_structure_resnet18_and_resnet50():
    t18 = build_layer_table("resnet18", "all", 64, 10)
    assert len(t18) == 1 + 3 + 8  # stem tied to layer1, layer2..4 streams, one conv per block
    assert t18.names[0] == "conv1+layer1.residual"
    assert t18.members[0] == ["conv1", "layer1.0.conv2", "layer1.1.conv2"]
    assert t18.members[t18.names.index("layer2.residual")] == ["layer2.0.conv2", "layer2.0.downsample.0",
                                                               "layer2.1.conv2"]
    assert len(build_layer_table("resnet18", "internal", 64, 10)) == 8
    t50 = build_layer_table("resnet50", "all", 64, 10)
    assert len(t50) == 1 + 4 + 32 and t50.names[:3] == ["conv1", "layer1.residual", "layer1.0.conv1"]
    assert len(build_layer_table("resnet50", "internal", 64, 10)) == 32


def _table(name, mode="all", resolution=64, **kw):
    return build_layer_table(name, mode, resolution, 10, **kw)


def test_inverted_residuals_depthwise_and_squeeze_excitation():
    t = _table("mobilenet_v2")
    expanded = t.names.index("features.2.conv.0.0")
    # the expand conv and the depthwise conv write the expanded channels; the project conv reads them
    assert t.members[expanded] == ["features.2.conv.0.0", "features.2.conv.1.0"]
    assert t.names[t.names.index("features.2-3.residual")] == "features.2-3.residual"
    assert t.members[t.names.index("features.2-3.residual")] == ["features.2.conv.2", "features.3.conv.2"]
    internal = _table("mobilenet_v2", "internal")
    assert set(internal.names) < set(t.names)
    assert all(name.endswith("conv.0.0") for name in internal.names)  # the expanded channels only
    e = _table("efficientnet_b0")
    i = e.names.index("features.2.0.block.0.0")
    # expand conv, depthwise conv and the squeeze-excitation gate (fc2) all write the expanded channels
    assert e.members[i] == ["features.2.0.block.0.0", "features.2.0.block.1.0", "features.2.0.block.2.fc2"]
    assert "features.2.0.block.2.fc1" in _table("efficientnet_b0", "internal").names  # the SE bottleneck


def test_grouped_convs_set_the_granularity():
    t = _table("resnext50_32x4d", "internal")
    assert set(t.granularity.tolist()) == {32}  # conv1 and conv2 of each block feed/leave the 32-group conv2
    assert np.all(t.keep(np.full(len(t), 0.37)) % 32 == 0)
    r = _table("regnet_x_400mf", "internal")
    widths = dict(zip(r.names, zip(r.channels, r.granularity)))
    assert widths["trunk_output.block1.block1-0.f.a.0"] == (32, 2)  # group width 16: 2 groups of 16
    assert widths["trunk_output.block4.block4-0.f.b.0"] == (400, 25)
    # units (channels / granularity) are what the samplers draw: 16 per group of a RegNet
    assert set((r.channels // r.granularity).tolist()) == {16}


def test_concat_keeps_each_input_group_and_the_consumer_sees_segments():
    t = _table("densenet121")
    growth = [n for n in t.names if n.startswith("features.denseblock1.") and n.endswith("conv2")]
    assert len(growth) == 6 and all(t.channels[t.names.index(n)] == 32 for n in growth)
    internal = _table("densenet121", "internal")
    assert all(n.endswith(".conv1") for n in internal.names)  # each dense layer's bottleneck
    keep = t.keep(np.full(len(t), 0.5))
    model = build_model("densenet121", 10, device="meta")
    pruned = prune_model(model, t, keep, criterion="random")
    # the last dense layer of block 1 reads the stem's and five growth groups' kept channels, side by side
    conv1 = pruned.features.denseblock1.denselayer6.conv1
    assert conv1.in_channels == keep[t.names.index("features.conv0")] + 5 * 16


def test_layer_scale_and_layer_norm2d_follow_the_stream():
    t = _table("convnext_tiny")
    keep = t.keep(np.full(len(t), 0.5))
    pruned = prune_model(build_model("convnext_tiny", 10, device="meta"), t, keep, criterion="random")
    stream = int(keep[t.names.index("features.0-1.residual")])
    assert pruned.features[1][0].layer_scale.shape == (stream, 1, 1)
    assert pruned.features[0][1].normalized_shape == (stream,)
    assert pruned.features[1][0].block[2].normalized_shape == (stream,)
    assert [n for n in _table("convnext_tiny", "internal").names][:3] == [
        "features.1.0.block.3", "features.1.1.block.3", "features.1.2.block.3"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "densenet121",
                                  "convnext_tiny", "resnet50"])
@pytest.mark.zoo
def test_members_write_the_group_and_names_are_unique(name, mode):
    table = _table(name, mode)
    modules = dict(build_model(name, 10, device="meta").named_modules())
    assert len(set(table.names)) == len(table.names)
    for name_, channels, members in zip(table.names, table.channels, table.members):
        assert members
        for member in members:
            layer = modules[member]
            assert isinstance(layer, (nn.Conv2d, nn.Linear))
            width = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
            assert width == channels


class _Roll(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)

    def forward(self, x):
        return self.conv2(torch.roll(self.conv1(x), 1, dims=1))


class _Slice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(4, 8, 3)

    def forward(self, x):
        return self.conv2(self.conv1(x)[:, :4])


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        y = self.conv(x)
        return y if y.sum() > 0 else -y


@pytest.mark.parametrize("model, match", [
    (lambda: build_model("shufflenet_v2_x0_5", 10, device="meta"), r"stage2\.0\.branch2.*channel shuffle"),
    (_Roll, r"operation roll after layer conv1: 'roll' is not an operation"),
    (_Slice, r"slicing across the channel axis"),
    (_Branchy, r"cannot be traced by torch\.fx"),
])
def test_patterns_nps_cannot_follow_fail_when_the_table_is_built(model, match):
    with pytest.raises(UnsupportedPattern, match=match) as info:
        table_from_model(model(), "custom", "all", 32, 10, 3)
    assert "\n" not in str(info.value)


@pytest.mark.zoo
@pytest.mark.parametrize("name", ALL_ARCHS)
def test_small_inputs(name):
    # 28 px (Fashion-MNIST) works everywhere but where an unpadded downsampling empties a feature map: ConvNeXt's
    # stride-2 2x2 convs (28 -> 7 -> 3 -> 1 -> 0) and DenseNet's 2x2 average pools (28 -> 7 -> 3 -> 1 -> 0).
    if name in ("convnext_tiny", "densenet121"):
        with pytest.raises(NpsError, match="resolution 28"):
            build_layer_table(name, "all", 28, 10, in_channels=1)
        assert len(build_layer_table(name, "all", 32, 10, in_channels=1)) > 0
    else:
        table = build_layer_table(name, "all", 28, 10, in_channels=1)
        assert table.base_flops > 0 and table.in_channels == 1


def test_channel_multiple():
    plain = _table("mobilenet_v2")
    t = _table("mobilenet_v2", channel_multiple=8)
    assert t.names == plain.names and t.base_flops == plain.base_flops and t.base_params == plain.base_params
    # a multiple of gcd(width, 8): MobileNet widths are multiples of 8
    assert np.array_equal(t.granularity, np.gcd(t.channels, 8)) and set(t.granularity.tolist()) == {8}
    keeps = t.keep(np.random.default_rng(0).uniform(0, 0.9, (50, len(t))))
    assert np.all(keeps % 8 == 0) and np.all(keeps >= 8)
    model = build_model("mobilenet_v2", 10, device="meta")
    for keep in keeps[:3]:
        assert counted(prune_model(model, t, keep, criterion="random"), 64) == (t.flops_of(keep), t.params_of(keep))
    e = _table("efficientnet_b0", "internal", channel_multiple=8)
    # the SE bottleneck of 4 channels: gcd(4, 8) = 4, a single unit, so it is not a group any more
    assert "features.2.0.block.2.fc1" in _table("efficientnet_b0", "internal").names
    assert "features.2.0.block.2.fc1" not in e.names
    assert _table("resnext50_32x4d", "internal", channel_multiple=8).granularity.tolist() == [32] * 32
    with pytest.raises(NpsError, match="multiple"):
        t.c_flops(t.channels - 1)


def test_table_build_is_one_shape_only_pass():
    """What keeps a table build fast at 224 px (tools/bench_architectures.py measures its seconds, ``table_s``): the
    network is built without weights and runs once, a batch of one image on the meta device, so no weight is
    allocated and no arithmetic is done; every conv runs exactly once (not once per group or per analysis step)."""
    from torch.fx import Proxy
    from torch.nn.modules import module as torch_module

    for name, resolution in (("efficientnet_b0", 224), ("resnet50", 224)):
        params, calls = [], []
        watch_params = torch_module.register_module_parameter_registration_hook(
            lambda module, _name, param: params.append(param.device.type))
        watch_calls = torch_module.register_module_forward_pre_hook(
            lambda module, args: calls.append((module, args[0])) if not isinstance(args[0], Proxy) else None)
        try:
            table = build_layer_table(name, "all", resolution, 10)
        finally:
            watch_params.remove()
            watch_calls.remove()
        assert params and set(params) == {"meta"}, name
        assert calls and all(x.device.type == "meta" and x.shape[0] == 1 for _, x in calls), name
        assert all(p.device.type == "meta" for module, _ in calls for p in module.parameters()), name
        convs = [module for module, _ in calls if isinstance(module, nn.Conv2d)]
        assert len(convs) == len({id(m) for m in convs}) == conv_count(name), name


def conv_count(name: str) -> int:
    """The convs of the network, counted on the model itself."""
    return sum(isinstance(m, nn.Conv2d) for m in build_model(name, 10, device="meta").modules())


@pytest.mark.parametrize("name, resolution, internal, everything", [
    ("resnet50", 224, 0.1391, 0.00373),
    ("resnet56", 32, 0.0626, 0.00356),
])
def test_feasible_ranges(name, resolution, internal, everything, capsys):
    # internal mode leaves the stem, the shortcut convs and the head at full width (about 0.117 of ResNet-50's
    # MACs), and at R = 0.95 each block's first/last conv keeps 5% of one side: min c_flops 0.139.
    lows = {}
    for mode, expected in (("internal", internal), ("all", everything)):
        table = build_layer_table(name, mode, resolution, num_classes=10)
        low, high = feasible_range(table, 0.95)
        assert high == 1.0 and low == pytest.approx(expected, rel=2e-3)
        assert table.feasible_range(0.95) == (low, high)
        assert feasible_range(table, 0.0) == (1.0, 1.0)
        lows[mode] = low
    with capsys.disabled():
        print(f"\n{name}@{resolution} min c_flops at R=0.95: internal {lows['internal']:.4f}, all {lows['all']:.5f}")


def test_vectorized_metrics_and_keep_rule():
    table = build_layer_table("resnet20", "all", 32, 10)
    keeps = sample_keeps(table, 6, seed=3)
    for row, keep in enumerate(keeps):
        assert table.c_flops(keeps)[row] == table.c_flops(keep) == table.flops_of(keep) / table.base_flops
        assert table.c_params(keeps)[row] == table.params_of(keep) / table.base_params
        assert table.mcb(keeps)[row] == pytest.approx(
            (table.flops_of(keep) / table.params_of(keep)) / (table.base_flops / table.base_params))
    assert table.mcb(table.channels) == 1.0 and table.c_flops(table.channels) == 1.0
    # keep = max(1, round_half_up((1 - r) c)): 16 channels at r = 0.5/32 -> 15.5 -> 16; r = 1 -> 1.
    recipe = np.zeros(len(table))
    recipe[0], recipe[1] = 0.5 / 16, 1.0
    assert table.keep(recipe)[:2].tolist() == [16, 1]


@pytest.mark.parametrize("bad", [np.zeros(3), np.full(12, -0.1), np.full(12, 1.5)])
def test_bad_recipes_rejected(bad):
    table = build_layer_table("resnet20", "all", 32, 10)
    assert len(table) == 12
    with pytest.raises(NpsError):
        table.keep(bad)


def test_bad_keeps_rejected():
    table = build_layer_table("resnet20", "all", 32, 10)
    for keep in (table.channels[:-1], table.channels + 1, np.zeros(len(table), int), table.channels - 0.5):
        with pytest.raises(NpsError):
            table.c_flops(keep)


@pytest.mark.parametrize("args, kwargs, match", [
    (("resnet50", "stem", 64, 10), {}, "mode"),
    (("resnet51", "all", 64, 10), {}, "resnet50"),
    (("resnet50", "all", 0, 10), {}, "resolution"),
    (("resnet20", "all", -3, 10), {}, "resolution"),
    (("resnet20", "all", 32, 10), {"flops": "thop"}, "convention"),
    (("resnet20", "all", 32, 10), {"channel_multiple": 0}, "multiple"),
])
def test_bad_table_requests(args, kwargs, match):
    with pytest.raises(NpsError, match=match):
        build_layer_table(*args, **kwargs)


@pytest.mark.parametrize("name, mode, kw", [("resnet50", "all", {}), ("resnet50", "internal", {}),
                                            ("regnet_y_400mf", "all", {"flops": "paper", "channel_multiple": 8})])
def test_hdf5_round_trip(tmp_path, name, mode, kw):
    table = build_layer_table(name, mode, 64, num_classes=10, **kw)
    with h5py.File(tmp_path / "layers.h5", "w") as f:
        table.to_hdf5(f.create_group("layers"))
    with h5py.File(tmp_path / "layers.h5", "r") as f:
        group = f["layers"]
        assert group.attrs["mode"] == mode and int(group.attrs["base_flops"]) == table.base_flops
        assert group["flops_pair_w"].dtype == np.int64
        loaded = LayerTable.from_hdf5(group)
    assert loaded == table
    assert loaded.flops_convention == kw.get("flops", "macs") and loaded.channel_multiple == kw.get(
        "channel_multiple", 1)
    assert np.array_equal(loaded.granularity, table.granularity)
    keeps = sample_keeps(table, 5, seed=9)
    assert np.array_equal(loaded.flops_of(keeps), table.flops_of(keeps))
    assert np.array_equal(loaded.params_of(keeps), table.params_of(keeps))


def test_tables_written_before_granularity_still_read(tmp_path):
    table = build_layer_table("resnet20", "all", 32, 10)
    with h5py.File(tmp_path / "old.h5", "w") as f:
        table.to_hdf5(f.create_group("layers"))
        del f["layers/granularity"]
        del f["layers"].attrs["flops_convention"], f["layers"].attrs["channel_multiple"]
    with h5py.File(tmp_path / "old.h5", "r") as f:
        assert LayerTable.from_hdf5(f["layers"]) == table


def test_table_from_real_model_equals_registry_table():
    model = build_model("resnet20", num_classes=10)
    was = model.training
    assert table_from_model(model, "resnet20", "all", 32, 10, 3) == build_layer_table("resnet20", "all", 32, 10)
    assert model.training == was
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.parametrize("name", [n for n in CIFAR_MODELS][:2])
def test_grey_input(name):
    table = build_layer_table(name, "all", 28, num_classes=10, in_channels=1)
    model = build_model(name, num_classes=10, in_channels=1, device="meta")
    for keep in sample_keeps(table, 4, seed=1):
        assert counted(prune_model(model, table, keep, criterion="random"), 28, in_channels=1) == \
            (table.flops_of(keep), table.params_of(keep))


def test_paper_presets_count_flops_the_papers_way():
    from nps.pipeline.experiment.config import load_config

    for name in ("paper-cifar10-resnet50", "paper-imagenet-resnet50"):
        assert load_config(name).model.flops == "paper"
    assert load_config("demo").model.flops == "macs" and load_config("demo-mobilenet").model.channel_multiple == 8
