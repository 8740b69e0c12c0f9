"""Analysis primitives: EDF (Eq. 1), bootstrap bands and comparisons, best-k, histograms, and the two fits."""
import math

import numpy as np
import pytest

from nps.pipeline.results.analysis import Population, summarize
from nps.pipeline.results.stats import (
    best_k,
    bootstrap_edf,
    bootstrap_weights,
    compare_areas,
    edf,
    edf_grid,
    fit_offset_power_law,
    fit_power_law,
    histogram,
    histogram_edges,
)


def test_edf_counts_drops_strictly_below_e():
    drops = np.array([0.5, 1.0, 1.0, 2.0])
    grid = np.array([0.0, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5])
    np.testing.assert_array_equal(edf(drops, grid), [0, 0, 0.25, 0.25, 0.75, 0.75, 1.0])
    assert np.isnan(edf([], grid)).all()


def test_grid_spans_all_drops_and_ends_where_every_edf_is_one():
    a, b = np.array([0.3, 1.2]), np.array([-0.4, 2.0])
    g = edf_grid([a, b], 50)
    assert g.size == 50 and g[0] == -0.4 and g[-1] > 2.0
    assert edf(a, g)[-1] == 1.0 and edf(b, g)[-1] == 1.0 and edf(b, g)[0] == 0.0
    assert np.ptp(edf_grid([np.array([1.0, 1.0])], 5)) == pytest.approx(1.0)


def test_bootstrap_weights_are_resampling_counts():
    w = bootstrap_weights(7, 500, np.random.default_rng(0))
    assert w.shape == (500, 7) and (w.sum(axis=1) == 7).all()
    assert abs(w.mean() - 1.0) < 1e-12


def test_bootstrap_edf_matches_independent_resampling():
    rng = np.random.default_rng(3)
    drops = rng.normal(1.0, 0.5, 60)
    grid = edf_grid([drops], 40)
    boot = bootstrap_edf(drops, grid, n_boot=300, seed=11)
    np.testing.assert_array_equal(boot.F, edf(drops, grid))
    # the same draws, done the slow way: resample, then Eq. 1
    d = np.sort(drops)
    idx = np.random.default_rng(11).integers(0, d.size, size=(300, d.size))
    slow = np.array([edf(d[i], grid) for i in idx])
    np.testing.assert_allclose(boot.samples, slow)
    np.testing.assert_allclose(boot.means, d[idx].mean(axis=1))
    lo, hi = boot.band()
    assert (lo <= boot.F + 1e-12).all() and (boot.F <= hi + 1e-12).all()
    # EDF area ≈ (e_max − mean) / (e_max − e_min): higher area ⇔ lower mean drop
    assert boot.area == pytest.approx((grid[-1] - drops.mean()) / (grid[-1] - grid[0]), abs=0.02)
    again = bootstrap_edf(drops, grid, n_boot=300, seed=11)
    np.testing.assert_array_equal(again.samples, boot.samples)


def test_compare_areas_probabilities():
    rng = np.random.default_rng(0)
    good, bad = rng.normal(0.5, 0.3, 200), rng.normal(1.5, 0.3, 200)
    grid = edf_grid([good, bad])
    areas = {"good": bootstrap_edf(good, grid, 400, 1).areas, "bad": bootstrap_edf(bad, grid, 400, 2).areas}
    c = compare_areas(areas)
    assert c["prob_higher"]["good"]["bad"] == 1.0 and c["prob_higher"]["bad"]["good"] == 0.0
    assert c["prob_best"] == {"good": 1.0, "bad": 0.0} and c["ranking"] == ["good", "bad"]
    same = compare_areas({"a": np.ones(10), "b": np.ones(10), "c": np.zeros(10)})
    assert same["prob_higher"]["a"]["b"] == 0.5 and same["prob_best"]["a"] == 0.5 and same["prob_best"]["c"] == 0


def test_best_k_is_lowest_drop_first_and_stable():
    d = np.array([0.3, -0.1, 0.3, 0.2, 5.0])
    assert best_k(d, 3).tolist() == [1, 3, 0]
    assert best_k(d, 10).tolist() == [1, 3, 0, 2, 4]
    with pytest.raises(ValueError):
        best_k([0.1, np.nan], 1)


def test_histogram_edges_are_shared_and_cover_every_value():
    a, b = np.linspace(0, 1, 50), np.linspace(0.5, 2, 30)
    edges = histogram_edges([a, b])
    assert edges[0] == 0 and edges[-1] == 2
    assert histogram(a, edges).sum() == 50 and histogram(b, edges).sum() == 30
    one = histogram_edges([np.full(5, 0.25)])
    assert one[0] < 0.25 < one[-1] and histogram(np.full(5, 0.25), one).sum() == 5


