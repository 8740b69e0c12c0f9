"""Recipe samplers: exact constraints on integer channels, distinct, reproducible, fail fast, no distortion."""
import os
import subprocess
import sys

import numpy as np
import pytest

from nps.kernels.complexity import keep_from_recipe
from nps.kernels.errors import SamplerError
from nps.kernels.samplers import sample_naive, sample_space
from nps.kernels.spaces import parse_space, reachable_range
from nps.pipeline.network.layer_table import build_layer_table

from helpers import compare_to_rejection


@pytest.fixture(scope="module")
def r50():
    return build_layer_table("resnet50", "all", 224, 10)


@pytest.fixture(scope="module")
def r56():
    return build_layer_table("resnet56", "all", 32, 10)


def assert_meets_space(table, space, s):
    """Recompute everything from the recipes alone and check every constraint of the space."""
    keep = keep_from_recipe(s.recipe, table.channels, table.granularity)
    assert np.array_equal(keep, s.keep)
    assert np.all(keep % table.granularity == 0) and np.all(keep >= table.granularity)
    flops, params = table.flops_of(keep), table.params_of(keep)
    assert np.array_equal(flops, s.flops) and np.array_equal(params, s.params)
    c = flops / table.base_flops if space.target == "c_flops" else params / table.base_params
    assert np.all(np.abs(c - space.value) <= space.delta)
    assert s.recipe.min() >= 0 and s.recipe.max() <= space.R
    if space.std_band:
        std = s.recipe.std(axis=1)
        assert std.min() >= space.std_band[0] and std.max() <= space.std_band[1]
    if space.mcb_band:
        mcb = (flops / table.base_flops) / (params / table.base_params)
        assert mcb.min() >= space.mcb_band[0] and mcb.max() <= space.mcb_band[1]


@pytest.mark.parametrize("name,target,value", [
    ("std-0.01", "c_flops", 0.5), ("std-0.01", "c_flops", 0.02), ("std-0.05", "c_flops", 0.25),
    ("std-0.1", "c_flops", 0.1), ("mcb-0.9-1.1", "c_flops", 0.25), ("std-0.05", "c_params", 0.1),
    ("mcb-0.9-1.1", "c_params", 0.25),
])
def test_every_recipe_meets_every_constraint_resnet50(r50, name, target, value):
    space = parse_space(name, target, value)
    s = sample_space(r50, space, 20_000, seed=3)
    assert len(s) == 20_000
    assert_meets_space(r50, space, s)
    assert len(np.unique(s.keep, axis=0)) == len(s), "recipes must be distinct subnetworks"


@pytest.mark.parametrize("mode", ["internal", "all"])
def test_every_recipe_meets_every_constraint_resnet56(mode):
    table = build_layer_table("resnet56", mode, 32, 10)
    for name in ("std-0.05", "uniform"):
        space = parse_space(name, "c_flops", 0.5)
        s = sample_space(table, space, 2_000, seed=0)
        assert_meets_space(table, space, s)
        assert len(np.unique(s.keep, axis=0)) == len(s)


@pytest.mark.parametrize("model, mode, kw", [
    ("mobilenet_v2", "all", {}), ("efficientnet_b0", "all", {}), ("resnext50_32x4d", "internal", {}),
    ("regnet_y_400mf", "all", {}), ("mobilenet_v2", "all", {"channel_multiple": 8}),
    ("densenet121", "all", {"flops": "paper"}),
])
def test_every_recipe_meets_every_constraint_on_compact_and_grouped_networks(model, mode, kw):
    table = build_layer_table(model, mode, 224, 10, **kw)
    for name, value in (("std-0.05", 0.25), ("std-0.01", 0.25), ("mcb-0.9-1.1", 0.5)):
        space = parse_space(name, "c_flops", value)
        s = sample_space(table, space, 2_000, seed=5)
        assert_meets_space(table, space, s)
        assert len(np.unique(s.keep, axis=0)) == len(s)


def test_no_distortion_on_grouped_convs_and_narrow_groups():
    """Unit counts (RegNet's grouped convs keep multiples of their groups) and groups too narrow for R (EfficientNet's
    4-channel squeeze-excitation bottlenecks reach the floor of one channel below R): the same distribution as
    plain rejection."""
    regnet = build_layer_table("regnet_x_400mf", "all", 32, 10)
    assert regnet.granularity.max() > 1
    compare_to_rejection(regnet, parse_space("std-0.05", "c_flops", 0.5), 20_000)
    effnet = build_layer_table("efficientnet_b0", "internal", 32, 10)
    assert (0.05 * effnet.channels < 0.5).any()
    compare_to_rejection(effnet, parse_space("std-0.1", "c_flops", 0.6), 20_000)


