"""The per-layer latency model (``nps latency-model``): the non-negative fits, a real (tiny) measurement whose stated
errors are its own, the layers rebuilt as the traced graph runs them, storage, and the command's one-line errors."""
from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nps.pipeline.errors import NpsError
from nps.pipeline.network.latency_model import (
    LatencyModel,
    fit_layer,
    fit_relative_calibration,
    layer_terms,
    nnls,
    relative_rms,
)

CIN = np.array([2, 4, 8, 12, 16])
COUT = np.array([4, 8, 16, 24, 32])


def grid(cin=CIN, cout=COUT):
    ci, co = np.meshgrid(cin, cout, indexing="ij")
    return ci.ravel().astype(float), co.ravel().astype(float)


def kkt_violation(A: np.ndarray, y: np.ndarray, x: np.ndarray) -> float:
    """How far ``x`` is from the optimum of min ||Ax - y|| over x >= 0, relative to the gradient's scale: the
    gradient must be zero on positive coefficients and non-negative on zero ones."""
    g = A.T @ (A @ x - y)
    scale = np.abs(A.T @ y).max()
    positive = x > 0
    return float(max(np.abs(g[positive]).max(initial=0.0), (-g[~positive]).max(initial=0.0)) / scale)


# -- the fits ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("coef, groups", [((3e-4, 5e-7, 2e-6, 6e-5), 1), ((1e-4, 4e-7, 0.0, 0.0), 1),
                                          ((0.0, 1e-6, 3e-6, 0.0), 4), ((2e-5, 0.0, 1e-6, 4e-6), 2)])
def test_the_fit_recovers_known_non_negative_coefficients(coef, groups):
    cin, cout = grid()
    seconds = layer_terms(cin, cout, groups, False) @ np.array(coef)
    fitted, error = fit_layer(cin, cout, seconds, groups, False)
    np.testing.assert_allclose(fitted, coef, rtol=1e-9, atol=1e-15)
    assert error < 1e-9


def test_a_padded_fit_recovers_a_staircase_in_the_output_count():
    """Times that step with the output count in blocks of 16 (as oneDNN's AVX-512 kernels compute): the padded fit
    recovers the coefficients exactly, the unpadded one cannot."""
    cin, cout = grid(CIN, np.array([2, 6, 10, 16, 20, 26, 32, 40, 48, 58, 64]))
    coef = np.array([3e-5, 2e-7, 1e-6, 4e-6])
    seconds = layer_terms(cin, cout, 1, False, 16) @ coef
    np.testing.assert_allclose(layer_terms(cin, cout, 1, False, 16)[:, 2], 16 * np.ceil(cout / 16))
    fitted, error = fit_layer(cin, cout, seconds, 1, False, 16)
    np.testing.assert_allclose(fitted, coef, rtol=1e-9, atol=1e-15)
    assert error < 1e-9 and fit_layer(cin, cout, seconds, 1, False)[1] > 0.03


def test_a_block_pads_the_conv_layers_whose_fit_it_improves_and_never_a_linear_one():
    from types import SimpleNamespace

    from nps.pipeline.deploy.latency_model import fit_layers

    cin, cout = grid(CIN, np.array([2, 6, 10, 16, 20, 26, 32, 40, 48, 58, 64]))
    coef = np.array([3e-5, 2e-7, 1e-6, 4e-6])
    conv = SimpleNamespace(groups=1, depthwise=False, module=nn.Conv2d(16, 64, 3))
    fc = SimpleNamespace(groups=1, depthwise=False, module=nn.Linear(16, 64))

    def grids(block):
        seconds = layer_terms(cin, cout, 1, False, block) @ coef
        return {"conv": (conv, list(zip(cin, cout, seconds))), "fc": (fc, list(zip(cin, cout, seconds)))}

    fits = fit_layers(grids(16), 16)
    assert fits["conv"][2] and not fits["fc"][2]  # a linear layer stays unpadded
    assert fits["conv"][1] < 1e-9 and fits["fc"][1] > 0.03
    fits = fit_layers(grids(1), 16)  # smooth times: padding would only err more
    assert not fits["conv"][2] and fits["conv"][1] < 1e-9
    fits = fit_layers(grids(16), 1)  # block 1: no padding
    assert not fits["conv"][2] and fits["conv"][1] > 0.03


