"""Recipe samplers: draw n distinct recipes of a pruning space that meet every constraint on integer channels.

``sample_space`` is the fast sampler (numba kernels in :mod:`nps.kernels.gauss_kernel`); ``sample_naive`` is plain
rejection sampling of the same space, vectorised in numpy: the reference the fast one is tested and benchmarked
against. Both take a layer table (anything with ``channels``, ``flops``, ``params``, ``base_flops``,
``base_params``, ``model`` and ``mode``) and a :class:`nps.kernels.spaces.Space`.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from nps.kernels import cell_kernel as ck
from nps.kernels import gauss_kernel as gk
from nps.kernels.complexity import keep_from_recipe, unit_table
from nps.kernels.errors import SamplerError
from nps.kernels.spaces import LATENCY, Space, check_feasible, space_center, target_form
from nps.kernels.xoshiro import new_state

log = logging.getLogger(__name__)

PILOT_PROPOSALS = 20_000
# A padded target (a latency model's) may be drawn by the cell kernel over one or two groups' counts (CELL_GROUPS)
# instead of the window kernel: whichever promises the least time a recipe, its pilot's acceptance against its cost
# a proposal, which for the cell kernel grows with the counts its walk covers (its core's columns). In units of the
# window kernel's proposal, from tools/bench_kernels.py on ResNet-20 (window 255 ns a proposal; one group over 6 and
# 12 columns 179 and 203 ns, two groups over 26 and 50 columns 296 and 472 ns): CELL_COST[0] + CELL_COST[1]·columns.
# Where the window kernel moves many groups it costs more (MobileNetV2: 690-900 ns, one group over 30 columns 413 ns),
# so this model favours the window there: it errs towards the kernel sampled before the cell kernel existed.
WINDOW_COST = 1.0
CELL_COST = (0.55, 0.0255)
CELL_GROUPS = (1, 2)  # the cell kernel's candidates: one group, two groups (_cell_groups)
CELL_COLUMNS = 48  # a group the cell kernel draws has at most this many counts in its core
# Envelope = margin × the largest window mass the pilot saw (over 2 million draws the largest was at most
# 3.5 % above a pilot's, ResNet-50, std-0.05/0.1 and mCB spaces). A draw above it makes the run restart with a larger
# envelope (same seed), so a small margin costs nothing in exactness, only an occasional restart.
ZMAX_MARGIN = 1.05
CHUNK_PROPOSALS = 1 << 18
# When the envelope is this close to 1 the window holds nearly all of t's prior (small σ): plain rejection of the
# same space accepts as often and costs less per draw, so the sampler uses it. 0.75, not 0.9 as first: ResNet-50
# std-0.01 at c_flops 0.5 has an envelope of 0.76, and there the window drew 741k recipes/s and plain rejection 1.09M
# (tools/bench_sampler.py --model resnet50, one core, the runs before and after the change); the exact one-group
# window (gauss_kernel) lowers envelopes, and under the old threshold ResNet-56 std-0.01 at c_flops 0.5 (0.95 before,
# 0.89 after) left plain rejection for the window.
PLAIN_ABOVE = 0.75
# A space is "nearly empty" when fewer than this fraction of proposals survive...
EMPTY_ACCEPTANCE = 1e-6
# ...measured over at least this many proposals.
EMPTY_MIN_PROPOSALS = 2_000_000


@dataclass
class Sample:
    """Recipes of one space and what they cost.

    ``recipe`` (n, G) float64, ``keep`` (n, G) int64, ``flops``/``params`` int64 and ``c_flops``, ``c_params``,
    ``mcb``, ``std`` float64 per row; ``stats`` holds proposals, acceptance, rejections by reason, seconds, u, the
    method and ``kernel`` (the method, and the groups the cell kernel drew: ``cells 0,8``).
    """

    space: Space
    recipe: np.ndarray
    keep: np.ndarray
    flops: np.ndarray
    params: np.ndarray
    c_flops: np.ndarray
    c_params: np.ndarray
    mcb: np.ndarray
    std: np.ndarray
    stats: dict = field(default_factory=dict)
    latency: np.ndarray | None = None  # int64 femtoseconds predicted by the table's latency model (c_latency)
    c_latency: np.ndarray | None = None

    def __len__(self):
        return len(self.recipe)


def _measure(table, space, recipe, keep, flops=None, params=None, std=None, latency=None) -> Sample:
    flops = table.flops(keep) if flops is None else flops
    params = table.params(keep) if params is None else params
    c_flops = flops / table.base_flops
    c_params = params / table.base_params
    std = np.asarray(recipe).std(axis=1) if std is None else std
    sample = Sample(space, recipe, keep, flops, params, c_flops, c_params, c_flops / c_params, std)
    if getattr(table, "latency", None) is not None:  # what the latency model predicts, whatever the target
        sample.latency = table.latency(keep) if latency is None else latency
        sample.c_latency = sample.latency / table.base_latency
    return sample


def _outputs(n, G, hashed=True):
    """The kernels' output rows (:class:`gauss_kernel.Rows`): recipe, keep, target value, other value, std(r) and
    the keep vector's hash (one unused entry when not ``hashed``)."""
    return gk.Rows(np.empty((n, G)), np.empty((n, G), np.int64), np.empty(n, np.int64), np.empty(n, np.int64),
                   np.empty(n), np.zeros(n if hashed else 1, np.uint64))


