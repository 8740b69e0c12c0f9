"""Weight tables (magnitude weight pruning): closed-form FLOPs/params against independent counters on masked models,
magnitude masks, the global threshold, and the samplers on weight tables."""
import copy
import io

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nps.kernels.complexity import keep_from_recipe
from nps.kernels.samplers import sample_space
from nps.kernels.spaces import parse_space, uniform_baseline
from nps.pipeline.errors import NpsError
from nps.pipeline.network.layer_table import LayerTable, build_layer_table
from nps.pipeline.network.models import build_model
from nps.pipeline.network.weight_table import (
    build_weight_table,
    global_keep,
    masks_from_keep,
    prunable_layers,
    sparsity,
    weight_table_from_model,
)

torch.set_num_threads(1)

RES = 64  # every architecture below runs at 64 px (ConvNeXt needs >= 32)
PTFLOPS = {"as_strings": False, "print_per_layer_stat": False, "backend": "pytorch",
           "backend_specific_config": {"count_functional": False}}


# ---------------------------------------------------------------------------------------------- independent oracles

def weight_layers(model):
    """(name, module) of the conv and linear layers, found here independently of the module under test."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def flop_counter_positions(model, resolution=RES):
    """(dense MACs, {layer: MACs per weight}) from torch's FlopCounterMode, per module, on the meta device."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.empty(1, 3, resolution, resolution, device="meta"))
    per_module = counter.get_flop_counts()
    root = type(model).__name__
    positions = {}
    for name, m in weight_layers(model):
        flops = sum(per_module.get(f"{root}.{name}", {}).values())
        assert flops % (2 * m.weight.numel()) == 0
        positions[name] = flops // (2 * m.weight.numel())
    total = counter.get_total_flops()
    assert total % 2 == 0
    return total // 2, positions


def ptflops_per_layer(model, resolution=RES):
    """ptflops' own count per module (its hooks), and its total (as get_model_complexity_info reports it)."""
    ptflops = pytest.importorskip("ptflops")
    from ptflops.pytorch_engine import add_flops_counting_methods

    total, params = ptflops.get_model_complexity_info(model, (3, resolution, resolution), **PTFLOPS)
    net = add_flops_counting_methods(model)
    net.eval()
    net.start_flops_count(ost=io.StringIO(), verbose=False, ignore_list=[])
    outputs = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: outputs.__setitem__(n, out.shape))
             for n, m in weight_layers(model)]
    with torch.no_grad():
        net(torch.empty(1, 3, resolution, resolution, device="meta"))
    per_layer = {n: int(m.__flops__) for n, m in weight_layers(model) if hasattr(m, "__flops__")}
    net.stop_flops_count()
    for h in hooks:
        h.remove()
    return total, params, per_layer, outputs


def real_model(name, seed=0):
    """``name`` with real weights: every conv/linear weight drawn from N(0, 1) (no zeros, no ties)."""
    model = build_model(name, num_classes=10)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in weight_layers(model):
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen))
    return model.eval()


def masked(model, masks):
    with torch.no_grad():
        for name, m in model.named_modules():
            if name in masks:
                m.weight.mul_(masks[name].to(m.weight.dtype))
    return model


def nonzero_weights(model):
    return {n: int(torch.count_nonzero(m.weight)) for n, m in weight_layers(model)}


def masked_params(model):
    """Params of a masked model: the nonzeros of conv/linear weights, every other parameter in full."""
    weights = {id(m.weight) for _, m in weight_layers(model)}
    return sum(int(torch.count_nonzero(p)) if id(p) in weights else p.numel() for p in model.parameters())


def random_keeps(table, count, seed):
    rng = np.random.default_rng(seed)
    recipes = [np.zeros(len(table)), np.full(len(table), 0.999)]
    recipes += [rng.uniform(0.0, rng.uniform(0.2, 1.0), len(table)) for _ in range(count - 2)]
    return table.keep(np.array(recipes))


# ----------------------------------------------------------------------------------------------------- the tables

ARCHS = [pytest.param("resnet50", marks=pytest.mark.zoo), "mobilenet_v2", "efficientnet_b0", "timm:fbnetv3_b",
         pytest.param("convnext_tiny", marks=pytest.mark.zoo)]


