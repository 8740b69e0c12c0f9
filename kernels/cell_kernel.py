"""The cell kernel: exact draws of a Gaussian space over one or two groups' counts (a padded target's sampler).

Under a padded form (a latency model whose kernels compute channels in blocks) the target is a staircase in each
group's count. The window kernel (:mod:`nps.kernels.gauss_kernel`) draws the noise ``t`` along a direction inside a
window that it bounds by two quadratics and, where one group moves, narrows to that group's counts; every proposal
pays for the quadratics' roots and four normal CDFs. Here the groups left out of ``e`` are drawn by their counts.

A group g drawn so has its noise ``n ~ N(0, σ²)`` independent of every other group's (coordinates, not a direction),
and its count is ``k`` exactly when ``n`` lies in an interval ``I_g(k)`` (the rounding rule
``max(1, floor((1 - r)·c + 1/2))`` with ``r = u + n`` in ``[0, R]``) that does not depend on ``e``: the prior mass
``m_g(k)`` of every count is computed once per call (:func:`cell_tables`). Given ``e``, which fixes every other
count, the target is a function of the drawn groups' counts alone, non-decreasing in each (non-negative
coefficients). With one group the counts that meet the target are a run; with two (``g1``, the narrower, outside,
``g2`` inside) the ``k2`` that meet it for each ``k1`` are a run that moves down as ``k1`` grows, and a staircase
walk finds every such cell with at most ``2·(n1 + n2)`` evaluations of the target. Their mass
``Z(e) = Σ m_1(k1)·m_2(k2)`` is the prior mass of the drawn groups' noise that meets the target, exactly (no
root, no CDF per proposal). The kernel accepts ``e`` with probability ``Z/zmax``, picks a cell with probability
proportional to its mass (the uniform that decided the acceptance, by its place in the cells' running sum) and draws
each noise from the prior truncated to its count's interval. Accepted recipes then have the prior's density on the
recipes that meet the target, as plain rejection's do; the std(r) and mCB checks follow, as in the other kernels.

Two groups let their counts trade against each other, which evens out ``Z`` over ``e``: the envelope (the largest
``Z``) falls and the acceptance rises (ResNet-20, STD-0.05 at c_latency 0.5135: 0.118 over groups 0 and 8 against
0.067 over group 0 alone), at the price of the walk. The sampler picks the window, one group or two by their pilots
(:func:`nps.kernels.samplers.sample_space`).

The walk covers the core first, the counts whose interval meets ``±core·σ``; the cells outside it hold at most
``outside`` of the prior mass (the two groups' masses outside their cores). Only a uniform that lands in
``[Z_core, Z_core + outside)`` walks every count (about 1 % of the proposals at ``core`` 3: ResNet-20's groups 0
and 8 hold 0.0028 outside, against an envelope of 0.28). ``zmax`` must bound ``Z``: the caller sets it from a
pilot; the kernel reports the largest ``Z`` it saw, exactly wherever ``Z`` could
exceed ``zmax``, and the caller restarts with a larger bound when it did.

Speed: the walk and the pick are inlined into the kernel (``inline="always"``): as a called function the walk took
its arrays' reference counts on every proposal, 274 against 233 ns a proposal over two groups.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from nps.kernels.complexity import njit, padded_channels
from nps.kernels.gauss_kernel import (REASON_BOX, REASON_ENVELOPE, REASON_WINDOW, _check_row, _count, _lower_tail,
                                      _pairs_by_kind, _phi_cdf, _store_row, _truncated_from)
from nps.kernels.xoshiro import fill_normals, uniform

# The walk's first region, ±CORE·σ of each group's noise (see the module docstring). ResNet-20, STD-0.05 at
# c_latency 0.5135 over groups 0 and 8: 337k recipes/s at 3, 294k at 4.5 (a longer walk), 296k at 2 (the outer walk
# more often); one run each, thread CPU.
CORE = 3.0


class Cells(NamedTuple):
    """The proposal of :func:`sample_cells`: the drawn groups' count tables (row 0: ``g1``, row 1: ``g2``; column
    ``j`` is count ``first[row] + j``) and the envelope. One group: row 0 is a stand-in, ``g1 = -1``, with one
    column of mass 1 and count 0."""

    u: float
    sigma: float
    pair: np.ndarray     # (2,) int64: g1 (-1: none), g2
    first: np.ndarray    # (2,) int64: the lowest count in each table
    size: np.ndarray     # (2,) int64: how many counts each table holds
    mass: np.ndarray     # (2, n) float64: the prior mass of each count's noise interval
    cum: np.ndarray      # (2, n + 1) float64: the running sum of ``mass`` (cum[:, j] = Σ mass[:, :j])
    lo: np.ndarray       # (2, n) float64: each count's noise interval, in σ units
    hi: np.ndarray
    padded: np.ndarray   # (2, n) int64: each count's padded count (0 without padding)
    core: np.ndarray     # (2, 2) int64: each table's core, first and last column
    outside: float       # a bound on the prior mass of the cells outside the core
    zmax: float


def count_table(c: int, u: float, sigma: float, R: float, mult: int = 1, block: int = 0):
    """One group's counts with prior mass in double precision (``c`` channels, ratio ``u + N(0, σ²)`` in
    ``[0, R]``; ``block`` > 0: its padded count ``block·ceil(mult·k/block)``), ascending: (counts, the noise interval
    of each in σ units ``lo``, ``hi``, its mass, its padded count or 0)."""
    rows = []
    for k in range(1, c + 1):
        r_lo = max(1.0 - (k + 0.5) / c, 0.0)  # the ratios that round to k: (r_lo, r_hi], count 1 up to R
        r_hi = R if k == 1 else min(1.0 - (k - 0.5) / c, R)
        if not r_lo < r_hi:
            continue
        a, b = (r_lo - u) / sigma, (r_hi - u) / sigma
        m = _phi_cdf(b) - _phi_cdf(a) if a <= 0.0 else _phi_cdf(-a) - _phi_cdf(-b)  # the tail: Φ keeps precision
        if m > 0.0:
            rows.append((k, a, b, m, block * -(-(mult * k) // block) if block else 0))
    k, lo, hi, m, p = (np.array(col) for col in zip(*rows))
    assert np.array_equal(k, np.arange(k[0], k[0] + k.size)), k  # the counts with mass are a run
    return k, lo, hi, m, p.astype(np.int64)


def cell_tables(channels, groups, u: float, sigma: float, R: float, pad_mult, pad_block, zmax: float = 1.0,
                core: float | None = None) -> Cells:
    """The :class:`Cells` of ``groups`` (one or two group indices; two: the one with fewer channels outside) for a
    space centred at ``u`` with noise σ and ratios in ``[0, R]`` (``pad_mult``, ``pad_block``: a padded form's,
    empty otherwise). ``core`` (default :data:`CORE`) sets the walk's first region."""
    core = CORE if core is None else core
    groups = sorted((int(g) for g in groups), key=lambda g: (channels[g], g))
    tables = [] if len(groups) == 2 else [(np.zeros(1, np.int64), np.array([-np.inf]), np.array([np.inf]),
                                           np.ones(1), np.zeros(1, np.int64))]
    for g in groups:
        pad = (int(pad_mult[g]), int(pad_block[g])) if len(pad_mult) else (1, 0)
        tables.append(count_table(int(channels[g]), u, sigma, R, *pad))
    n = max(t[0].size for t in tables)
    lo, hi, mass, cum = np.zeros((2, n)), np.zeros((2, n)), np.zeros((2, n)), np.zeros((2, n + 1))
    padded = np.zeros((2, n), np.int64)
    cores = np.zeros((2, 2), np.int64)
    outside = 0.0
    for row, (k, a, b, m, p) in enumerate(tables):
        size = k.size
        lo[row, :size], hi[row, :size], mass[row, :size], padded[row, :size] = a, b, m, p
        cum[row, 1:size + 1] = np.cumsum(m)
        cum[row, size + 1:] = cum[row, size]
        inside = np.flatnonzero((b >= -core) & (a <= core))
        if inside.size == 0:  # the whole table lies in a tail: walk all of it
            inside = np.arange(size)
        cores[row] = inside[0], inside[-1]
        outside += m[:inside[0]].sum() + m[inside[-1] + 1:].sum()
    return Cells(float(u), float(sigma), np.array([-1] * (2 - len(groups)) + groups, np.int64),
                 np.array([t[0][0] for t in tables], np.int64), np.array([t[0].size for t in tables], np.int64),
                 mass, cum, lo, hi, padded, cores, float(outside), float(zmax))