@dataclass(frozen=True)
class _Request:
    """What :func:`sample_space` was asked, as its sampling loop needs it (``table``: the unit view)."""

    table: object
    space: Space
    n: int
    seed: int
    distinct: bool
    max_seconds: float
    deadline: float  # time.monotonic() past which it gives up: one limit for pilot, probe, restarts and draws
    progress: object = None


def _target_bounds(table, space):
    (form, base), _ = target_form(table, space.target)
    return (space.value - space.delta) * base, (space.value + space.delta) * base


def window_direction(table, space: Space) -> np.ndarray:
    """The unit direction the window kernel draws t along for ``space`` (:func:`_direction` as :func:`sample_space`
    sets it up: on ``table``'s unit groups, at the space's centre)."""
    table, _ = unit_table(table)
    (form, _), _ = target_form(table, space.target)
    lo, hi = _target_bounds(table, space)
    return _direction(form, np.asarray(table.channels), space_center(table, space), hi - lo, space.R)


def _direction(form, channels, u, band, R):
    """Unit direction (entries >= 0) along which the kernel draws t: the target's gradient at the uniform recipe,
    kept on the subset of groups that maximises the expected acceptance.

    Any unit direction gives the space's exact distribution; the choice only moves the acceptance. Moving along
    it changes the counts of the groups it touches, and each such group widens the t-window by its rounding slack
    (∂F/∂keep_i, the target's change per channel) while the exact window stays ``band`` wide: the kept fraction is
    about ``band / (band + Σ slack_i)``. Groups it leaves out stay exactly known given the rest of the noise, at
    the price of a window whose position varies more, which costs a factor ``cos θ = |g_S| / |g|`` (g: the
    gradient over the ratios, S: the subset). Small groups with a large slack per channel (ResNet-50's 64- and
    128-channel groups) are worth leaving out: at c_flops 0.5 this doubles the acceptance.

    A group so narrow that ``(1 - R)·c < 1/2`` can reach the rule's floor of one channel inside the box; the window's
    rounding bounds would not hold for it, so it never moves (its count stays exact given e).
    """
    c = channels.astype(np.float64)
    movable = (1.0 - R) * c >= 0.5
    g, slack, order = _ranked_groups(form, channels, u, movable)
    if not np.all(np.isfinite(g)) or g[movable].sum() <= 0:
        return np.where(movable, 1.0, 0.0) / math.sqrt(max(1, movable.sum()))
    cos = np.sqrt(np.cumsum(g[order] ** 2) / (g * g).sum())
    kept = cos / (1.0 + np.cumsum(slack[order]) / band)
    subset = order[:int(np.argmax(kept)) + 1]
    d = np.zeros_like(c)
    d[subset] = g[subset]
    return np.ascontiguousarray(d / np.linalg.norm(d))


def _ranked_groups(form, channels, u, eligible):
    """(g, slack, order): the target's gradient over the ratios at the uniform recipe ``u``, its rounding slack per
    group (the gradient, or for a padded form the gradient widened by the blocks), and the ``eligible`` groups with
    ``g > 0`` by ``g²/slack``, best first (how much a group moves the target against how much its rounding blurs
    it)."""
    c = channels.astype(np.float64)
    slack = form.slack((1.0 - u) * c)
    g = form.gradient((1.0 - u) * c) * c
    useful = (g > 0) & eligible
    order = np.argsort(-np.where(useful, g * g / np.where(useful, slack, 1.0), -1.0))
    return g, slack, order[:int(useful.sum())]