def test_seed_reproduces_and_differs(r50):
    space = parse_space("std-0.05", "c_flops", 0.25)
    a = sample_space(r50, space, 1000, seed=11)
    b = sample_space(r50, space, 1000, seed=11)
    c = sample_space(r50, space, 1000, seed=12)
    assert np.array_equal(a.recipe, b.recipe) and np.array_equal(a.keep, b.keep)
    assert not np.array_equal(a.keep, c.keep)


def test_target_out_of_reach_fails_at_once_naming_range():
    table = build_layer_table("resnet50", "internal", 224, 10)
    low, _ = reachable_range(table, "c_flops", 0.95)
    assert 0.12 < low < 0.15  # stem, shortcuts and head stay in internal mode
    with pytest.raises(SamplerError, match=r"c_flops=0.05 is out of reach .*reachable c_flops is \[0\.1"):
        sample_space(table, parse_space("std-0.01", "c_flops", 0.05), 10)


def test_mcb_band_out_of_reach_fails_naming_range(r50):
    with pytest.raises(SamplerError, match=r"mCB band \[3, 3.5\] is out of reach .* reach mCB \[0\.\d+, 1\.\d+\]"):
        sample_space(r50, parse_space("mcb-3-3.5", "c_flops", 0.25), 10)


def test_nearly_empty_space_stops_instead_of_spinning(r50):
    space = parse_space("std-0.1", "c_flops", 0.02, R=0.95)
    with pytest.raises(SamplerError, match="nearly empty"):
        # stopped by counting, not by the clock: at its acceptance, 100,000 recipes would take hours on any machine,
        # so the rate rule (too few accepted to finish within max_seconds) says so after its first second; 1,000
        # recipes could finish within 60 s on a quiet machine and the test depended on the load
        sample_space(r50, space, 100_000, seed=0, max_seconds=60)


@pytest.mark.parametrize("bad", ["std-0", "std-x", "mcb-1.1-0.9", "gauss-0.1"])
def test_bad_space_names(bad):
    with pytest.raises(SamplerError, match="space"):
        parse_space(bad, "c_flops", 0.25)


@pytest.mark.parametrize("name,target,value", [
    ("std-0.05", "c_flops", 0.25), ("std-0.1", "c_flops", 0.25), ("std-0.01", "c_flops", 0.5),
    ("mcb-0.9-1.1", "c_flops", 0.25), ("std-0.05", "c_params", 0.25), ("uniform", "c_flops", 0.45),
])
def test_no_distortion_against_plain_rejection(r56, name, target, value):
    compare_to_rejection(r56, parse_space(name, target, value), 20_000)


def test_the_one_group_window_holds_exactly_the_t_that_meet_the_target():
    """_one_group_window against a scan of t: every t of the bounding window whose count meets the band lies in the
    exact window, and just inside each of its ends the count does (it is no wider than it must be), for random
    linear-and-padded targets, counts and bands."""
    from nps.kernels.complexity import padded_channels
    from nps.kernels.gauss_kernel import _count, _one_group_window

    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(300):
        c = int(rng.choice([16, 32, 64, 96]))
        block = int(rng.choice([0, 8, 16]))
        A, B0, B1 = (int(v) for v in rng.integers(0, 1000, 3))
        kk, kp, pp = (int(v) for v in rng.integers(0, 3, 3))
        base, d = rng.uniform(0.2, 0.6), rng.uniform(0.005, 0.05)
        a, b = sorted(rng.uniform(-4, 4, 2))

        def target(t):
            k = _count(base + d * t, c)
            p = padded_channels(k, 1, block) if block else 0
            return A + B0 * k + B1 * p + kk * k * k + kp * k * p + pp * p * p

        values = sorted(target(t) for t in (a, b))
        mid = rng.uniform(*values) if values[1] > values[0] else values[0]
        half = rng.uniform(0, 0.3) * (values[1] - values[0] + 1)
        lo_t, hi_t = mid - half, mid + half
        lo, hi = _one_group_window(a, b, base, d, c, A, B0, B1, 1, block, kk, kp, pp, lo_t, hi_t)
        ts = np.linspace(a, b, 4001)
        meets = np.array([lo_t <= target(t) <= hi_t for t in ts])
        if not lo < hi:
            assert not meets.any()
            continue
        assert a <= lo and hi <= b
        assert np.all((ts[meets] >= lo) & (ts[meets] <= hi))
        eps = 1e-6 * (b - a)
        assert lo_t <= target(lo + eps) <= hi_t and lo_t <= target(hi - eps) <= hi_t
        checked += 1
    assert checked > 100