def walk_columns(cells: Cells) -> int:
    """How many counts the core walk covers (both tables' cores): what a proposal's walk costs grows with it."""
    return int((cells.core[:, 1] - cells.core[:, 0] + 1).sum())


class _Form(NamedTuple):
    """The target as a function of the pair's counts, the part fixed for a call: its terms by kind
    (:func:`gauss_kernel._pairs_by_kind`) and the weights ``w[i, j]`` of the products of the pair's own variables
    ``y = (k1, k2, P1, P2)`` (P: a padded count), upper triangle."""

    moving: np.ndarray  # variable v's place in y, -1 when e fixes it
    ff_a: np.ndarray
    ff_b: np.ndarray
    ff_w: np.ndarray
    fm_f: np.ndarray
    fm_j: np.ndarray
    fm_w: np.ndarray
    w: np.ndarray       # (4, 4) int64


@njit(nogil=True, cache=True)
def _cell_form(G, pair, form):
    V = form[1].shape[0]
    moving = np.zeros(V, dtype=np.int64) - 1
    for j in range(2):
        if pair[j] < 0:  # one group: the first is a stand-in with one count (see cell_tables)
            continue
        moving[pair[j]] = j
        if V > G:
            moving[G + pair[j]] = 2 + j
    (ff_a, ff_b, ff_w), (fm_f, fm_m, fm_j, fm_w), (mm_a, mm_b, mm_w) = _pairs_by_kind(moving, form)
    w = np.zeros((4, 4), dtype=np.int64)
    for q in range(mm_w.shape[0]):
        i, j = moving[mm_a[q]], moving[mm_b[q]]
        w[min(i, j), max(i, j)] += mm_w[q]
    return _Form(moving, ff_a, ff_b, ff_w, fm_f, fm_j, fm_w, w)