def _cell_groups(form, channels, u, sigma):
    """The cell kernel's candidates (:mod:`nps.kernels.cell_kernel`): the first group of :func:`_ranked_groups`
    alone, and with the best-ranked group of another width (two groups of one width change count at the same noise,
    which keeps the target's level set lumpy: ResNet-20 at c_latency 0.5135, groups 0 and 1 have an envelope of 0.36,
    0 and 8 of 0.28), else the second. Only groups whose core spans at most CELL_COLUMNS counts (a walk costs one
    evaluation per count), any width otherwise (the count tables hold the one-channel floor)."""
    narrow = 2.0 * ck.CORE * sigma * channels <= CELL_COLUMNS
    g, _, order = _ranked_groups(form, channels, u, narrow)
    if not np.all(np.isfinite(g)) or len(order) == 0:
        return []
    first = int(order[0])
    other = [int(i) for i in order[1:] if channels[i] != channels[first]] or [int(i) for i in order[1:2]]
    return [groups for groups in [(first,)] + [(first, other[0])] * bool(other) if len(groups) in CELL_GROUPS]


def _explain_empty(space, proposals, accepted, counts, table):
    top = np.argsort(counts)[::-1]
    hint = ("use a std-<σ> space, raise R, or choose another target" if space.kind == "uniform"
            else "lower σ, raise R, or choose another target")
    named = ", ".join(f"{gk.REASON_NAMES[i]} {counts[i] / proposals:.1%}" for i in top[:3]
                      if counts[i] and i != gk.REASON_ENVELOPE)
    return (f"space {space.name} at {space.target}={space.value:g} (R={space.R:g}) is nearly empty for "
            f"{table.model}/{table.mode}: {accepted} of {proposals:,} proposals met every constraint "
            f"(rejected by {named}); {hint}")


