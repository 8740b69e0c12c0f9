"""The cell kernel (kernels/cell_kernel.py): a Gaussian space under a padded target drawn over one or two groups'
counts, exactly: the count tables, the same population as plain rejection of the space (the core walk, the walk of
every count outside it, and a restart past a too small envelope), and the sampler's choice between it and the
window kernel."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest

import nps.kernels.cell_kernel as ck
import nps.kernels.samplers as samplers
from nps.kernels.complexity import keep_from_recipe
from nps.kernels.samplers import sample_space
from nps.kernels.spaces import parse_space
from nps.pipeline.network.layer_table import build_layer_table, with_latency
from test_latency_regime import fake_model

from helpers import compare_to_rejection

WINDOW_ONLY = {"CELL_GROUPS": ()}
ONE_GROUP = {"WINDOW_COST": math.inf, "CELL_GROUPS": (1,)}
TWO_GROUPS = {"WINDOW_COST": math.inf, "CELL_GROUPS": (2,)}


def pin(monkeypatch, kernel):
    """The sampler's choice of kernel pinned (``samplers.WINDOW_COST``, ``samplers.CELL_GROUPS``)."""
    for name, value in kernel.items():
        monkeypatch.setattr(samplers, name, value)


@pytest.mark.parametrize("c,u,sigma,R,block", [(16, 0.5, 0.05, 0.95, 16), (64, 0.3, 0.1, 0.95, 16),
                                               (24, 0.9, 0.05, 0.92, 0), (7, 0.0, 0.2, 0.95, 4)])
