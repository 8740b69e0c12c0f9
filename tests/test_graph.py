"""The layer table's closed forms against an independent counter on physically pruned models."""
import h5py
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nps.pipeline.errors import NpsError
from nps.pipeline.graph import MODES, LayerTable, build_layer_table, feasible_range, resnet_layout, \
    table_from_model
from nps.pipeline.models import MODELS, build_model
from nps.pipeline.prune import prune_model

torch.set_num_threads(1)

CIFAR = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")
BIG = ("resnet101", "resnet152", "wide_resnet50_2")


def resolution_for(name: str) -> int:
    return 32 if name in CIFAR else 64


def counted(model: nn.Module, resolution: int, in_channels: int = 3) -> tuple[int, int, set]:
    """(MACs by FlopCounterMode, params, the ops it counted) of one batch-1 forward pass on the meta device."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.empty(1, in_channels, resolution, resolution, device="meta"))
    flops = counter.get_total_flops()
    assert flops % 2 == 0
    ops = {str(op) for op in counter.get_flop_counts()["Global"]}
    return flops // 2, sum(p.numel() for p in model.parameters()), ops


def sample_keeps(table: LayerTable, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    recipes = [np.zeros(len(table)), np.full(len(table), 0.95)]
    recipes += [rng.uniform(0.0, rng.uniform(0.1, 1.0), len(table)) for _ in range(count - 2)]
    return table.keep(np.array(recipes))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(MODELS))
def test_closed_form_matches_flop_counter_on_pruned_models(name, mode):
    resolution = resolution_for(name)
    table = build_layer_table(name, mode, resolution, num_classes=10)
    with torch.device("meta"):
        model = build_model(name, num_classes=10)
    # The random criterion reads no weights, so the whole check runs on shapes only (meta device).
    keeps = sample_keeps(table, 4 if name in BIG else 6 if name == "resnet110" else 10, seed=len(name))
    closed_flops, closed_params = table.flops(keeps), table.params(keeps)
    for keep, flops, params in zip(keeps, closed_flops, closed_params):
        pruned = prune_model(model, table, keep, criterion="random")
        got_flops, got_params, ops = counted(pruned, resolution)
        assert ops == {"aten.convolution", "aten.addmm"}  # exactly conv and linear layers
        assert got_flops == flops
        assert got_params == params
    base_flops, base_params, _ = counted(model, resolution)
    assert (table.base_flops, table.base_params) == (base_flops, base_params)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(MODELS))
def test_members_are_convs_and_every_layer_is_covered(name, mode):
    table = build_layer_table(name, mode, resolution_for(name), num_classes=10)
    with torch.device("meta"):
        model = build_model(name, num_classes=10)
    modules = dict(model.named_modules())
    assert table.channels.dtype == np.int64 and len(table.channels) == len(table.names) == len(table.members)
    assert len(set(table.names)) == len(table.names)
    seen = []
    for channels, members in zip(table.channels, table.members):
        assert members
        for member in members:
            assert isinstance(modules[member], nn.Conv2d)
            assert modules[member].out_channels == channels
        seen += members
    assert len(seen) == len(set(seen))
    layout = resnet_layout(model, mode)
    weighted = {n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert [slot.conv for slot in layout.slots].count("fc") == 1
    assert {slot.conv for slot in layout.slots} == weighted and len(layout.slots) == len(weighted)
    if mode == "internal":
        assert all(".conv1" in m or ".conv2" in m for m in seen)
        assert not any("conv3" in m or "downsample" in m or m == "conv1" for m in seen)


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
    assert t50.members[0] == ["conv1"]
    assert len(build_layer_table("resnet50", "internal", 64, 10)) == 32
    t56 = build_layer_table("resnet56", "all", 32, 10)
    assert len(t56) == 30 and t56.names[0] == "conv1+layer1.residual" and len(t56.members[0]) == 10


def test_grey_input_and_odd_resolution():
    table = build_layer_table("resnet18", "all", 28, num_classes=10, in_channels=1)
    with torch.device("meta"):
        model = build_model("resnet18", num_classes=10, in_channels=1)
    for keep in sample_keeps(table, 4, seed=1):
        flops, params, _ = counted(prune_model(model, table, keep, criterion="random"), 28, in_channels=1)
        assert (flops, params) == (table.flops(keep), table.params(keep))


def test_table_from_real_model_equals_registry_table():
    model = build_model("resnet20", num_classes=10)
    was = model.training
    assert table_from_model(model, "resnet20", "all", 32, 10, 3) == build_layer_table("resnet20", "all", 32, 10)
    assert model.training == was


def test_resnet50_uniform_half_matches_paper(capsys):
    # Paper §3.1: uniform r = 0.5 on ResNet-50 (CIFAR-10 at 224) "reduces 74.1% FLOPs (c_flops = 0.259)".
    # Counting conv + linear MACs gives 0.2572; counters that also count BN (2/element) and ReLU (1/element)
    # give 0.2591, the paper's figure. All channel counts are even, so no rounding is involved.
    table = build_layer_table("resnet50", "all", 224, num_classes=10)
    keep = table.keep(np.full(len(table), 0.5))
    assert np.array_equal(keep * 2, table.channels)
    c_flops = float(table.c_flops(keep))
    assert c_flops == pytest.approx(0.25722, abs=1e-5)
    assert abs(c_flops - 0.259) < 0.005
    with capsys.disabled():
        print(f"\nResNet-50 all@224, uniform r=0.5: c_flops={c_flops:.4f} c_params={float(table.c_params(keep)):.4f} "
              f"mCB={float(table.mcb(keep)):.4f} (paper: 0.259)")


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
        assert table.c_flops(keeps)[row] == table.c_flops(keep) == table.flops(keep) / table.base_flops
        assert table.c_params(keeps)[row] == table.params(keep) / table.base_params
        assert table.mcb(keeps)[row] == pytest.approx(
            (table.flops(keep) / table.params(keep)) / (table.base_flops / table.base_params))
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


@pytest.mark.parametrize("args, match", [
    (("resnet50", "stem", 64, 10), "mode"),
    (("resnet51", "all", 64, 10), "resnet50"),
    (("resnet50", "all", 0, 10), "resolution"),
    (("resnet20", "all", -3, 10), "resolution"),
])
def test_bad_table_requests(args, match):
    with pytest.raises(NpsError, match=match):
        build_layer_table(*args)


@pytest.mark.parametrize("mode", MODES)
def test_hdf5_round_trip(tmp_path, mode):
    table = build_layer_table("resnet50", mode, 224, num_classes=10)
    with h5py.File(tmp_path / "layers.h5", "w") as f:
        table.to_hdf5(f.create_group("layers"))
    with h5py.File(tmp_path / "layers.h5", "r") as f:
        group = f["layers"]
        assert group.attrs["mode"] == mode and int(group.attrs["base_flops"]) == table.base_flops
        assert group["flops_pair_w"].dtype == np.int64
        loaded = LayerTable.from_hdf5(group)
    assert loaded == table
    assert loaded.names == table.names and loaded.members == table.members
    assert loaded.channels.dtype == np.int64 and loaded.flops.linear.dtype == np.int64
    keeps = sample_keeps(table, 5, seed=9)
    assert np.array_equal(loaded.flops(keeps), table.flops(keeps))
    assert np.array_equal(loaded.params(keeps), table.params(keeps))