def sample_space(table, space: Space, n: int, seed: int = 0, *, distinct: bool = True,
                 max_seconds: float = 600.0, progress=None) -> Sample:
    """Draw ``n`` recipes of ``space``, each meeting every constraint exactly on integer channels.

    Parameters
    ----------
    table : LayerTable
        The base network's layer table.
    space : Space
        What to sample (see :func:`nps.kernels.spaces.parse_space`).
    n : int
        How many recipes.
    seed : int
        The same seed reproduces the same recipes.
    distinct : bool
        Reject a recipe whose keep vector (the subnetwork) was drawn before.
    max_seconds : float
        Stop with :class:`SamplerError` when the estimated time to finish exceeds this.
    progress : callable, optional
        Called as ``progress(done, n)`` after each chunk.
    """
    if n < 1:
        raise SamplerError(f"n={n}: ask for at least one recipe")
    started = time.monotonic()
    table, unit_size = unit_table(table)  # groups with a granularity are drawn in units (see complexity.UnitTable)
    check_feasible(table, space)
    if space.mcb_band:
        _check_mcb_reachable(table, space, seed)
    channels = np.ascontiguousarray(table.channels, dtype=np.int64)
    G = len(channels)
    (tform, tbase), (oform, obase) = target_form(table, space.target)
    lo_t, hi_t = _target_bounds(table, space)
    target_is_flops = space.target == "c_flops"
    base_ratio = table.base_flops / table.base_params
    # mCB needs FLOPs and params; under a latency target the kernel carries neither as its target, so the band is
    # checked on each chunk's rows after the kernel (_mcb_filter)
    in_kernel = space.mcb_band is not None and space.target != LATENCY
    mcb_lo, mcb_hi = space.mcb_band if in_kernel else (0.0, 0.0)
    kernel_table = gk.Table(channels, tform.arrays(), oform.arrays(), *tform.pad_arrays())
    u = space_center(table, space) if space.kind != "uniform" else 0.0
    std_lo, std_hi = space.std_band if space.std_band else (0.0, np.inf)
    limits = gk.Limits(space.R, std_lo, std_hi, lo_t, hi_t, mcb_lo, mcb_hi, target_is_flops, base_ratio)
    window = space.kind != "uniform"  # the window kernel's direction (a padded form's too: gauss_kernel)
    direction = _direction(tform, channels, u, hi_t - lo_t, space.R) if window else None
    plain = False  # set below when the window buys nothing

    cells = chosen = None  # set below when the cell kernel draws this space

    def run(zmax, state, rows, job, counts):
        """One kernel call: fill ``rows`` from ``job.start`` on (``job``: a :class:`gauss_kernel.Job`)."""
        if plain or space.kind == "uniform":
            return gk.sample_plain(state, job, rows, kernel_table, limits,
                                   gk.Plain(space.kind != "uniform", u, space.sigma), counts)
        if cells is not None:
            return ck.sample_cells(state, job, rows, kernel_table, limits, cells._replace(zmax=zmax), counts)
        return gk.sample_gauss(state, job, rows, kernel_table, limits, gk.Window(u, space.sigma, direction, zmax),
                               counts)

    zmax = 1.0
    if window and not np.any(direction > 0):
        plain = True  # no group can move along t (every one is too narrow for R): nothing for a window to do
    elif window:
        # Pilot: the largest window mass over a few thousand draws, with margin, is the envelope. The kernel
        # reports every Z it sees, so a bound that turns out too small is caught below and the run restarts.
        zseen, kept = _pilot(run, seed, G)
        zmax = _envelope(zseen)
        # the window's bounds need a moving group's lower count bound x - 1 >= 0 inside the box (gauss_kernel)
        plain = zmax >= PLAIN_ABOVE or (1.0 - space.R) * channels[direction > 0].min() < 0.5
        if tform.padded and not plain:  # a padded target: the cell kernel too, where its pilots promise more
            cost = _per_recipe(WINDOW_COST, zmax, kept)
            for groups in _cell_groups(tform, channels, u, space.sigma):
                cells = ck.cell_tables(channels, groups, u, space.sigma, space.R, *tform.pad_arrays())  # run's
                zcells, kept_cells = _pilot(run, seed, G)
                estimate = _per_recipe(CELL_COST[0] + CELL_COST[1] * ck.walk_columns(cells), _envelope(zcells),
                                       kept_cells)
                if estimate < cost:
                    cost, chosen, zmax = estimate, cells, _envelope(zcells)
            cells = chosen
    request = _Request(table, space, n, seed, distinct, max_seconds, started + max_seconds, progress)
    while True:
        sample, zseen = _sample_with(run, request, zmax)
        if sample is not None:
            break
        log.info("envelope %.3g was exceeded (%.3g); restarting with a larger one", zmax, zseen)
        zmax = min(1.0, 1.25 * zseen)
    sample.stats["u"] = u if space.kind != "uniform" else float("nan")
    sample.stats["zmax"] = zmax
    sample.stats["method"] = "uniform rejection" if space.kind == "uniform" else (
        "plain rejection" if plain else "cells" if cells is not None else "window")
    sample.stats["kernel"] = sample.stats["method"]  # the method, with the groups the cell kernel drew by their counts
    if cells is not None:
        sample.stats["cell_groups"] = [int(g) for g in cells.pair if g >= 0]
        sample.stats["kernel"] += " " + ",".join(map(str, sample.stats["cell_groups"]))
    _verify(table, space, sample)
    if unit_size is not None:
        sample.keep = sample.keep * unit_size
    return sample


def _mcb_filter(table, space, rows, start, got, counts) -> int:
    """Keep, in order, the rows ``start .. start + got`` whose mCB lies in the space's band (moved up to
    ``start``); returns how many are left. For latency targets, where the kernel cannot check the band: its other
    form is FLOPs there (``target_form``), so only params are evaluated here."""
    if not got:
        return 0
    flops, keep = rows.other[start:start + got], rows.keep[start:start + got]
    mcb = (flops / table.base_flops) / (table.params(keep) / table.base_params)
    ok = np.flatnonzero((mcb >= space.mcb_band[0]) & (mcb <= space.mcb_band[1]))
    for arr in rows:  # (_sample_with's rows are always hashed: every array has a row per recipe)
        arr[start:start + ok.size] = arr[start + ok]
    counts[gk.REASON_MCB] += got - ok.size
    return int(ok.size)


