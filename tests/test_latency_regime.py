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


def fake_model(name: str, resolution: int, seed: int = 0, *, offset: float = 1e-4, scale: float = 1.1,
               block: int = 1, pad_inputs: bool = False, term_scale=(1.0, 1.0, 1.0, 1.0)):
    """A latency model of ``name`` with random non-negative coefficients (what nps latency-model would fit); with
    ``block`` > 1 every conv layer's output count padded to it (as nps latency-model pads on a CPU), and with
    ``pad_inputs`` its input count too."""
    from nps.pipeline.network.models import build_model
    from nps.pipeline.network.trace import analyze

    graph, _ = analyze(build_model(name, num_classes=10, in_channels=1, device="meta"), resolution, 1)
    rng = np.random.default_rng(seed)
    coef = np.abs(rng.normal(size=(len(graph.weight_order), 4))) * np.array([2e-5, 3e-9, 1e-7, 1e-7])
    padded = np.array([graph.weights[n].kind != "linear" and block > 1 for n in graph.weight_order])
    padded_in = padded & pad_inputs
    return types.SimpleNamespace(model=name, resolution=resolution, num_classes=10, in_channels=1,
                                 layers=list(graph.weight_order), coef=coef, scale=scale, offset=offset,
                                 block=block, padded=padded, padded_in=padded_in,
                                 term_scale=np.asarray(term_scale, dtype=np.float64),
                                 layer_block=lambda i: block if padded[i] else 1,
                                 layer_in_block=lambda i: block if padded_in[i] else 1)