@njit(nogil=True, cache=True, inline="always")
def _slice(A, B, w, k1, p1):
    """For a given count ``k1`` (padded ``p1``) of g1: the target at count ``k2`` of g2 is
    ``alpha + beta·k2 + gamma·P2 + own2(k2)``; returns (alpha, beta, gamma)."""
    alpha = A + B[0] * k1 + B[2] * p1 + w[0, 0] * k1 * k1 + w[0, 2] * k1 * p1 + w[2, 2] * p1 * p1
    beta = B[1] + w[0, 1] * k1 + w[1, 2] * p1
    gamma = B[3] + w[0, 3] * k1 + w[2, 3] * p1
    return alpha, beta, gamma


@njit(nogil=True, cache=True, inline="always")
def _own2(w, k2, p2):
    """g2's own products at its count ``k2`` (padded ``p2``): the target's part that only g2's variables make."""
    return w[1, 1] * k2 * k2 + w[1, 3] * k2 * p2 + w[3, 3] * p2 * p2


@njit(nogil=True, cache=True, inline="always")
def _at(alpha, beta, gamma, first2, padded, own2, j2):
    """The target at column ``j2`` of g2 (its lowest count ``first2``; ``padded``: the tables' padded counts), given
    :func:`_slice`'s terms for a count of g1. Arrays, not the :class:`Cells`: an array taken from a tuple in the
    walk's loop costs a reference count each time (the speed rule, gauss_kernel)."""
    return alpha + beta * (first2 + j2) + gamma * padded[1, j2] + own2[j2]


@njit(nogil=True, cache=True, inline="always")
def _walk(A, B, w, own2, cells, j1a, j1b, j2a, j2b, lo_t, hi_t, skip_a, skip_b, s_j1, s_a, s_b, s_cum):
    """The staircase over columns ``j1a..j1b`` of g1 and ``j2a..j2b`` of g2: for each j1 the run ``a..b`` of j2 whose
    cells meet ``[lo_t, hi_t]``, less the columns ``skip_a..skip_b`` of g2 where j1 lies in the core (the cells the
    core walk counted; ``skip_a > skip_b``: none). Each slice with mass goes into the ``s_*`` arrays (its j1, its run
    and the running mass after it); returns (the mass, the slices stored)."""
    first, mass, cum, padded = cells.first, cells.mass, cells.cum, cells.padded
    c1a, c1b = cells.core[0, 0], cells.core[0, 1]
    b = j2b      # the last j2 whose cell is at most hi_t: non-increasing in j1
    a = j2b + 1  # the first j2 whose cell is at least lo_t: non-increasing in j1
    z = 0.0
    n = 0
    for j1 in range(j1a, j1b + 1):
        k1 = first[0] + j1
        alpha, beta, gamma = _slice(A, B, w, k1, padded[0, j1])
        while b >= j2a and _at(alpha, beta, gamma, first[1], padded, own2, b) > hi_t:
            b -= 1
        if b < j2a:
            break  # every cell of this j1 and the larger ones is above the band
        if a > b + 1:
            a = b + 1  # the cells above b exceed hi_t, so they are at least lo_t: the run starts at b + 1 or below
        while a > j2a and _at(alpha, beta, gamma, first[1], padded, own2, a - 1) >= lo_t:
            a -= 1
        if a > b:
            continue
        m = cum[1, b + 1] - cum[1, a]
        if _skipped(c1a, c1b, j1, skip_a, skip_b):  # the core's part of the run was counted already
            lo_, hi_ = max(a, skip_a), min(b, skip_b)
            if lo_ <= hi_:
                m -= cum[1, hi_ + 1] - cum[1, lo_]
        if m <= 0.0:
            continue
        z += mass[0, j1] * m
        s_j1[n], s_a[n], s_b[n], s_cum[n] = j1, a, b, z
        n += 1
    return z, n