def test_the_block_is_the_one_that_predicts_the_calibration_networks_best():
    """Two conv layers whose grids (timed alone) step with the output count in blocks of 16: in a network that steps
    the same way the model padded to 16 is kept; in one whose times do not step (what a layer's grid can mislead
    about), the unpadded one, though the grids favour 16; and a block asked for is the one used."""
    from types import SimpleNamespace

    from nps.pipeline.deploy.latency_model import best_model
    from nps.pipeline.results.latency import Timing

    coef = np.array([1e-4, 2e-7, 3e-6, 4e-6])
    cin, cout = grid(np.array([16, 32, 48, 64]), np.array([6, 16, 26, 32, 38, 48, 58, 64]))
    spec = SimpleNamespace(groups=1, depthwise=False, module=nn.Conv2d(1, 1, 1))
    grids = {"k": (spec, list(zip(cin, cout, layer_terms(cin, cout, 1, False, 16) @ coef)))}
    keys = ["k", "k"]

    def make_model(block, fits):
        return LatencyModel("resnet20", "all", 28, 10, 1, "cpu", "cpu: test", 8, 1, "fp32", layers=["a", "b"],
                            groups=[1, 1], depthwise=[False, False], coef=[fits["k"][0]] * 2,
                            fit_error=[fits["k"][1]] * 2, scale=1.0, offset=0.0, network_error=np.nan,
                            calibration={}, base_latency_s=1.0, block=block, padded=[fits["k"][2]] * 2)

    counts = [(64, 64), (40, 40), (33, 17), (50, 29), (21, 45), (60, 9)]  # the base first, then uneven networks
    networks = [(1.0, None, {"a": (64, c_a), "b": (c_a, c_b)}, True) for c_a, c_b in counts]
    for network_block, expect in ((16, 16), (1, 1)):
        t = np.array([sum(layer_terms(ci, co, 1, False, network_block) @ coef for ci, co in ch.values())
                      for _, _, ch, _ in networks])
        pairs = [(x / t[0], 0.01) for x in t[1:]]
        base = Timing(t[0], t[0], t[0], 3, 1)
        kept = best_model(make_model, grids, keys, networks, base, pairs)
        assert kept.block == expect and bool(kept.padded.all()) is (expect > 1)
        other = best_model(make_model, grids, keys, networks, base, pairs, block=17 - expect)  # 16 <-> 1: asked
        assert other.block == 17 - expect and other.network_error > kept.network_error + 0.01
    assert kept.network_error < other.network_error and best_model(make_model, grids, keys, networks, base, pairs,
                                                                   block=8).block == 8


def test_a_depthwise_fit_is_a_plus_c_times_its_channels():
    c = np.array([4.0, 8, 16, 24, 32])
    fitted, error = fit_layer(c, c, 2e-5 + 3e-7 * c, 1, True)
    np.testing.assert_allclose(fitted, [2e-5, 0, 3e-7, 0], rtol=1e-9, atol=1e-15)
    assert error < 1e-9


def test_a_count_that_does_not_vary_puts_its_slope_in_b():
    """The stem's image channels or the classifier's classes: one count fixed, b carries the other's slope."""
    cout = COUT.astype(float)
    fitted, _ = fit_layer(np.full(5, 3.0), cout, 1e-4 + 6e-7 * cout, 1, False)
    np.testing.assert_allclose(fitted, [1e-4, 2e-7, 0, 0], rtol=1e-9, atol=1e-15)
    fitted, _ = fit_layer(np.full(5, 3.0), np.full(5, 10.0), np.full(5, 2e-5), 1, False)
    np.testing.assert_allclose(fitted, [2e-5, 0, 0, 0], rtol=1e-12)


def test_the_fit_never_returns_a_negative_coefficient_where_the_unconstrained_one_would():
    """Times that fall with the input width (and a negative intercept): least squares goes negative, the NNLS fit
    stays at or above zero and is the constrained optimum (the KKT conditions hold)."""
    cin, cout = grid()
    seconds = 4e-4 - 1.5e-5 * cin + 1e-6 * cin * cout + 1e-7 * np.sin(cin * cout)
    A = layer_terms(cin, cout, 1, False)
    w = 1.0 / seconds
    free, *_ = np.linalg.lstsq(A * w[:, None], np.ones_like(seconds), rcond=None)
    assert free.min() < 0
    fitted, error = fit_layer(cin, cout, seconds, 1, False)
    assert fitted.min() >= 0 and np.any(fitted == 0)
    assert kkt_violation(A * w[:, None], np.ones_like(seconds), fitted) < 1e-9
    assert error == pytest.approx(relative_rms(A @ fitted, seconds), rel=1e-12)