def _check_mcb_reachable(table, space, seed, pilot=2000):
    """Fail at once when the mCB band misses every recipe the space draws at this target."""
    free = dataclasses.replace(space, mcb_band=None)
    probe = sample_space(table, free, pilot, seed + 7919, distinct=False, max_seconds=30.0)
    lo, hi = float(probe.mcb.min()), float(probe.mcb.max())
    band_lo, band_hi = space.mcb_band
    if band_hi < lo or band_lo > hi:
        raise SamplerError(f"mCB band [{band_lo:g}, {band_hi:g}] is out of reach at {space.target}="
                           f"{space.value:g}: recipes of this space (σ={space.sigma:g}, R={space.R:g}) reach mCB "
                           f"[{lo:.3f}, {hi:.3f}] ({pilot} drawn without the band)")


def _pilot(run, seed, G):
    """(largest window mass Z, share of proposals kept) over PILOT_PROPOSALS draws with no envelope (its own random
    stream; the recipes are dropped). The share over the envelope estimates a run's acceptance."""
    m = PILOT_PROPOSALS
    state = new_state([seed, 1])
    filled, used, zseen = run(1.0, state, _outputs(m, G, hashed=False), gk.Job(m, m, 0, False),
                              np.zeros(gk.N_REASONS, np.int64))
    return zseen, filled / max(used, 1)


def _per_recipe(per_proposal, envelope, kept):
    """A kernel's estimated cost of a recipe from its pilot: its cost a proposal over its acceptance (the share of
    the pilot's proposals kept, over the envelope); infinite when the pilot kept none."""
    return per_proposal * envelope / kept if kept > 0 else math.inf


def _envelope(zseen):
    """The envelope for a pilot's largest window mass: ZMAX_MARGIN above it, at most 1 (1 when it saw none)."""
    return min(1.0, ZMAX_MARGIN * zseen) if zseen > 0 else 1.0


def _drop_duplicates(rows, filled, counts):
    """Keep the first row of every keep vector (by its 64-bit hash), in order; returns the rows left.

    Sorting the hashes once per batch is cache-friendly, unlike a hash-table probe per draw.
    """
    ordered = np.sort(rows.hash[:filled])
    if not (ordered[1:] == ordered[:-1]).any():  # the usual case: nothing to drop
        return filled
    _, first = np.unique(rows.hash[:filled], return_index=True)
    kept = np.sort(first)
    for arr in rows:
        arr[:len(kept)] = arr[kept]
    counts[gk.REASON_DUPLICATE] += filled - len(kept)
    return len(kept)


def _sample_with(run, request: _Request, zmax):
    """``request.n`` rows with the envelope ``zmax``: (the sample, the largest window mass seen), or (None, that
    mass) as soon as it exceeds ``zmax`` (the caller restarts with a larger one)."""
    table, space, n, max_seconds = request.table, request.space, request.n, request.max_seconds
    state = new_state(request.seed)
    rows = _outputs(n, len(table.channels))  # with the 64-bit hash of each row's keep vector, for de-duplication
    counts = np.zeros(gk.N_REASONS, np.int64)
    filled = proposals = 0
    zseen = 0.0
    t0 = time.perf_counter()
    t_rate = None  # the rate is measured from the end of the first chunk on (that one includes numba's compile)
    rate_from = 0
    chunk = 4096
    mcb_after_kernel = space.target == LATENCY and space.mcb_band is not None  # (sample_space: not in the kernel)
    while filled < n:
        got, used, z = run(zmax, state, rows, gk.Job(n - filled, chunk, filled, request.distinct), counts)
        if mcb_after_kernel:
            got = _mcb_filter(table, space, rows, filled, got, counts)
        filled += got
        proposals += used
        zseen = max(zseen, z)
        if zseen > zmax:
            return None, zseen
        chunk = min(CHUNK_PROPOSALS, chunk * 2)
        if request.progress is not None:
            request.progress(filled, n)
        if filled >= n and request.distinct:
            filled = _drop_duplicates(rows, filled, counts)
        if t_rate is None:
            t_rate, rate_from = time.perf_counter(), filled
            continue
        if filled >= n:
            break
        if proposals >= EMPTY_MIN_PROPOSALS and filled < EMPTY_ACCEPTANCE * proposals:
            raise SamplerError(_explain_empty(space, proposals, filled, counts, table))
        if time.monotonic() > request.deadline:
            raise SamplerError(f"sampling {space.name} at {space.target}={space.value:g} reached its limit of "
                               f"{max_seconds:g} s with {filled:,} of {n:,} recipes drawn ({proposals:,} proposals);"
                               " raise max_seconds (--max-seconds) or ask for fewer recipes")
        elapsed = time.perf_counter() - t_rate
        if elapsed > 1.0:
            per_recipe = elapsed / max(filled - rate_from, 1)
            eta = per_recipe * (n - filled)
            if eta > max_seconds:
                raise SamplerError(_explain_empty(space, proposals, filled, counts, table)
                                   + f" (about {eta:,.0f} s more needed; limit {max_seconds:g} s)")
    seconds = time.perf_counter() - t0
    r, keep, tv, ov, std, _ = rows
    if space.target == "c_flops":
        sample = _measure(table, space, r, keep, tv, ov, std)
    elif space.target == LATENCY:  # the kernel's other form is FLOPs; params are computed here
        sample = _measure(table, space, r, keep, ov, None, std, latency=tv)
    else:
        sample = _measure(table, space, r, keep, ov, tv, std)
    sample.stats.update(proposals=int(proposals), accepted=int(n), seconds=seconds,
                        recipes_per_s=n / seconds if seconds > 0 else float("inf"),
                        rejected={gk.REASON_NAMES[i]: int(c) for i, c in enumerate(counts) if c})
    return sample, zseen