def layer_sum(model, pruned) -> float:
    """offset + scale · Σ over the pruned network's conv and linear layers of the model's term at its real
    channel counts: the prediction the form must reproduce."""
    from torch import nn

    modules = dict(pruned.named_modules())
    total = 0.0
    for i, name in enumerate(model.layers):
        m = modules[name]
        a, b, c, d = model.coef[i] * model.term_scale
        if isinstance(m, nn.Conv2d):
            cin, cout, groups = m.in_channels, m.out_channels, m.groups
        else:
            cin, cout, groups = m.in_features, m.out_features, 1
        depthwise = isinstance(m, nn.Conv2d) and groups == cin == cout and groups > 1
        block, in_block = model.layer_block(i), model.layer_in_block(i)
        cout = block * -(-cout // block)  # the output count as a kernel computing blocks of channels pays for it
        cin = in_block * -(-cin // in_block)  # and the input count, where the model pads it
        if depthwise:  # a + c·C
            total += a + c * cout
        else:
            total += a + b * cin * cout / groups + c * cout + d * cin
    return model.offset + model.scale * total


@pytest.mark.parametrize("block,pad_inputs,term_scale", [(1, False, (1, 1, 1, 1)), (16, False, (1, 1, 1, 1)),
                                                          (16, True, (1, 1, 1, 1)), (16, True, (1.7, 0.4, 2.5, 0.0))])
@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2"])
def test_the_form_is_the_sum_of_the_layer_terms_at_the_pruned_networks_channel_counts(name, block, pad_inputs,
                                                                                       term_scale):
    """The form reproduces the model's prediction at a pruned network's real channel counts; with block 16 every
    conv layer's output count padded (a padded form over 2G variables), and its input count too with pad_inputs;
    with a term_scale each of a, b, c, d in its own proportion."""
    from nps.pipeline.network.models import build_model
    from nps.pipeline.network.prune import prune_model

    model = fake_model(name, 28, block=block, pad_inputs=pad_inputs, term_scale=term_scale)
    table = with_latency(build_layer_table(name, "all", 28, 10, 1), model)
    assert table.latency.padded == (block > 1)
    net = build_model(name, num_classes=10, in_channels=1)
    rng = np.random.default_rng(1)
    for recipe in (np.zeros(len(table)), rng.uniform(0, 0.8, len(table)), rng.uniform(0, 0.95, len(table))):
        keep = table.keep(recipe)
        units = keep // table.granularity
        predicted = float(table.latency(units)) * LATENCY_UNIT
        f = table.latency  # each coefficient rounded to a whole femtosecond moves the value by at most this
        x = f.variables(units)
        rounding = 0.5 * LATENCY_UNIT * (1 + x.sum() + np.sum(x[f.pair_a] * x[f.pair_b]))
        assert abs(predicted - layer_sum(model, prune_model(net, table, keep))) <= rounding
        assert rounding < 1e-6 * predicted
    assert table.base_latency == table.latency(table.units)
    assert (table.latency.linear >= 0).all() and (table.latency.pair_w >= 0).all()  # monotone: the samplers need it


@pytest.mark.parametrize("block", [1, 16])
@pytest.mark.parametrize("space", ["uniform", "std-0.05", "mcb-0.9-1.1"])
def test_a_latency_regime_sample_meets_its_band_exactly_on_the_integer_counts(space, block):
    table = with_latency(build_layer_table("resnet20", "all", 28, 10, 1), fake_model("resnet20", 28, block=block))
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


@pytest.mark.parametrize("name,space,value,multiple,moving", [("resnet20", "std-0.05", 0.8, 1, 1),
                                                              ("resnet20", "mcb-0.9-1.1", 0.85, 1, 1),
                                                              ("mobilenet_v2", "std-0.05", 0.85, 4, 4)])
def test_the_window_kernel_draws_a_padded_target_without_distortion(name, space, value, multiple, moving,
                                                                    monkeypatch):
    """A padded latency form (blocks of 16; MobileNetV2's groups drawn in units of 4 channels, so mult = 4) through
    the window kernel, each padded count bounded by [mult·k, mult·k + block - 1], and with one group moving its
    exact window over that group's counts and padded count: the same population as plain rejection of the space.
    PLAIN_ABOVE is lifted so that the window kernel runs even where its envelope is wide, and the cell kernel
    (tests/test_cell_kernel.py) is ruled out."""
    import nps.kernels.samplers as samplers

    from helpers import compare_to_rejection, moving_groups

    table = with_latency(build_layer_table(name, "all", 28, 10, 1, channel_multiple=multiple),
                         fake_model(name, 28, block=16))
    assert table.latency.padded and set(table.latency.pad_mult.tolist()) == {multiple}
    sp = parse_space(space, "c_latency", value, delta=0.005)
    assert moving_groups(table, sp) == moving  # both window paths: one group (exact), several (bounds)
    monkeypatch.setattr(samplers, "PLAIN_ABOVE", 2.0)
    monkeypatch.setattr(samplers, "CELL_GROUPS", ())  # not the cell kernel
    assert sample_space(table, sp, 100, seed=0).stats["method"] == "window"
    compare_to_rejection(table, sp, 20_000)


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


def latency_model_of(fake, table):
    """A LatencyModel (the stored kind) with the fake model's coefficients."""
    from nps.pipeline.network.latency_model import LatencyModel

    L = len(fake.layers)
    return LatencyModel(model=fake.model, mode="all", resolution=fake.resolution, num_classes=10, in_channels=1,
                        device="cpu", device_name="cpu: test", batch=8, threads=1, precision="fp32",
                        layers=list(fake.layers), groups=np.ones(L, dtype=np.int64), depthwise=np.zeros(L, bool),
                        coef=fake.coef, fit_error=np.full(L, 0.05), scale=fake.scale, offset=fake.offset,
                        network_error=0.05, calibration={"keep_fraction": [1.0], "measured_s": [1e-3],
                                                         "predicted_s": [1e-3], "iqr_over_median": [0.01]},
                        base_latency_s=1e-3)


def test_the_report_sets_measured_against_predicted_latency(tmp_path, monkeypatch, in_process):
    """A file with a latency model, a c_latency regime and a c_flops one: nps latency (its timings a stand-in that
    returns the prediction times a known factor per row) at the model's batch, then the report's R², errors and the
    share of the latency regime's rows within its band when measured."""
    from nps.pipeline.cli import main
    from nps.pipeline.deploy import latency
    from nps.pipeline.experiment.sampling import sample_rows
    from nps.pipeline.results.latency import PairedTiming, Timing
    from nps.pipeline.results.report import write_report
    from nps.pipeline.results.store import ResultsStore
    from nps.pipeline.row_status import Result

    fake = fake_model("resnet20", 28)
    table = with_latency(build_layer_table("resnet20", "all", 28, 10, 1), fake)
    path = tmp_path / "results.h5"
    config = '[experiment]\nname = "t"\n[model]\nname = "resnet20"\n[retrain]\namp = "off"\n'
    store = ResultsStore.create(path, table, config, {"base_top1": 90.0, "base_flops": table.base_flops,
                                                      "base_params": table.base_params},
                                latency_model=latency_model_of(fake, table))
    try:
        for target, value in (("c_flops", 0.5), ("c_latency", 0.8)):
            rows, attrs, _ = sample_rows(table, parse_space("std-0.05", target, value, delta=0.01), 6, 0)
            store.add_space(f"std-0.05@{target}={value:g}", rows, epochs=1, attrs=attrs)
            store.record(f"std-0.05@{target}={value:g}", range(6),
                         [Result.done(top1=85.0, top5=99.0, loss=0.3, bn_top1=50.0, train_s=1.0)] * 6)
    finally:
        store.close()
    factors = iter([1.0] + [1.0, 1.02, 0.98, 1.05, 0.95, 1.0] * 2)  # the base exact, the rows within ±5 %
    batches = []

    def exact(model):
        from torch import nn

        channels = {n: (m.in_channels, m.out_channels) if isinstance(m, nn.Conv2d) else (m.in_features, m.out_features)
                    for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
        return fake.offset + fake.scale * sum(
            a + b * channels[n][0] * channels[n][1] + c * channels[n][1] + d * channels[n][0]
            for n, (a, b, c, d) in zip(fake.layers, fake.coef))

    def stand_in(model, table_, batch, **kwargs):
        batches.append(batch)
        t = exact(model) * next(factors)
        return Timing(t, t * 0.995, t * 1.005, 5, 1)

    def paired(base, model, table_, batch, **kwargs):  # each row against the base's exact time
        row, b = stand_in(model, table_, batch), exact(base)
        return PairedTiming(row, Timing(b, b, b, 5, 1), row.median_s / b, row.median_s / b, row.median_s / b)

    monkeypatch.setattr(latency, "time_network", stand_in)
    monkeypatch.setattr(latency, "time_network_pair", paired)
    # the model's device, batch and threads by default; one pass: the stand-in's factors go in file order
    assert main(["latency", str(path), "--runs", "3", "--passes", "1"]) == 0
    assert set(batches) == {8}
    p = write_report(path, tmp_path / "report", n_boot=20)["latency_prediction"]
    assert p["n"] == 12 and p["batch"] == 8 and p["device_name"] == "cpu: test"
    assert p["paired"] == 12 and p["paired_noise_max"] == 0.0 and p["paired_noisy"] == 0  # the stand-in's pairs agree
    assert p["base"]["measured_ms"] == pytest.approx(p["base"]["predicted_ms"], rel=1e-6)
    errors = np.array(p["points"]["measured_ms"]) / np.array(p["points"]["predicted_ms"])
    assert sorted(np.round(errors, 4)) == sorted([1.0, 1.02, 0.98, 1.05, 0.95, 1.0] * 2)
    meas, pred = np.array(p["points"]["measured_ms"]), np.array(p["points"]["predicted_ms"])
    assert p["r2"] == pytest.approx(1 - np.sum((meas - pred) ** 2) / np.sum((meas - meas.mean()) ** 2))
    c_meas, c_pred = meas / p["base"]["measured_ms"], pred / p["base"]["predicted_ms"]  # relative to the base
    assert p["r2_relative"] == pytest.approx(1 - np.sum((c_meas - c_pred) ** 2) / np.sum((c_meas - c_meas.mean()) ** 2))
    np.testing.assert_allclose(p["points"]["c_predicted"], c_pred)
    (band,) = p["regimes"]  # the c_latency regime: measured c within 0.8 ± 0.01 for the rows off by at most 1 %
    c = np.array(p["points"]["c_measured"])[np.array(p["points"]["regime"]) == "c_latency=0.8"]
    assert band["n"] == 6 and band["within"] == int(np.count_nonzero(np.abs(c - 0.8) <= 0.01))
    assert 0 < band["within"] < 6
    assert (tmp_path / "report" / "latency_prediction.png").is_file()
    html = (tmp_path / "report" / "index.html").read_text()
    assert "relative to the base network (right; R²" in html and "measured paired with the base, run by run" in html


def test_a_latency_target_without_a_model_is_one_line(tmp_path, capsys):
    from nps.pipeline.cli import main

    out = tmp_path / "r.h5"
    code = main(["sample", "--model", "resnet20", "--resolution", "28", "--in-channels", "1", "--space", "std-0.05",
                 "--c-latency", "0.6", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and not out.exists()
    assert err[0].startswith("nps sample: error: --c-latency needs --latency-model FILE: measure one with nps "
                             "latency-model --model resnet20 --resolution 28")
    code = main(["sample", "--model", "resnet20", "--resolution", "28", "--space", "std-0.05", "--c-latency", "0.6",
                 "--latency-model", str(tmp_path / "missing.h5"), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "missing.h5" in err[0] and not out.exists()


@pytest.mark.parametrize("name,multiple", [("resnet20", 1), ("mobilenet_v2", 4)])
def test_a_padded_latency_space_is_centred_where_its_recipes_meet_the_target_on_average(name, multiple):
    """The uniform recipes' latency under a padded model is a staircase: uniform_ratio gives one ratio for a whole
    range of targets (the jump). space_center moves with the target, and at it the space's noise (each ratio
    N(u, σ²) truncated to [0, R], counts by the rounding rule) meets the target on average (Monte Carlo)."""
    from nps.kernels.complexity import keep_from_recipe, unit_table
    from nps.kernels.spaces import space_center, uniform_ratio

    table = with_latency(build_layer_table(name, "all", 28, 10, 1, channel_multiple=multiple),
                         fake_model(name, 28, block=16))
    targets = np.round(np.arange(0.70, 0.905, 0.01), 2)  # inside what the noise reaches on average
    plain = [uniform_ratio(table, "c_latency", v) for v in targets]
    centres = [space_center(table, parse_space("std-0.05", "c_latency", v)) for v in targets]
    assert np.any(np.diff(plain) == 0)  # the staircase: two targets, one uniform ratio
    assert np.all(np.diff(centres) < 0)  # the centre decreases strictly with the target
    units, _ = unit_table(table)
    c = np.asarray(units.channels)
    rng = np.random.default_rng(0)
    for value in (0.72, 0.8):
        sp = parse_space("std-0.05", "c_latency", value)
        u = space_center(table, sp)
        r = u + sp.sigma * rng.standard_normal((400_000, len(c)))
        r = np.where((r < 0) | (r > sp.R), np.nan, r)
        for i in range(len(c)):  # each group truncated to [0, R] on its own, as the centre assumes
            bad = np.isnan(r[:, i])
            while bad.any():
                r[bad, i] = u + sp.sigma * rng.standard_normal(bad.sum())
                r[bad & ((r[:, i] < 0) | (r[:, i] > sp.R)), i] = np.nan
                bad = np.isnan(r[:, i])
        latency = table.latency(keep_from_recipe(r, c)) / table.base_latency
        assert abs(latency.mean() - value) < 4 * latency.std() / np.sqrt(len(latency)) + 1e-4
        assert sample_space(table, sp, 50, seed=0).stats["u"] == u  # the sampler draws around it


def test_a_form_without_padding_keeps_the_uniform_ratio_as_its_centre():
    from nps.kernels.spaces import space_center, uniform_ratio

    table = with_latency(build_layer_table("resnet20", "all", 28, 10, 1), fake_model("resnet20", 28, block=1))
    for target, value in (("c_latency", 0.7), ("c_flops", 0.5), ("c_params", 0.5)):
        sp = parse_space("std-0.05", target, value)
        assert space_center(table, sp) == uniform_ratio(table, target, value)