@pytest.mark.parametrize("name", ARCHS)
def test_closed_forms_match_independent_counts_on_masked_models(name):
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    pytest.importorskip("ptflops")
    macs, paper = (build_weight_table(name, RES, 10, flops=f) for f in ("macs", "paper"))
    meta = build_model(name, num_classes=10, device="meta")
    dense_macs, positions = flop_counter_positions(meta)
    pt_total, pt_params, pt_layer, outputs = ptflops_per_layer(meta)
    layers = weight_layers(meta)

    # the table: every conv and linear weight in module order, one layer per "group", linear forms
    assert macs.names == [n for n, _ in layers] == [n for n, _ in prunable_layers(meta)]
    assert macs.members == [[n] for n in macs.names] and macs.mode == "weights"
    assert macs.channels.tolist() == [m.weight.numel() for _, m in layers]
    assert np.all(macs.granularity == 1) and len(macs.flops.pair_w) == len(macs.params.pair_w) == 0
    assert macs.flops.linear.tolist() == [positions[n] for n in macs.names] == paper.flops.linear.tolist()
    assert macs.flops.const == 0 and macs.params == paper.params
    for f in ("macs", "paper"):  # the same dense counts as filter pruning
        t = build_layer_table(name, "all", RES, 10, flops=f)
        w = macs if f == "macs" else paper
        assert (w.base_flops, w.base_params) == (t.base_flops, t.base_params)
    assert (macs.base_flops, macs.base_params) == (dense_macs, sum(p.numel() for p in meta.parameters()))
    assert paper.base_params == pt_params

    # paper convention: ptflops counts numel(weight) · output positions per conv/linear, plus the bias adds
    # (out_channels per position): a weight costs its layer's positions, the bias terms are constant
    skipped = 0  # conv/linear subclasses ptflops' exact-type hooks miss (timm's Linear) count in nps' convention
    for n, m in layers:
        if n not in pt_layer:
            skipped += m.weight.numel() * positions[n]
            continue
        bias = outputs[n].numel() if m.bias is not None else 0
        assert pt_layer[n] == m.weight.numel() * positions[n] + bias, n
    assert paper.base_flops == pt_total + skipped

    model = real_model(name)
    for keep in random_keeps(macs, 4, seed=len(name)):
        model_k = masked(copy.deepcopy(model), masks_from_keep(model, macs, keep))
        nnz = nonzero_weights(model_k)
        assert [nnz[n] for n in macs.names] == keep.tolist()
        zeroed = sum((m.weight.numel() - nnz[n]) * positions[n] for n, m in layers)
        assert int(macs.flops_of(keep)) == dense_macs - zeroed
        assert int(paper.flops_of(keep)) == pt_total + skipped - zeroed
        assert int(macs.params_of(keep)) == int(paper.params_of(keep)) == masked_params(model_k)


def test_table_api_and_hdf5_round_trip(tmp_path):
    table = build_weight_table("mobilenet_v2", RES, 10, flops="paper")
    assert table.names[0] == "features.0.0" and table.names[-1] == "classifier.1"  # stem and classifier included
    named = dict(build_model("mobilenet_v2", num_classes=10, device="meta").named_modules())
    assert any(named[n].groups == named[n].in_channels > 1 for n in table.names if isinstance(named[n], nn.Conv2d))
    keep = table.keep(np.full(len(table), 0.75))
    assert np.array_equal(keep, np.maximum(1, np.floor(0.25 * table.channels + 0.5)))
    assert np.allclose(sparsity(keep, table), 1 - keep / table.channels)
    assert float(table.c_params(table.channels)) == 1.0 == float(table.c_flops(table.channels))
    with h5py.File(tmp_path / "t.h5", "w") as f:
        table.to_hdf5(f.create_group("weights"))
    with h5py.File(tmp_path / "t.h5", "r") as f:
        back = LayerTable.from_hdf5(f["weights"])
    assert back == table and back.mode == "weights" and back.flops_convention == "paper"
    assert np.array_equal(back.flops_of(keep), table.flops_of(keep))
    with pytest.raises(NpsError, match="convention"):
        build_weight_table("mobilenet_v2", RES, 10, flops="gmacs")
    with pytest.raises(NpsError, match="resolution"):
        build_weight_table("mobilenet_v2", 0, 10)


# ------------------------------------------------------------------------------------------------- magnitude masks

class Tiny(nn.Module):
    """A stem conv, a depthwise conv and a classifier, with heavily tied weights (a few magnitudes, zeros too)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 10)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for m in (self.stem, self.dw, self.fc):
                m.weight.copy_(torch.randint(-3, 4, m.weight.shape, generator=gen) / 4.0)

    def forward(self, x):
        x = self.dw(torch.relu(self.stem(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_masks_keep_exactly_the_largest_weights():
    model = real_model("mobilenet_v2")
    table = weight_table_from_model(model, "mobilenet_v2", RES, 10, 3)
    named = dict(model.named_modules())
    for keep in random_keeps(table, 3, seed=5):
        masks = masks_from_keep(model, table, keep)
        for name, k in zip(table.names, keep):
            w, mask = named[name].weight.detach().abs(), masks[name]
            assert mask.dtype == torch.bool and mask.shape == w.shape and int(mask.sum()) == k
            if k < w.numel():
                assert w[mask].min() >= w[~mask].max()


def test_masks_break_ties_by_flat_index():
    model = Tiny()
    table = weight_table_from_model(model, "tiny", 8, 10, 3)
    assert table.names == ["stem", "dw", "fc"]
    assert table.flops.linear.tolist() == [64, 64, 1] and table.params.const == 8 + 10  # dw and fc biases
    for keep in random_keeps(table, 6, seed=2):
        masks = masks_from_keep(model, table, keep)
        for name, k in zip(table.names, keep):
            flat = dict(model.named_modules())[name].weight.detach().abs().flatten()
            expected = torch.zeros_like(flat, dtype=torch.bool)
            expected[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
            assert torch.equal(masks[name].flatten(), expected)
    with pytest.raises(NpsError, match="must lie in"):
        masks_from_keep(model, table, [0, 1, 1])


# ----------------------------------------------------------------------------------------------- global threshold

def reference_global_keep(model, table, target, value):
    """The closest prefix of all weights sorted by magnitude (stable: table order, flat index), each layer's largest
    kept first: a full sort and every prefix's cost, the slow obvious way."""
    form, base = (table.flops, table.base_flops) if target == "c_flops" else (table.params, table.base_params)
    named = dict(model.named_modules())
    mags, layer = [], []
    for i, name in enumerate(table.names):
        ordered = torch.sort(named[name].weight.detach().abs().flatten(), descending=True, stable=True).values
        mags.append(ordered[1:].numpy())
        layer.append(np.full(len(ordered) - 1, i))
    order = np.argsort(-np.concatenate(mags), kind="stable")
    layer = np.concatenate(layer)[order]
    values = form.const + form.linear.sum() + np.concatenate([[0], np.cumsum(form.linear[layer])])
    best = int(np.argmin(np.abs(values / base - value)))
    return 1 + np.bincount(layer[:best], minlength=len(table))