@njit(nogil=True, cache=True, inline="always")
def _skipped(c1a, c1b, j1, skip_a, skip_b):
    """Whether the walk passes over g2's columns ``skip_a..skip_b`` at column ``j1`` of g1: there are some, and j1 is
    in g1's core ``c1a..c1b`` (the outer walk leaves the core walk's cells to it)."""
    return skip_a <= skip_b and c1a <= j1 <= c1b


@njit(nogil=True, cache=True, inline="always")
def _pick(cells, v, z0, s_j1, s_a, s_b, s_cum, n, skip_a, skip_b):
    """The cell where ``v`` falls in the slices' running mass (starting at ``z0``): (j1, j2). Within a slice the
    residual picks j2 along g2's running mass, passing over the columns :func:`_walk` passed over."""
    mass, cum = cells.mass, cells.cum
    s = 0
    while s < n - 1 and s_cum[s] <= v - z0:
        s += 1
    before = z0 + (s_cum[s - 1] if s > 0 else 0.0)
    j1 = s_j1[s]
    rest = (v - before) / mass[0, j1]
    j2 = s_a[s]
    skipping = _skipped(cells.core[0, 0], cells.core[0, 1], j1, skip_a, skip_b)
    while j2 < s_b[s]:
        if not (skipping and skip_a <= j2 <= skip_b):
            if rest < mass[1, j2]:
                break
            rest -= mass[1, j2]
        j2 += 1
    if skipping and skip_a <= j2 <= skip_b:  # rounding left it in the skipped part: the run's last cell outside
        j2 = s_b[s] if s_b[s] > skip_b else skip_a - 1
    return j1, j2


@njit(nogil=True, cache=True, inline="always")
def _draw(state, lo, hi, u, sigma):
    """A ratio ``u + σ·t``, t from the prior truncated to ``[lo, hi]`` (σ units)."""
    a, b, flip, fa, fb = _lower_tail(lo, hi)
    t = _truncated_from(state, a, b, fa, fb)
    return u + sigma * (-t if flip else t)