def test_power_law_fit_recovers_parameters():
    c = np.repeat([0.25, 0.1, 0.05, 0.02], 40)
    exact = fit_power_law(c, 1.05 * c ** -0.12, groups=c)
    assert exact.kind == "power" and exact.params["a"] == pytest.approx(1.05) and exact.params["b"] == \
        pytest.approx(-0.12) and exact.r2 == pytest.approx(1.0)
    rng = np.random.default_rng(5)
    noisy = fit_power_law(c, 1.05 * c ** -0.12 * np.exp(rng.normal(0, 0.02, c.size)), groups=c)
    assert noisy.params["a"] == pytest.approx(1.05, rel=0.03) and noisy.params["b"] == pytest.approx(-0.12, abs=0.01)
    assert noisy.dof == c.size - 2 and 0 < noisy.rmse < 0.05
    single = fit_power_law(np.full(10, 0.25), np.linspace(0.9, 1.1, 10), groups=["c_flops=0.25"] * 10)
    assert single.kind == "constant" and "two" in single.note
    assert single.params["a"] == pytest.approx(math.exp(np.mean(np.log(np.linspace(0.9, 1.1, 10)))))


@pytest.mark.parametrize("e0,a,b", [(0.2, 0.05, 4.0), (-0.3, 2.0, -1.5), (1.0, 0.8, 1.0)])
def test_offset_power_law_fit_recovers_known_parameters(e0, a, b):
    rng = np.random.default_rng(7)
    x = rng.uniform(0.85, 2.2, 30)
    fit = fit_offset_power_law(x, e0 + a * x ** b)
    assert fit.kind == "offset_power" and fit.dof == 27
    assert fit.params["e0"] == pytest.approx(e0, abs=1e-6) and fit.params["a"] == pytest.approx(a, rel=1e-5)
    assert fit.params["b"] == pytest.approx(b, abs=1e-5) and fit.r2 == pytest.approx(1.0)
    noisy = fit_offset_power_law(x, e0 + a * x ** b + rng.normal(0, 0.01, x.size))
    assert noisy.params["b"] == pytest.approx(b, abs=0.25) and noisy.params["e0"] == pytest.approx(e0, abs=0.1)
    assert noisy.r2 > 0.95 and noisy.rmse < 0.02
    np.testing.assert_allclose(noisy.predict(x), noisy.params["e0"] + noisy.params["a"] * x ** noisy.params["b"])


def test_offset_power_law_degrades_with_few_points():
    line = fit_offset_power_law([1.0, 1.2, 1.5], [0.1, 0.5, 1.1])
    assert line.kind == "linear" and "line" in line.note and line.dof == 1
    assert fit_offset_power_law([1.0, 1.2], [0.1, 0.5]).r2 == pytest.approx(1.0)
    step = np.linspace(1, 2, 10)  # a jump at the end: the exponent would run off to infinity
    edge = fit_offset_power_law(step, (step > 1.95) * 1.0)
    assert edge.kind == "linear" and "no curvature" in edge.note and edge.dof == 8
    for x, y in (([1.0], [0.3]), ([], []), ([1.0, 1.0, 1.0], [0.1, 0.2, 0.3])):
        none = fit_offset_power_law(x, y)
        assert none.kind == "none" and "two regimes" in none.note and np.isnan(none.predict([1.0])).all()


def _population(space, target, value, drops, rng, status_counts=None):
    n = len(drops)
    G = 4
    recipe = rng.uniform(0, 0.9, (n, G))
    counts = {"total": n, "pending": 0, "running": 0, "done": n, "failed": 0, "nan": 0, **(status_counts or {})}
    return Population(group=f"{space}@{target}={value:g}", space=space, target=target, value=value, counts=counts,
                      row=np.arange(n), acc_drop=np.asarray(drops, float), top1=90 - np.asarray(drops, float),
                      c_flops=rng.uniform(0.24, 0.26, n), c_params=rng.uniform(0.2, 0.3, n),
                      mcb=rng.uniform(0.8, 1.3, n), std=recipe.std(axis=1), flops=rng.integers(1e6, 2e6, n),
                      params=rng.integers(1e4, 2e4, n), recipe=recipe, keep=np.ones((n, G), int), delta=0.002)


def test_summarize_orders_regimes_and_spaces_and_picks_best_k_across_spaces():
    rng = np.random.default_rng(0)
    pops = [_population("std-0.1", "c_flops", 0.1, [3.0, 1.0, 2.0], rng),
            _population("std-0.01", "c_flops", 0.1, [0.5, 4.0], rng),
            _population("std-0.01", "c_params", 0.25, [0.2], rng),
            _population("std-0.01", "c_flops", 0.25, [0.1, 0.3], rng)]
    s = summarize(pops, k=3, n_boot=50)
    assert [r["key"] for r in s["regimes"]] == ["c_flops=0.25", "c_flops=0.1", "c_params=0.25"]
    reg = s["regimes"][1]
    assert [sp["space"] for sp in reg["spaces"]] == ["std-0.01", "std-0.1"]
    assert reg["best_k"]["space"] == ["std-0.01", "std-0.1", "std-0.1"] and reg["best_k"]["row"] == [0, 1, 2]
    assert reg["best_k"]["acc_drop"] == [0.5, 1.0, 2.0] and reg["winner"]["row"] == 0
    # spaces of 3 and 2 rows: too few for a bootstrap comparison (from MIN_INTERVAL_N rows on), so none is made
    assert reg["comparison"] is None and s["regimes"][0]["comparison"] is None
    assert s["counts"]["finished"] == 8 and s["drop_vs_mcb"]["fit"]["kind"] == "linear"
    assert s["optimal_mcb"]["fit"]["kind"] == "power"