def _verify(table, space, sample):
    """The contract, checked on the integer counts before anything leaves the sampler (cheap: per-row values;
    the tests also recompute keep from every recipe)."""
    c = {"c_flops": sample.c_flops, "c_params": sample.c_params, LATENCY: sample.c_latency}[space.target]
    ok = np.abs(c - space.value) <= space.delta + 1e-12
    if not (sample.recipe.min() >= 0 and sample.recipe.max() <= space.R):  # pragma: no cover - a kernel bug
        ok &= (sample.recipe.min(axis=1) >= 0) & (sample.recipe.max(axis=1) <= space.R)
    if space.std_band:
        ok &= (sample.std >= space.std_band[0]) & (sample.std <= space.std_band[1])
    if space.mcb_band:
        ok &= (sample.mcb >= space.mcb_band[0]) & (sample.mcb <= space.mcb_band[1])
    if not ok.all():  # pragma: no cover - a kernel bug, never bad input
        raise AssertionError(f"sampler returned {int((~ok).sum())} recipes that break the constraints")


def sample_naive(table, space: Space, n: int, seed: int = 0, *, max_proposals: int = 10_000_000,
                 batch: int = 100_000) -> tuple[Sample, int]:
    """Plain rejection sampling of ``space`` in numpy; returns (sample of at most n rows, proposals used).

    Proposals: ``U[0, R]^G`` for the uniform space, ``u + N(0, σ²)`` per group otherwise; kept when every
    constraint holds. No de-duplication: this is the space's distribution as defined.
    """
    table, unit_size = unit_table(table)
    check_feasible(table, space)
    rng = np.random.default_rng(seed)
    channels = np.asarray(table.channels)
    G = len(channels)
    u = space_center(table, space) if space.kind != "uniform" else 0.0
    (tform, tbase), _ = target_form(table, space.target)
    kept_r = []
    total = 0
    used = 0
    while total < n and used < max_proposals:
        m = min(batch, max_proposals - used)
        if space.kind == "uniform":
            r = rng.random((m, G)) * space.R
        else:
            r = u + space.sigma * rng.standard_normal((m, G))
        used += m
        ok = (r >= 0).all(axis=1) & (r <= space.R).all(axis=1)
        if space.std_band:
            s = r.std(axis=1)
            ok &= (s >= space.std_band[0]) & (s <= space.std_band[1])
        r = r[ok]
        keep = keep_from_recipe(r, channels)
        f = table.flops(keep)
        p = table.params(keep)
        c = tform(keep) / tbase
        ok = np.abs(c - space.value) <= space.delta
        if space.mcb_band:
            mcb = (f / table.base_flops) / (p / table.base_params)
            ok &= (mcb >= space.mcb_band[0]) & (mcb <= space.mcb_band[1])
        kept_r.append(r[ok])
        total += int(ok.sum())
    r = np.concatenate(kept_r)[:n] if kept_r else np.empty((0, G))
    sample = _measure(table, space, r, keep_from_recipe(r, channels))
    if unit_size is not None:
        sample.keep = sample.keep * unit_size
    return sample, used