def test_nnls_is_the_constrained_optimum_on_random_problems():
    rng = np.random.default_rng(0)
    for _ in range(200):
        A = rng.normal(size=(12, 4))
        y = rng.normal(size=12)
        x = nnls(A, y)
        assert x.min() >= 0
        assert kkt_violation(A, y, x) < 1e-9
        # no feasible neighbour is better
        for _ in range(20):
            other = np.maximum(0.0, x + rng.normal(scale=0.05, size=4))
            assert np.sum((A @ other - y) ** 2) >= np.sum((A @ x - y) ** 2) - 1e-12


def test_the_calibration_from_ratios_to_the_base_recovers_scale_and_offset_and_never_a_negative_offset():
    """Networks timed paired with the base give their ratios c = T / T_base; with T = offset + scale · sum the fit
    recovers both exactly and predicts the base at its measured time; ratios that want a negative offset hold it at
    0; without a pruned network the offset is 0 and the scale puts the base at its time."""
    s, base_sum, scale, offset = np.array([7.0, 4.0, 2.0]) * 1e-3, 10e-3, 1.2, 2e-3
    base_s = offset + scale * base_sum
    got_scale, got_offset = fit_relative_calibration(s, (offset + scale * s) / base_s, base_sum, base_s)
    assert got_scale == pytest.approx(scale, rel=1e-9) and got_offset == pytest.approx(offset, rel=1e-9)
    assert got_offset + got_scale * base_sum == pytest.approx(base_s, rel=1e-12)
    got_scale, got_offset = fit_relative_calibration(s, (1.5 * s - 1e-3) / (1.5 * base_sum - 1e-3), base_sum, 0.01)
    assert got_scale > 0 and got_offset == 0.0
    got_scale, got_offset = fit_relative_calibration([], [], 5e-3, 6e-3)
    assert got_scale == pytest.approx(1.2) and got_offset == 0.0


def test_inputs_are_padded_where_the_calibration_networks_say_so():
    """Two conv layers whose grids (timed alone) step with the output count only, in a network whose timings step
    with the input count too (what the calibration networks show): the model that pads the inputs as well is kept,
    with its own coefficients; where the networks show no input step, the output-only model stays."""
    from types import SimpleNamespace

    from nps.pipeline.deploy.latency_model import calibrated
    from nps.pipeline.results.latency import Timing

    block, coef = 16, np.array([1e-4, 2e-7, 3e-6, 4e-6])
    cin, cout = grid(np.array([16, 32, 48, 64]), np.array([6, 16, 26, 32, 38, 48, 58, 64]))
    alone = layer_terms(cin, cout, 1, False, block) @ coef  # a layer alone: only its output count steps
    spec = SimpleNamespace(groups=1, depthwise=False, module=nn.Conv2d(1, 1, 1))
    grids = {"k": (spec, list(zip(cin, cout, alone)))}
    keys = ["k", "k"]
    fitted, error = fit_layer(cin, cout, alone, 1, False, block)
    model = LatencyModel("resnet20", "all", 28, 10, 1, "cpu", "cpu: test", 8, 1, "fp32", layers=["a", "b"],
                         groups=[1, 1], depthwise=[False, False], coef=[fitted, fitted], fit_error=[error, error],
                         scale=1.0, offset=0.0, network_error=np.nan, calibration={}, base_latency_s=1.0,
                         block=block, padded=[True, True])
    counts = [(64, 64), (40, 40), (33, 17), (50, 29), (21, 45), (60, 9)]  # the base first, then uneven networks
    networks = [(1.0, None, {"a": (64, c_a), "b": (c_a, c_b)}, True) for c_a, c_b in counts]

    def network_seconds(in_block):
        return np.array([sum(layer_terms(ci, co, 1, False, block, in_block) @ coef for ci, co in ch.values())
                         for _, _, ch, _ in networks])

    for in_block, expect in ((block, True), (1, False)):
        t = network_seconds(in_block)
        pairs = [(x / t[0], 0.01) for x in t[1:]]
        kept = calibrated(model, grids, keys, networks, Timing(t[0], t[0], t[0], 3, 1), pairs)
        assert bool(kept.padded_in.all()) is expect and not (kept.padded_in.any() and not expect)
        assert kept.network_error < 1e-9 and kept.network_error <= model.network_error
        assert kept.calibration["predicted_s"][0] == pytest.approx(t[0], rel=1e-9)
    assert not model.padded_in.any()  # the model passed in is left as it was


