"""Latency regimes (issue 31): a latency model's per-layer terms as a form over the groups' kept units, and
samples under a c_latency target that meet their band exactly on the integer counts, as FLOPs regimes do."""
from __future__ import annotations

import types

import numpy as np
import pytest

from nps.kernels.errors import SamplerError
from nps.kernels.samplers import sample_naive, sample_space
from nps.kernels.spaces import parse_space, parse_space_key
from nps.pipeline.network.layer_table import LATENCY_UNIT, build_layer_table, with_latency


def fake_model(name: str, resolution: int, seed: int = 0, *, offset: float = 1e-4, scale: float = 1.1):
    """A latency model of ``name`` with random non-negative coefficients (what nps latency-model would fit)."""
    from nps.pipeline.network.models import build_model
    from nps.pipeline.network.trace import analyze

    graph, _ = analyze(build_model(name, num_classes=10, in_channels=1, device="meta"), resolution, 1)
    rng = np.random.default_rng(seed)
    coef = np.abs(rng.normal(size=(len(graph.weight_order), 4))) * np.array([2e-5, 3e-9, 1e-7, 1e-7])
    return types.SimpleNamespace(model=name, resolution=resolution, num_classes=10, in_channels=1,
                                 layers=list(graph.weight_order), coef=coef, scale=scale, offset=offset)


def layer_sum(model, pruned) -> float:
    """offset + scale · Σ over the pruned network's conv and linear layers of the model's term at its real
    channel counts: the prediction the form must reproduce."""
    from torch import nn

    modules = dict(pruned.named_modules())
    total = 0.0
    for i, name in enumerate(model.layers):
        m = modules[name]
        a, b, c, d = model.coef[i]
        if isinstance(m, nn.Conv2d):
            cin, cout, groups = m.in_channels, m.out_channels, m.groups
        else:
            cin, cout, groups = m.in_features, m.out_features, 1
        if isinstance(m, nn.Conv2d) and groups == cin == cout and groups > 1:  # depthwise: a + c·C
            total += a + c * cout
        else:
            total += a + b * cin * cout / groups + c * cout + d * cin
    return model.offset + model.scale * total


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2"])
def test_the_form_is_the_sum_of_the_layer_terms_at_the_pruned_networks_channel_counts(name):
    from nps.pipeline.network.models import build_model
    from nps.pipeline.network.prune import prune_model

    model = fake_model(name, 28)
    table = with_latency(build_layer_table(name, "all", 28, 10, 1), model)
    net = build_model(name, num_classes=10, in_channels=1)
    rng = np.random.default_rng(1)
    for recipe in (np.zeros(len(table)), rng.uniform(0, 0.8, len(table)), rng.uniform(0, 0.95, len(table))):
        keep = table.keep(recipe)
        units = keep // table.granularity
        predicted = float(table.latency(units)) * LATENCY_UNIT
        f = table.latency  # each coefficient rounded to a whole femtosecond moves the value by at most this
        rounding = 0.5 * LATENCY_UNIT * (1 + units.sum() + np.sum(units[f.pair_a] * units[f.pair_b]))
        assert abs(predicted - layer_sum(model, prune_model(net, table, keep))) <= rounding
        assert rounding < 1e-6 * predicted
    assert table.base_latency == table.latency(table.units)
    assert (table.latency.linear >= 0).all() and (table.latency.pair_w >= 0).all()  # monotone: the samplers need it


@pytest.mark.parametrize("space", ["uniform", "std-0.05", "mcb-0.9-1.1"])
def test_a_latency_regime_sample_meets_its_band_exactly_on_the_integer_counts(space):
    table = with_latency(build_layer_table("resnet20", "all", 28, 10, 1), fake_model("resnet20", 28))
    sp = parse_space(space, "c_latency", 0.8, delta=0.002)
    sample = sample_space(table, sp, 2000, seed=3)
    keep = sample.keep // table.granularity
    exact = table.latency(keep) / table.base_latency  # recomputed from the counts, not taken from the sampler
    assert np.all(np.abs(exact - 0.8) <= 0.002) and np.array_equal(exact, sample.c_latency)
    assert np.array_equal(sample.flops, table.flops(keep)) and np.array_equal(sample.params, table.params(keep))
    if sp.mcb_band:
        assert sample.mcb.min() >= 0.9 and sample.mcb.max() <= 1.1
    assert len({k.tobytes() for k in sample.keep}) == 2000  # distinct
    naive, _ = sample_naive(table, sp, 200, seed=3)  # the plain reference sampler agrees on the constraint
    assert len(naive) and np.all(np.abs(naive.c_latency - 0.8) <= 0.002)


def test_what_a_latency_target_refuses():
    table = build_layer_table("resnet20", "all", 28, 10, 1)
    with pytest.raises(SamplerError, match="needs a latency model of resnet20"):
        sample_space(table, parse_space("std-0.05", "c_latency", 0.8), 10)
    with pytest.raises(SamplerError, match="weight pruning keeps every layer's dense shape"):
        parse_space("weights:std-0.05", "c_latency", 0.8)
    with pytest.raises(Exception, match="latency model is of resolution 32"):
        with_latency(table, fake_model("resnet20", 32))
    key = parse_space_key("std-0.05@c_latency=0.7")
    assert key is not None and (key.space, key.target, key.value) == ("std-0.05", "c_latency", 0.7)