@pytest.mark.e2e
def test_kernels_run_as_plain_python():
    """The NPS_NUMBA_DISABLE switch (ffcv's convention) runs the same sampler without numba."""
    code = ("from nps.pipeline.network.layer_table import build_layer_table;from nps.kernels.spaces import parse_space;"
            "from nps.kernels.samplers import sample_space;"
            "t=build_layer_table('resnet20','internal',32,10);"
            "s=sample_space(t, parse_space('std-0.05','c_flops',0.5), 20, seed=0);print(len(s))")
    env = dict(os.environ, NPS_NUMBA_DISABLE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "20"


def test_duplicates_are_dropped_in_order():
    """A small network with little noise draws the same subnetwork often: each keep vector must appear once."""
    table = build_layer_table("resnet20", "internal", 32, 10)
    space = parse_space("std-0.01", "c_flops", 0.5)
    s = sample_space(table, space, 300, seed=0)
    assert s.stats["rejected"].get("duplicate", 0) > 0
    assert len(np.unique(s.keep, axis=0)) == 300
    loose = sample_space(table, space, 300, seed=0, distinct=False)
    assert len(np.unique(loose.keep, axis=0)) < 300


def test_window_sampler_also_exact_where_plain_rejection_is_chosen(r56, monkeypatch):
    """Small σ uses plain rejection (PLAIN_ABOVE); the window kernel must still give the same distribution there."""
    import nps.kernels.samplers as samplers

    space = parse_space("std-0.01", "c_flops", 0.5)
    assert sample_space(r56, space, 100, seed=0).stats["method"] == "plain rejection"
    monkeypatch.setattr(samplers, "PLAIN_ABOVE", 2.0)
    assert sample_space(r56, space, 100, seed=0).stats["method"] == "window"
    compare_to_rejection(r56, space, 20_000)


@pytest.mark.parametrize("name,value", [("std-0.05", 0.5), ("mcb-0.9-1.1", 0.25)])
def test_no_distortion_with_groups_held_fixed(r50, name, value):
    """On ResNet-50 the kernel draws t along a few large groups only and computes the other counts exactly from
    e; the population must still match plain rejection of the same space."""
    from nps.kernels.samplers import _direction, _target_bounds
    from nps.kernels.spaces import target_form, uniform_ratio

    space = parse_space(name, "c_flops", value)
    (form, _), _ = target_form(r50, "c_flops")
    lo, hi = _target_bounds(r50, space)
    d = _direction(form, np.asarray(r50.channels), uniform_ratio(r50, "c_flops", value), hi - lo, space.R)
    assert np.all(d >= 0) and abs(np.linalg.norm(d) - 1) < 1e-12
    assert 0 < (d > 0).sum() < len(d) // 2, "the direction should leave the small groups out"
    assert sample_space(r50, space, 100, seed=0).stats["method"] == "window"
    compare_to_rejection(r50, space, 20_000)


def test_inlined_normals_match_the_normal_distribution():
    """xoshiro256++ with the ziggurat: moments, tails and a 40-bin histogram of 2 million draws."""
    import math

    from nps.kernels.xoshiro import fill_normals, new_state, uniform

    x = np.empty(2_000_000)
    fill_normals(new_state(3), x)
    n = len(x)
    assert abs(x.mean()) < 5 / math.sqrt(n) and abs(x.std() - 1) < 5 / math.sqrt(2 * n)
    edges = np.linspace(-5, 5, 41)
    cdf = np.array([0.5 * math.erfc(-e / math.sqrt(2)) for e in edges])
    expected = np.diff(cdf) * n
    observed, _ = np.histogram(x, edges)
    assert np.all(np.abs(observed - expected) < 5 * np.sqrt(expected) + 2)
    tail = (np.abs(x) > 3.6541528853610088).mean()  # beyond the ziggurat's last layer (the slow path)
    assert abs(tail - math.erfc(3.6541528853610088 / math.sqrt(2))) < 5 * math.sqrt(2.7e-4 / n)
    s1, s2 = new_state(7), new_state(7)
    assert [uniform(s1) for _ in range(5)] == [uniform(s2) for _ in range(5)]
    u = np.array([uniform(s1) for _ in range(100_000)])
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / len(u))