def test_one_scale_per_term_recovers_networks_that_miss_each_term_in_its_own_proportion():
    """Calibration networks whose times weight the layers' a, b, c and d terms unequally (2, 0.5, 1.5, 0 here, plus
    an offset): the per-term calibration recovers the weights and predicts every network exactly, where one scale
    cannot; with fewer than MIN_PER_TERM_NETWORKS pruned networks the model keeps one scale."""
    from types import SimpleNamespace

    from nps.pipeline.deploy import latency_model as dlm
    from nps.pipeline.results.latency import Timing

    coef = np.array([[1e-4, 2e-7, 3e-6, 4e-6], [2e-4, 1e-7, 1e-6, 5e-6]])
    model = LatencyModel("resnet20", "all", 28, 10, 1, "cpu", "cpu: test", 8, 1, "fp32", layers=["a", "b"],
                         groups=[1, 1], depthwise=[False, False], coef=coef, fit_error=[0.0, 0.0], scale=1.0,
                         offset=0.0, network_error=np.nan, calibration={}, base_latency_s=1.0)
    rng = np.random.default_rng(0)
    counts = [(64, 64)] + [tuple(rng.integers(8, 64, 2)) for _ in range(9)]
    networks = [(1.0, None, {"a": (64, c_a), "b": (c_a, c_b)}, True) for c_a, c_b in counts]
    weights, offset = np.array([2.0, 0.5, 1.5, 0.0]), 3e-4
    t = np.array([offset + sum(layer_terms(ci, co, 1, False) @ (coef[i] * weights)
                               for i, (ci, co) in enumerate(ch.values())) for _, _, ch, _ in networks])
    pairs = [(x / t[0], 0.01) for x in t[1:]]
    base_timing = Timing(t[0], t[0], t[0], 3, 1)
    single = dataclasses.replace(model)
    dlm._calibrate(single, networks, base_timing, pairs)
    kept = dlm._per_term(single, networks, base_timing, pairs)
    assert single.network_error > 0.005 and np.all(single.term_scale == 1.0)  # one scale misses them (0.9 %)
    assert kept.network_error < 1e-9 and kept.scale == 1.0 and kept.offset == 0.0
    assert kept.term_scale[1:] == pytest.approx(weights[1:], rel=1e-6, abs=1e-9)
    # every network has both layers, so their a terms are one constant: its scale carries the offset too
    assert kept.term_scale[0] * coef[:, 0].sum() == pytest.approx(weights[0] * coef[:, 0].sum() + offset, rel=1e-6)
    for (_, _, ch, _), seconds in zip(networks, t):
        assert kept.predict(ch) == pytest.approx(seconds, rel=1e-9)
    few = dlm._per_term(single, networks[:6], base_timing, pairs[:5])
    assert few is single and np.all(few.term_scale == 1.0)


# -- the layers as the network runs them ---------------------------------------------------------------------------