def assert_single_threshold(model, table, keep):
    """Every kept weight (but each layer's forced largest one) is >= every pruned weight, across layers."""
    masks = masks_from_keep(model, table, keep)
    kept_min, pruned_max = np.inf, -np.inf
    for name, mask in masks.items():
        w = dict(model.named_modules())[name].weight.detach().abs().flatten()
        m = mask.flatten().clone()
        m[int(torch.argmax(w))] = False  # the forced weight
        if m.any():
            kept_min = min(kept_min, float(w[m].min()))
        if (~mask.flatten()).any():
            pruned_max = max(pruned_max, float(w[~mask.flatten()].max()))
    assert kept_min >= pruned_max


@pytest.mark.parametrize("name,flops", [("mobilenet_v2", "macs"), ("efficientnet_b0", "paper")])
def test_global_keep_is_one_threshold_closest_to_the_target(name, flops):
    model = real_model(name, seed=3)
    table = weight_table_from_model(model, name, RES, 10, 3, flops=flops)
    for target, value in (("c_flops", 0.25), ("c_params", 0.1), ("c_flops", 0.05)):
        keep = global_keep(model, table, target, value, 0.002)
        achieved = float(table.c_flops(keep) if target == "c_flops" else table.c_params(keep))
        assert abs(achieved - value) <= 0.002
        assert np.array_equal(keep, reference_global_keep(model, table, target, value))
        assert_single_threshold(model, table, keep)
    with pytest.raises(NpsError, match="cannot reach c_flops=1e-06"):
        global_keep(model, table, "c_flops", 1e-6, 1e-6)
    with pytest.raises(NpsError, match="target"):
        global_keep(model, table, "latency", 0.5, 0.01)


def test_global_keep_with_tied_magnitudes():
    model = Tiny()
    table = weight_table_from_model(model, "tiny", 8, 10, 3)
    for target in ("c_flops", "c_params"):
        for value in np.linspace(0.05, 1.0, 20):
            reference = reference_global_keep(model, table, target, value)
            achieved = float(table.c_flops(reference) if target == "c_flops" else table.c_params(reference))
            keep = global_keep(model, table, target, value, 0.5)
            assert np.array_equal(keep, reference), (target, value)
            assert abs(achieved - value) <= 0.5
            assert_single_threshold(model, table, keep)


# ---------------------------------------------------------------------------------------- samplers on weight tables

@pytest.mark.parametrize("name", ["resnet50", "efficientnet_b0"])
def test_samplers_on_weight_tables(name):
    table = build_weight_table(name, RES, 10)
    for space_name, target, value in (("weights:std-0.05", "c_flops", 0.25), ("std-0.05", "c_params", 0.25)):
        space = parse_space(space_name, target, value)
        s = sample_space(table, space, 2000, seed=1)
        assert len(s) == 2000 and len(np.unique(s.keep, axis=0)) == 2000
        keep = keep_from_recipe(s.recipe, table.channels)
        assert np.array_equal(keep, s.keep)
        c = table.c_flops(keep) if target == "c_flops" else table.c_params(keep)
        assert np.all(np.abs(c - value) <= space.delta)
        std = s.recipe.std(axis=1)
        assert s.recipe.min() >= 0 and s.recipe.max() <= space.R
        assert std.min() >= space.std_band[0] and std.max() <= space.std_band[1]
        ratio, units, achieved = uniform_baseline(table, target, value)
        assert np.array_equal(units, table.keep(np.full(len(table), ratio)))
        assert abs(achieved - value) <= space.delta
        assert achieved == float(table.c_flops(units) if target == "c_flops" else table.c_params(units))