def test_a_count_table_holds_each_counts_noise_and_its_mass(c, u, sigma, R, block):
    """Each count's noise interval rounds to that count by the samplers' rule, the intervals tile the box, and the
    masses add up to the prior's mass in [0, R]."""
    k, lo, hi, mass, padded = ck.count_table(c, u, sigma, R, 1, block)
    inner = lo + (hi - lo) * np.array([[1e-6], [0.5], [1 - 1e-6]])  # three points inside each interval
    finite = np.isfinite(inner).all(axis=0)
    got = keep_from_recipe(np.clip(u + sigma * inner[:, finite], 0.0, R), np.full(3, c)[:, None])
    assert np.array_equal(got, np.broadcast_to(k[finite], got.shape))
    assert np.allclose(hi[1:], lo[:-1])  # consecutive counts meet: the largest count has the smallest noise
    box = 0.5 * math.erfc(-(R - u) / sigma / math.sqrt(2)) - 0.5 * math.erfc(u / sigma / math.sqrt(2))
    assert mass.sum() == pytest.approx(box, abs=1e-12)
    assert np.array_equal(padded, block * -(-k // block) if block else np.zeros_like(k))


def _table(name, multiple=1):
    return with_latency(build_layer_table(name, "all", 28, 10, 1, channel_multiple=multiple),
                        fake_model(name, 28, block=16))


@pytest.mark.parametrize("name,multiple,space,value,cost", [
    ("resnet20", 1, "std-0.05", 0.8, TWO_GROUPS), ("resnet20", 1, "std-0.05", 0.8, ONE_GROUP),
    ("resnet20", 1, "mcb-0.9-1.1", 0.85, TWO_GROUPS), ("mobilenet_v2", 4, "std-0.05", 0.85, TWO_GROUPS)])
def test_the_cell_kernel_draws_a_padded_target_without_distortion(name, multiple, space, value, cost, monkeypatch):
    """One group or two (MobileNetV2's in units of 4 channels under blocks of 16): the same population as plain
    rejection of the space, group by group, in std(r), the complexities and mCB."""
    table = _table(name, multiple)
    sp = parse_space(space, "c_latency", value, delta=0.005)
    pin(monkeypatch, cost)
    stats = sample_space(table, sp, 100, seed=0).stats
    assert stats["method"] == "cells" and len(stats["cell_groups"]) == (2 if cost is TWO_GROUPS else 1)
    compare_to_rejection(table, sp, 20_000)


def test_the_cells_outside_the_core_are_drawn_as_often_as_the_prior_says(monkeypatch):
    """A core of ±0.25σ leaves most of the mass outside it, so most accepted proposals come from the walk of every
    count: still plain rejection's population."""
    table = _table("resnet20")
    sp = parse_space("std-0.05", "c_latency", 0.8, delta=0.005)
    pin(monkeypatch, TWO_GROUPS)
    monkeypatch.setattr(ck, "CORE", 0.25)
    compare_to_rejection(table, sp, 20_000)


def test_a_too_small_envelope_restarts_and_the_draws_stay_exact(monkeypatch, caplog):
    """A pilot of 20 proposals underestimates the largest Z: the kernel reports a larger one, the run restarts with
    a larger envelope, and the population is still plain rejection's."""
    table = _table("resnet20")
    sp = parse_space("std-0.05", "c_latency", 0.8, delta=0.005)
    pin(monkeypatch, TWO_GROUPS)
    monkeypatch.setattr(samplers, "PILOT_PROPOSALS", 20)
    with caplog.at_level("INFO", logger="nps.kernels.samplers"):
        sample = sample_space(table, sp, 2000, seed=0)
    assert sample.stats["method"] == "cells" and "restarting with a larger one" in caplog.text
    compare_to_rejection(table, sp, 20_000)


def test_the_sampler_takes_the_kernel_whose_pilot_promises_the_least_time_a_recipe(monkeypatch):
    """Under a padded target the window kernel, one group and two are each piloted; the costs a proposal decide
    between them, and the same seed draws the same rows."""
    table = _table("resnet20")
    sp = parse_space("std-0.05", "c_latency", 0.8, delta=0.005)
    for cost, method in ((WINDOW_ONLY, "window"), (ONE_GROUP, "cells"), (TWO_GROUPS, "cells")):
        pin(monkeypatch, cost)
        a, b = sample_space(table, sp, 500, seed=4), sample_space(table, sp, 500, seed=4)
        assert a.stats["method"] == method and np.array_equal(a.recipe, b.recipe)
    flops = sample_space(table, parse_space("std-0.05", "c_flops", 0.5), 100, seed=0)
    assert flops.stats["method"] == "window"  # an unpadded target keeps the window kernel


def test_the_candidates_pair_the_best_group_with_one_of_another_width():
    table = _table("resnet20")
    from nps.kernels.spaces import space_center, target_form

    sp = parse_space("std-0.05", "c_latency", 0.8, delta=0.005)
    (form, _), _ = target_form(table, "c_latency")
    channels = np.asarray(table.channels)
    (one,), (first, other) = samplers._cell_groups(form, channels, space_center(table, sp), sp.sigma)
    assert one == first and channels[other] != channels[first]
    wide = samplers._cell_groups(form, channels, space_center(table, sp), 1.0)  # every group's core too wide
    assert wide == []


@functools.lru_cache(maxsize=None)
def _walks():
    """Test wrappers around the kernel's inlined walk and pick (njit-compiled here, as the kernel inlines them)."""
    from nps.kernels.complexity import njit

    @njit
    def walks(A, B, w, own2, cells, lo_t, hi_t):
        n1 = cells.size[0]
        a1, a2, a3, a4 = np.empty(n1, np.int64), np.empty(n1, np.int64), np.empty(n1, np.int64), np.empty(n1)
        b1, b2, b3, b4 = np.empty(n1, np.int64), np.empty(n1, np.int64), np.empty(n1, np.int64), np.empty(n1)
        c = cells.core
        z, n = ck._walk(A, B, w, own2, cells, c[0, 0], c[0, 1], c[1, 0], c[1, 1], lo_t, hi_t, 1, 0, a1, a2, a3, a4)
        zt, nt = ck._walk(A, B, w, own2, cells, 0, n1 - 1, 0, cells.size[1] - 1, lo_t, hi_t, c[1, 0], c[1, 1],
                          b1, b2, b3, b4)
        return z, n, zt, nt, (a1, a2, a3, a4), (b1, b2, b3, b4)

    @njit
    def pick(cells, v, z0, slices, n, skip_a, skip_b):
        return ck._pick(cells, v, z0, slices[0], slices[1], slices[2], slices[3], n, skip_a, skip_b)

    return walks, pick


@pytest.mark.parametrize("seed", range(12))
def test_the_walks_find_every_cell_in_the_band_and_the_pick_follows_their_mass(seed):
    """Against brute force over every cell: the core walk's mass is the band's cells in the core rectangle, the
    outer walk's the band's cells outside it; and a uniform v picks the cell where it falls in their running mass
    (core cells first, then the others, each by g1's count and then g2's)."""
    rng = np.random.default_rng(seed)
    channels = np.array([16, 64, 32])
    pad_mult, pad_block = np.ones(3, np.int64), np.array([16, 16, 8])
    cells = ck.cell_tables(channels, rng.choice(3, 2, replace=False), rng.uniform(0.3, 0.6), 0.05, 0.95, pad_mult,
                           pad_block, core=rng.uniform(0.5, 2.5))
    B = rng.integers(0, 50, 4)
    w = np.triu(rng.integers(0, 3, (4, 4)))
    k = [cells.first[r] + np.arange(cells.size[r]) for r in (0, 1)]
    p = [cells.padded[r, :cells.size[r]] for r in (0, 1)]
    own2 = w[1, 1] * k[1] ** 2 + w[1, 3] * k[1] * p[1] + w[3, 3] * p[1] ** 2
    y1, y2 = np.meshgrid(np.arange(cells.size[0]), np.arange(cells.size[1]), indexing="ij")
    K1, P1, K2, P2 = k[0][y1], p[0][y1], k[1][y2], p[1][y2]
    value = (B[0] * K1 + B[2] * P1 + w[0, 0] * K1 ** 2 + w[0, 2] * K1 * P1 + w[2, 2] * P1 ** 2
             + (B[1] + w[0, 1] * K1 + w[1, 2] * P1) * K2 + (B[3] + w[0, 3] * K1 + w[2, 3] * P1) * P2 + own2[y2])
    lo_t = float(np.quantile(value, (0.0, rng.uniform(0.2, 0.8), 0.9)[seed % 3]))  # the band at the bottom too
    hi_t = lo_t + (rng.uniform(0.0, 0.1), 1.0)[seed % 4 == 3] * (value.max() - value.min())  # and to the top
    mass = cells.mass[0, :cells.size[0]][y1] * cells.mass[1, :cells.size[1]][y2]
    band = (value >= lo_t) & (value <= hi_t)
    in_core = ((y1 >= cells.core[0, 0]) & (y1 <= cells.core[0, 1]) & (y2 >= cells.core[1, 0])
               & (y2 <= cells.core[1, 1]))
    walks, pick = _walks()
    z, n, zt, nt, core, rest = walks(0, B, w, own2, cells, lo_t, hi_t)
    assert z == pytest.approx(mass[band & in_core].sum(), rel=1e-9, abs=1e-15)
    assert zt == pytest.approx(mass[band & ~in_core].sum(), rel=1e-9, abs=1e-15)
    order = [cell for part in (band & in_core, band & ~in_core) for cell in zip(*np.nonzero(part))]
    running = np.cumsum([mass[c] for c in order])
    for v in rng.uniform(0, z + zt, 200):
        at = int(np.searchsorted(running, v, side="right"))
        if abs(running[min(at, len(running) - 1)] - v) < 1e-12 or (at and abs(running[at - 1] - v) < 1e-12):
            continue  # on a boundary between cells: rounding may take either
        got = (pick(cells, v, 0.0, core, n, 1, 0) if v < z
               else pick(cells, v, z, rest, nt, cells.core[1, 0], cells.core[1, 1]))
        assert tuple(int(x) for x in got) == tuple(int(x) for x in order[at])


def test_a_count_draw_follows_the_prior_truncated_to_its_interval():
    """The pair's noise inside its count's interval: the truncated normal (KS against its CDF), on both tails."""
    from nps.kernels.complexity import njit
    from nps.kernels.xoshiro import new_state

    @njit
    def draws(state, lo, hi, n):
        out = np.empty(n)
        for i in range(n):
            out[i] = ck._draw(state, lo, hi, 0.0, 1.0)
        return out

    phi = np.vectorize(lambda x: 0.5 * math.erfc(-x / math.sqrt(2)))
    for lo, hi in ((0.2, 1.45), (-2.5, -1.25), (-0.6, 0.7)):
        x = np.sort(draws(new_state(1), lo, hi, 20_000))
        assert x.min() >= lo and x.max() <= hi
        cdf = (phi(x) - phi(lo)) / (phi(hi) - phi(lo))
        assert np.abs(cdf - np.arange(1, x.size + 1) / x.size).max() < 1.63 / math.sqrt(x.size)  # KS, alpha 0.01


def test_a_space_records_the_kernel_that_drew_it(monkeypatch):
    """The space's attributes in results.h5 name the kernel (a seed's rows are that kernel's draws), with the groups
    the cell kernel drew by their counts."""
    from nps.pipeline.experiment.sampling import sample_rows

    table = _table("resnet20")
    pin(monkeypatch, TWO_GROUPS)
    _, attrs, sample = sample_rows(table, parse_space("std-0.05", "c_latency", 0.8, delta=0.005), 20, 0)
    groups = sample.stats["cell_groups"]
    assert attrs["sampler"] == f"cells {groups[0]},{groups[1]}"
    _, attrs, _ = sample_rows(table, parse_space("std-0.05", "c_flops", 0.5), 20, 0)
    assert attrs["sampler"] == "window"