class Mixed(nn.Module):
    """A functional ReLU6 after a BN, a depthwise conv with Hardswish, a grouped conv with GroupNorm and SiLU, a conv
    whose output meets a residual add, and a classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False)
        self.dw_bn = nn.BatchNorm2d(16)
        self.dw_act = nn.Hardswish()
        self.grouped = nn.Conv2d(16, 32, 3, padding=1, groups=4, bias=False)
        self.gn = nn.GroupNorm(8, 32)
        self.act = nn.SiLU()
        self.proj = nn.Conv2d(32, 16, 1, bias=False)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = F.relu6(self.bn(self.stem(x)))
        y = self.dw_act(self.dw_bn(self.dw(x)))
        y = self.proj(self.act(self.gn(self.grouped(y))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y + y, 1), 1))


def test_each_layer_is_rebuilt_with_what_follows_it_and_runs_at_every_grid_point():
    from nps.pipeline.deploy import latency_model as lm
    from nps.pipeline.network.layer_table import table_from_graph
    from nps.pipeline.network.trace import analyze

    model = Mixed()
    graph, gm = analyze(model, 16, 3)
    table = table_from_graph(graph, "mixed", "all", 16, 10, 3)
    specs = {s.name: s for s in lm.layer_specs(model, graph, gm, table)}
    assert list(specs) == graph.weight_order == ["stem", "dw", "grouped", "proj", "fc"]
    stem, dw, grouped, proj, fc = specs.values()
    assert isinstance(stem.norm, nn.BatchNorm2d) and isinstance(stem.act, nn.ReLU6)
    assert isinstance(dw.norm, nn.BatchNorm2d) and isinstance(dw.act, nn.Hardswish) and dw.depthwise
    assert isinstance(grouped.norm, nn.GroupNorm) and isinstance(grouped.act, nn.SiLU) and grouped.groups == 4
    assert proj.norm is None and proj.act is None  # a residual add follows it, not part of the layer
    assert fc.norm is None and fc.act is None
    assert stem.shapes == [(1, 3, 16, 16)] and dw.shapes == [(1, 16, 16, 16)] and grouped.shapes == [(1, 16, 8, 8)]
    assert not stem.vary_in and stem.vary_out and fc.vary_in and not fc.vary_out  # the image, the classes
    assert grouped.step_in == 4 and grouped.step_out == 8  # conv groups; GroupNorm's 8 groups on its outputs
    # the stem's channels run through the depthwise conv into the grouped one: multiples of its 4 groups
    assert stem.step_out == dw.step_out == 4 and dw.grid() == [(4, 4), (8, 8), (12, 12), (16, 16)]
    assert {co for _, co in stem.grid()} == {4, 8, 12, 16} and {ci for ci, _ in stem.grid()} == {3}
    assert len(grouped.grid()) == 16 and all(ci % 4 == 0 and co % 8 == 0 for ci, co in grouped.grid())
    for spec in specs.values():
        for cin, cout in spec.grid():
            block = lm.build_block(spec, cin, cout).eval()
            xs = lm._inputs(spec, cin, 2, torch.device("cpu"), channels_last=True)
            with torch.inference_mode():
                out = block(xs[0])
            assert out.shape[0] == 2 and out.shape[-1 if spec.name == "fc" else 1] == cout
            conv = block[0]
            assert conv.weight.shape[0] == cout
            if spec.depthwise:
                assert conv.groups == cout
            elif spec.name != "fc":
                assert conv.groups == spec.groups and conv.kernel_size == spec.module.kernel_size
                assert conv.stride == spec.module.stride and conv.padding == spec.module.padding


# -- a real measurement --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def measured():
    """ResNet-20 at 28 px, batch 2, one thread, one pass of three short runs per point (a few seconds)."""
    from nps.pipeline.deploy import latency_model as lm

    saved = lm.PASSES, lm.ATTEMPTS, lm.LAYER_TIMING, lm.NETWORK_TIMING
    lm.PASSES, lm.ATTEMPTS = 1, 1
    lm.LAYER_TIMING = {"warmup": 1, "runs": 3, "min_run_s": 0.0005}
    lm.NETWORK_TIMING = {"warmup": 1, "runs": 3, "min_run_s": 0.002}
    calls = []
    try:
        model = lm.measure_latency_model("resnet20", 28, num_classes=10, in_channels=1, batch=2, threads=1,
                                         progress=lambda i, n, what: calls.append((i, n)))
    finally:
        lm.PASSES, lm.ATTEMPTS, lm.LAYER_TIMING, lm.NETWORK_TIMING = saved
    return model, calls


def base_channels(model_name="resnet20"):
    from nps.pipeline.network.models import build_model

    net = build_model(model_name, num_classes=10, in_channels=1)
    out = {}
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = (m.in_channels, m.out_channels)
        elif isinstance(m, nn.Linear):
            out[name] = (m.in_features, m.out_features)
    return out


def assert_nnls_optimum(coef, cin, cout, seconds, block, in_block):
    """``coef`` is the weighted NNLS optimum of the layer's form (padded to ``block`` out, ``in_block`` in) on its
    grid, over the terms its counts can separate."""
    A = layer_terms(cin, cout, 1, False, block, in_block) / seconds[:, None]
    pout, pin = A[:, 2] * seconds, A[:, 3] * seconds  # the counts as the form prices them (padded or not)
    used = [0, 1, 2, 3] if np.ptp(pin) and np.ptp(pout) else [0, 1] if np.ptp(pin) + np.ptp(pout) else [0]
    assert kkt_violation(A[:, used], np.ones_like(seconds), coef[used]) < 1e-6


def test_a_measured_model_states_its_own_errors(measured):
    from nps.pipeline.network.layer_table import build_layer_table
    from nps.pipeline.network.models import build_model
    from nps.pipeline.network.trace import analyze

    model, calls = measured
    graph, _ = analyze(build_model("resnet20", num_classes=10, in_channels=1, device="meta"), 28, 1)
    assert model.layers == graph.weight_order and len(model.layers) == 22
    assert (model.device, model.batch, model.threads, model.precision) == ("cpu", 2, 1, "fp32")
    assert model.device_name.startswith("cpu: ") and model.device_name.endswith(", 1 thread")
    assert np.all(model.coef >= 0) and np.all(np.isfinite(model.coef))
    assert not model.depthwise.any() and np.all(model.groups == 1)
    base = base_channels()
    for i, name in enumerate(model.layers):
        points = model.grid[name]
        cin, cout, seconds = points.T
        assert np.all(seconds > 0)
        assert (cin.max(), cout.max()) == base[name]  # the grid reaches the base widths
        # the stated error is the fit's relative RMS on its own grid ...
        assert model.fit_error[i] == pytest.approx(relative_rms(model.layer_seconds(i, cin, cout), seconds),
                                                   rel=1e-9, abs=1e-12)
        # ... and no other non-negative coefficients fit that grid better (the weighted NNLS optimum), whichever
        # padding the calibration networks chose; both paddings checked, so a fresh machine's choice cannot hide one
        assert_nnls_optimum(model.coef[i], cin, cout, seconds, model.layer_block(i), model.layer_in_block(i))
        if name != "fc":
            for block, in_block in ((16, 1), (16, 16)):
                coef, _ = fit_layer(cin, cout, seconds, 1, False, block, in_block)
                assert_nnls_optimum(coef, cin, cout, seconds, block, in_block)
    assert set(model.grid["conv1"][:, 0]) == {1} and set(model.grid["fc"][:, 1]) == {10}  # image, classes
    assert len(model.grid["layer1.0.conv1"]) == 5 * 8  # 5 input counts, 8 output counts (2, 4, ... 16)
    assert sorted(set(model.grid["layer3.1.conv1"][:, 1])) == [6, 16, 26, 32, 38, 48, 58, 64]  # off the blocks too
    # the stem's image channels and the classes never vary: their grids are one row of 8 and of 5
    assert len(model.grid["conv1"]) == 8 and len(model.grid["fc"]) == 5
    assert model.block in (1, 8, 16, 32) and not model.padded[model.layers.index("fc")]  # a linear layer never is
    # identical configurations share one timing grid
    np.testing.assert_array_equal(model.grid["layer1.1.conv1"], model.grid["layer1.2.conv1"])
    # progress in order, out of every timing: at each chunk of grid points (a child process's) and at each network
    from nps.pipeline.deploy.latency_model import GRID_CHUNK

    steps, total = [i for i, _ in calls], calls[0][1]
    assert steps[0] == 0 and steps[-1] == total - 1 and all(n == total for _, n in calls)
    assert all(0 < b - a <= GRID_CHUNK for a, b in zip(steps, steps[1:]))


def test_predict_is_offset_plus_scale_times_the_layer_terms(measured):
    """With its 11 pruned calibration networks the model is calibrated with one scale per term: each layer's a, b,
    c, d (its fit on its grid) times term_scale, summed, plus the offset."""
    model, _ = measured
    base = {n: base_channels()[n] for n in model.layers}
    total = sum(layer_terms(*base[n], int(model.groups[i]), False, model.layer_block(i), model.layer_in_block(i))
                @ (model.coef[i] * model.term_scale) for i, n in enumerate(model.layers))
    assert model.predict(base) == pytest.approx(model.offset + model.scale * total, rel=1e-12)
    assert model.scale == 1.0 and model.offset >= 0 and np.all(model.term_scale >= 0) and model.term_scale.any()
    assert model.layer_share(0, *base[model.layers[0]]) == pytest.approx(
        layer_terms(*base[model.layers[0]], 1, False, model.layer_block(0), model.layer_in_block(0))
        @ (model.coef[0] * model.term_scale), rel=1e-12)
    cal = model.calibration
    assert cal["keep_fraction"][:4] == pytest.approx([1.0, 0.75, 0.5, 0.3], abs=0.02)  # then the random ones
    assert len(cal["keep_fraction"]) == 4 + 8 and len(set(cal["keep_fraction"])) == 12
    assert cal["pruned_at_random"] == [0.0] * 4 + [1.0] * 8
    assert cal["predicted_s"][0] == pytest.approx(model.predict(base), rel=1e-12)
    assert cal["predicted_s"][0] == pytest.approx(cal["measured_s"][0], rel=1e-9)  # the base at its measured time
    assert model.base_latency_s == cal["measured_s"][0]
    errors = (np.array(cal["predicted_s"]) - np.array(cal["measured_s"])) / np.array(cal["measured_s"])
    assert model.network_error == pytest.approx(float(np.sqrt(np.mean(errors ** 2))), rel=1e-12)
    # smaller networks are predicted faster (non-negative coefficients, positive scale)
    assert np.all(np.diff(cal["predicted_s"][:4]) < 0)
    half = {n: (max(1, ci // 2) if n != "conv1" else ci, co // 2 if n != "fc" else co) for n, (ci, co) in base.items()}
    assert model.predict(half) < model.predict(base)
    with pytest.raises(KeyError, match="conv1"):
        model.predict({n: c for n, c in base.items() if n != "conv1"})


# -- storage -------------------------------------------------------------------------------------------------------


def assert_same(a: LatencyModel, b: LatencyModel) -> None:
    for name in ("model", "mode", "resolution", "num_classes", "in_channels", "device", "device_name", "batch",
                 "threads", "precision", "layers", "scale", "offset", "network_error", "calibration",
                 "base_latency_s", "block"):
        assert getattr(a, name) == getattr(b, name), name
        assert type(getattr(a, name)) is type(getattr(b, name)), name
    for name in ("groups", "depthwise", "coef", "fit_error", "padded", "padded_in", "term_scale"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name
    assert (a.grid is None) == (b.grid is None)
    if a.grid is not None:
        assert list(a.grid) == list(b.grid)
        for name in a.grid:
            assert np.array_equal(a.grid[name], b.grid[name])


def test_save_and_load_round_trip_exactly(measured, tmp_path):
    model, _ = measured
    model.save(tmp_path / "m.h5")
    assert_same(model, LatencyModel.load(tmp_path / "m.h5"))
    with h5py.File(tmp_path / "results.h5", "w") as f:  # into a group of another file, as a results file holds it
        f.create_dataset("other", data=np.arange(3))
        model.write(f.create_group("latency_model"))
    with h5py.File(tmp_path / "results.h5", "r") as f:
        assert_same(model, LatencyModel.read(f["latency_model"]))
    without = LatencyModel(**{**model.__dict__, "grid": None})
    without.save(tmp_path / "m.h5")  # replaces the file: no grid left behind
    assert LatencyModel.load(tmp_path / "m.h5").grid is None


def test_a_version_1_model_reads_as_unpadded(measured, tmp_path):
    """Files written before blocks existed: no block attribute, no padded dataset, version 1; before inputs were
    padded: no padded_in dataset, version 2; before one scale per term: no term_scale, version 3 (all ones)."""
    model, _ = measured
    every = np.ones(len(model.layers), bool)
    padded = LatencyModel(**{**model.__dict__, "block": 16, "padded": every, "padded_in": every,
                             "term_scale": [1.0, 2.0, 0.5, 0.0]})
    padded.save(tmp_path / "m.h5")
    assert LatencyModel.load(tmp_path / "m.h5").block == 16 and LatencyModel.load(tmp_path / "m.h5").padded_in.all()
    assert LatencyModel.load(tmp_path / "m.h5").term_scale.tolist() == [1.0, 2.0, 0.5, 0.0]
    with h5py.File(tmp_path / "m.h5", "a") as f:
        f.attrs["version"] = 3
        del f["term_scale"]
    v3 = LatencyModel.load(tmp_path / "m.h5")
    assert v3.term_scale.tolist() == [1.0] * 4 and v3.padded_in.all()
    with h5py.File(tmp_path / "m.h5", "a") as f:
        f.attrs["version"] = 2
        del f["padded_in"]
    v2 = LatencyModel.load(tmp_path / "m.h5")
    assert v2.padded.all() and not v2.padded_in.any() and v2.layer_in_block(0) == 1
    with h5py.File(tmp_path / "m.h5", "a") as f:
        f.attrs["version"] = 1
        del f.attrs["block"]
        del f["padded"]
    old = LatencyModel.load(tmp_path / "m.h5")
    assert old.block == 1 and not old.padded.any() and old.layer_block(0) == 1


def test_a_missing_truncated_or_foreign_file_is_one_line_naming_it(measured, tmp_path):
    model, _ = measured
    path = tmp_path / "m.h5"
    model.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    for target in (path, tmp_path / "missing.h5"):
        with pytest.raises(NpsError) as exc:
            LatencyModel.load(target)
        assert str(target) in str(exc.value) and "\n" not in str(exc.value)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f.attrs["format"] = "something else"
    with pytest.raises(NpsError, match="not an nps latency model") as exc:
        LatencyModel.load(foreign)
    assert str(foreign) in str(exc.value) and "\n" not in str(exc.value)
    with h5py.File(foreign, "w") as f:  # the right format attribute, nothing else
        f.attrs["format"] = "nps-latency-model"
        f.attrs["version"] = 1
    with pytest.raises(NpsError, match="incomplete or damaged") as exc:
        LatencyModel.load(foreign)
    assert str(foreign) in str(exc.value) and "\n" not in str(exc.value)


def test_the_model_reads_without_torch(measured, tmp_path):
    """The samplers' side (a machine with the analysis stack only) loads and evaluates a model without torch."""
    model, _ = measured
    model.save(tmp_path / "m.h5")
    code = ("import sys\n"
            "class _NoTorch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'torchvision', 'timm'):\n"
            "            raise ImportError(name + ' is not installed on this machine')\n"
            "sys.meta_path.insert(0, _NoTorch())\n"
            "from nps.pipeline.network.latency_model import LatencyModel\n"
            f"m = LatencyModel.load({str(tmp_path / 'm.h5')!r})\n"
            "print(m.layer_seconds(0, 1, 16))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) == pytest.approx(model.layer_seconds(0, 1, 16), rel=1e-12)


# -- the command ---------------------------------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    from nps.pipeline.cli import _Parser
    from nps.pipeline.commands import latency_model as command

    parser = _Parser(prog="nps")
    command.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["latency-model", *argv])