@njit(nogil=True, cache=True)
def sample_cells(state, job, rows, table, limits, proposal, counts):
    """Fill rows ``job.start..`` of ``rows`` with accepted recipes of a Gaussian space (``proposal``: a
    :class:`Cells`; ``counts``: rejections by reason, added to); returns (rows filled, proposals used, largest
    window mass Z seen), as :func:`gauss_kernel.sample_gauss`."""
    cells = proposal
    u, sigma, zmax, R = cells.u, cells.sigma, cells.zmax, limits.R
    channels = table.channels
    G = channels.shape[0]
    tconst, tlin = table.target[0], table.target[1]
    pad_mult, pad_block = table.tpad_mult, table.tpad_block
    oconst, olin, opa, opb, opw = table.other
    g1, g2 = cells.pair[0], cells.pair[1]
    f = _cell_form(G, cells.pair, table.target)
    moving, w = f.moving, f.w
    n2 = cells.size[1]
    own2 = np.zeros(n2, dtype=np.int64)  # g2's own products at each of its counts
    for j in range(n2):
        k, p = cells.first[1] + j, cells.padded[1, j]
        own2[j] = _own2(w, k, p)
    c1a, c1b, c2a, c2b = cells.core[0, 0], cells.core[0, 1], cells.core[1, 0], cells.core[1, 1]
    last1, last2 = cells.size[0] - 1, n2 - 1
    npad = pad_mult.shape[0]
    pad_of = np.zeros((npad, (channels.max() + 1) if npad else 1), dtype=np.int64)  # padded count by count
    for i in range(npad):
        for k in range(channels[i] + 1):
            pad_of[i, k] = padded_channels(k, pad_mult[i], pad_block[i])
    e = np.empty(G)
    r = np.empty(G)
    x = np.empty(tlin.shape[0], dtype=np.int64)
    keep = x[:G]
    B0 = np.zeros(4, dtype=np.int64)  # the target's linear coefficients of y, before the pairs with fixed variables
    for v_ in range(tlin.shape[0]):
        if moving[v_] >= 0:
            B0[moving[v_]] = tlin[v_]
    fixed = np.flatnonzero(moving[:G] < 0)  # the groups e fixes
    B = np.empty(4, dtype=np.int64)
    n1 = cells.size[0]
    s_j1, s_a, s_b, s_cum = (np.empty(n1, np.int64), np.empty(n1, np.int64), np.empty(n1, np.int64),
                             np.empty(n1))
    t_j1, t_a, t_b, t_cum = (np.empty(n1, np.int64), np.empty(n1, np.int64), np.empty(n1, np.int64),
                             np.empty(n1))
    filled = 0
    used = 0
    zseen = 0.0
    while filled < job.n_want and used < job.max_proposals:
        used += 1
        fill_normals(state, e)
        # every other group's count, fixed by e; the target's part they fix (A) and its coefficients of y (B)
        A = tconst
        out_of_box = False
        total = 0.0
        for i in range(G):
            if moving[i] >= 0:
                B[moving[i]] = tlin[i]
                continue
            ri = u + sigma * e[i]
            r[i] = ri
            total += ri
            if ri < 0.0 or ri > R:
                out_of_box = True
            k = _count(ri, channels[i])
            x[i] = k
            A += tlin[i] * k
        if out_of_box:
            counts[REASON_BOX] += 1
            continue
        for i in range(pad_mult.shape[0]):
            v_ = G + i
            if moving[v_] >= 0:
                B[moving[v_]] = tlin[v_]
            else:
                p = pad_of[i, x[i]]
                x[v_] = p
                A += tlin[v_] * p
        for q in range(f.ff_w.shape[0]):
            A += f.ff_w[q] * x[f.ff_a[q]] * x[f.ff_b[q]]
        for q in range(f.fm_w.shape[0]):
            B[f.fm_j[q]] += f.fm_w[q] * x[f.fm_f[q]]
        z, ns = _walk(A, B, w, own2, cells, c1a, c1b, c2a, c2b, limits.lo_t, limits.hi_t, 1, 0,
                      s_j1, s_a, s_b, s_cum)
        v = uniform(state) * zmax
        nt = 0
        zt = 0.0
        full = (z <= v < z + cells.outside) or z + cells.outside > zmax
        if full:  # the cells outside the core: rare (see the module docstring)
            zt, nt = _walk(A, B, w, own2, cells, 0, last1, 0, last2, limits.lo_t, limits.hi_t, c2a, c2b,
                           t_j1, t_a, t_b, t_cum)
        zall = z + zt
        if zall > zseen:
            zseen = zall
        if v >= zall:
            counts[REASON_ENVELOPE if zall > 0.0 else REASON_WINDOW] += 1
            continue
        if v < z:
            j1, j2 = _pick(cells, v, 0.0, s_j1, s_a, s_b, s_cum, ns, 1, 0)
        else:
            j1, j2 = _pick(cells, v, z, t_j1, t_a, t_b, t_cum, nt, c2a, c2b)
        # the pair's noise, each from the prior truncated to its count's interval
        k1 = p1 = 0
        if g1 >= 0:
            r[g1] = _draw(state, cells.lo[0, j1], cells.hi[0, j1], u, sigma)
            total += r[g1]
        r[g2] = _draw(state, cells.lo[1, j2], cells.hi[1, j2], u, sigma)
        total += r[g2]
        # exact checks on the integer counts, in the other kernels' order
        if (g1 >= 0 and (r[g1] < 0.0 or r[g1] > R)) or r[g2] < 0.0 or r[g2] > R:
            counts[REASON_BOX] += 1
            continue
        if g1 >= 0:
            k1 = _count(r[g1], channels[g1])
            x[g1] = k1
            p1 = pad_of[g1, k1] if npad else 0
        k2 = _count(r[g2], channels[g2])
        x[g2] = k2
        p2 = pad_of[g2, k2] if npad else 0
        alpha, beta, gamma = _slice(A, B, w, k1, p1)
        tv = alpha + beta * k2 + gamma * p2 + _own2(w, k2, p2)
        ok, ov, sd = _check_row(r, total, keep, tv, limits, oconst, olin, opa, opb, opw, counts)
        if not ok:
            continue
        _store_row(rows, job.start + filled, r, keep, tv, ov, sd, job.dedup)
        filled += 1
    return filled, used, zseen