def test_the_command_refuses_a_bad_model_in_one_line(tmp_path):
    args = parse("--model", "no_such_net", "--resolution", "28", "--out", str(tmp_path / "m.h5"))
    with pytest.raises(NpsError) as exc:
        args.func(args)
    assert "no_such_net" in str(exc.value) and "\n" not in str(exc.value)
    assert not (tmp_path / "m.h5").exists()


def test_the_command_refuses_an_out_in_a_missing_folder_before_measuring(tmp_path, monkeypatch):
    from nps.pipeline.deploy import latency_model as lm

    monkeypatch.setattr(lm, "measure_latency_model", lambda *a, **k: pytest.fail("measured before checking --out"))
    out = tmp_path / "no" / "such" / "m.h5"
    args = parse("--model", "resnet20", "--resolution", "28", "--out", str(out))
    with pytest.raises(NpsError) as exc:
        args.func(args)
    assert str(out.parent) in str(exc.value) and "\n" not in str(exc.value)
    (tmp_path / "exists.h5").write_bytes(b"")
    args = parse("--model", "resnet20", "--resolution", "28", "--out", str(tmp_path / "exists.h5"))
    with pytest.raises(NpsError, match="--force"):
        args.func(args)


# -- the README's "Latency regimes" block, as written ------------------------------------------------------------------


def test_the_readmes_latency_regime_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """The block's two commands, as the README writes them (short timings: the same code, fewer repeats): a model,
    then recipes under c_latency whose predicted latency (recomputed from the stored form) meets the band."""
    import re
    from pathlib import Path

    from nps.pipeline.cli import main
    from nps.pipeline.deploy import latency_model as lm
    from nps.pipeline.network.table import LayerTable

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Latency regimes"):]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    commands = [line.split() for line in block.splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["nps", "latency-model"], ["nps", "sample"]]
    monkeypatch.setattr(lm, "PASSES", 1)
    monkeypatch.setattr(lm, "ATTEMPTS", 1)
    monkeypatch.setattr(lm, "LAYER_TIMING", {"warmup": 1, "runs": 3, "min_run_s": 0.0005})
    monkeypatch.setattr(lm, "NETWORK_TIMING", {"warmup": 1, "runs": 3, "min_run_s": 0.002})
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.chdir(tmp_path)
    first, second = commands
    second[second.index("-n") + 1] = "50"  # the README's 1,000 recipes: the same code, slower
    assert main(first[1:]) == 0
    out = capsys.readouterr().out
    assert "resnet20-cpu.h5" in out
    assert main(second[1:]) == 0
    assert "wrote latency-recipes.h5" in capsys.readouterr().out
    value = float(second[second.index("--c-latency") + 1])
    with h5py.File(tmp_path / "latency-recipes.h5", "r") as f:
        table = LayerTable.from_hdf5(f["layers"])
        keep = f[f"spaces/std-0.05@c_latency={value:g}/keep"][()]
        assert "latency_model" in f and table.latency is not None
    c = table.c_latency(keep)
    assert c.shape == (50,) and np.all(np.abs(c - value) <= 0.002)
