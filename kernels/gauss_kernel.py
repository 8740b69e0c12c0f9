"""Numba kernels that draw recipes of the Gaussian spaces (STD-σ, mCB-refined) and of the uniform space.

Exact sampling, fast (DESIGN.md, "recipe samplers"): the noise ``ε ~ N(0, σ²I)`` is split into its part ``e``
orthogonal to a unit direction ``d`` with non-negative entries and ``t·d`` with ``t ~ N(0, σ²)``; for an isotropic
Gaussian the two are independent, whatever ``d`` is (the caller picks the target's gradient restricted to the groups
worth moving, see ``samplers._direction``). Along ``t`` every kept-channel count is non-increasing, so for a given
``e`` the ``t`` that meet the target form an interval, and two quadratics (the form at the upper and lower ends of
every count: a moving count is rounded, a count ``d`` leaves out is exact; a padded latency form's padded counts lie
within a block of their count times ``mult``) give a window ``[a, b]`` that contains it. The kernel draws ``e``,
computes the window, accepts ``e`` with probability ``Z(e)/zmax`` (``Z`` = prior mass of ``t`` in the window) and
draws ``t`` from the prior truncated to the window. The product is the prior times the window indicator, so after the
exact check of every constraint on the integer counts the accepted recipes follow the space's distribution, the same
as plain rejection. ``zmax`` must bound ``Z``: the caller sets it from a pilot and the kernel reports any ``Z`` above
it, and the caller then restarts with a larger bound.

Where the direction moves one group only (a small network's usual case: ResNet-20 and ResNet-56 move one stream
group) the kernel goes further: the few counts of that group inside the window give the exact window, the t whose
count meets the target on the integer counts (:func:`_one_group_window`), and ``Z`` is its mass. No drawn t then
misses the target after rounding, and the envelope, the largest ``Z``, is smaller (ResNet-20, STD-0.05 at the
c_latency of c_flops 0.25's mean latency: 0.49 against 0.66, acceptance 0.106 against 0.080).

Under a padded target the sampler may draw with the cell kernel instead (:mod:`nps.kernels.cell_kernel`), which
prices one or two groups' counts exactly without a window's roots and CDFs, when its pilot promises a recipe sooner.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from nps.kernels.complexity import evaluate_one, njit, pad_variables, padded_channels
from nps.kernels.xoshiro import fill_normals, uniform

# Rejection reasons, indices into the counters the kernels return.
REASON_STD = 0        # std(r) outside its band
REASON_WINDOW = 1     # no t meets the target inside [0, R] for this e
REASON_ENVELOPE = 2   # internal: thinning by Z/zmax (not a constraint)
REASON_TARGET = 3     # the target missed after rounding to integer channels
REASON_MCB = 4        # mCB outside its band
REASON_DUPLICATE = 5  # same keep vector as an earlier recipe (counted by the caller, which de-duplicates)
REASON_BOX = 6        # a ratio outside [0, R] (uniform space never; float slop otherwise)
N_REASONS = 7
REASON_NAMES = ("std(r) band", "target with r in [0, R]", "envelope", "target after rounding", "mCB band",
                "duplicate", "r in [0, R]")

_SQRT2 = math.sqrt(2.0)


@njit(nogil=True, cache=True)
def _phi_cdf(x):
    return 0.5 * math.erfc(-x / _SQRT2)


@njit(nogil=True, cache=True)
def _norm_ppf(p):
    """Inverse standard normal CDF: Acklam's rational approximation refined by one Halley step."""
    if p <= 0.0:
        return -np.inf
    if p >= 1.0:
        return np.inf
    a0, a1, a2, a3, a4, a5 = -3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02, \
        1.383577518672690e+02, -3.066479806614716e+01, 2.506628277459239e+00
    b0, b1, b2, b3, b4 = -5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02, \
        6.680131188771972e+01, -1.328068155288572e+01
    c0, c1, c2, c3, c4, c5 = -7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00, \
        -2.549732539343734e+00, 4.374664141464968e+00, 2.938163982698783e+00
    d0, d1, d2, d3 = 7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00, 3.754408661907416e+00
    plow = 0.02425
    if p < plow:
        q = math.sqrt(-2.0 * math.log(p))
        x = (((((c0 * q + c1) * q + c2) * q + c3) * q + c4) * q + c5) / ((((d0 * q + d1) * q + d2) * q + d3) * q + 1.0)
    elif p <= 1.0 - plow:
        q = p - 0.5
        rr = q * q
        x = (((((a0 * rr + a1) * rr + a2) * rr + a3) * rr + a4) * rr + a5) * q / \
            (((((b0 * rr + b1) * rr + b2) * rr + b3) * rr + b4) * rr + 1.0)
    else:
        q = math.sqrt(-2.0 * math.log(1.0 - p))
        x = -(((((c0 * q + c1) * q + c2) * q + c3) * q + c4) * q + c5) / \
            ((((d0 * q + d1) * q + d2) * q + d3) * q + 1.0)
    e = _phi_cdf(x) - p
    u = e * math.sqrt(2.0 * math.pi) * math.exp(0.5 * x * x)
    return x - u / (1.0 + 0.5 * x * u)


@njit(nogil=True, cache=True)
def _truncated_from(state, a, b, fa, fb):
    """One draw of N(0, 1) restricted to [a, b] by the inverse CDF, given ``fa = Φ(a)`` and ``fb = Φ(b)`` (which the
    kernel has from the window mass). Call it with ``a <= 0`` (mirror the window otherwise), where the CDF keeps
    its relative precision."""
    x = _norm_ppf(fa + uniform(state) * (fb - fa))
    if x < a:
        x = a
    elif x > b:
        x = b
    return x


@njit(nogil=True, cache=True, inline="always")  # inline: the speed rule (see Rows, below)
def _root_decreasing(a0, b1, q2, level):
    """Smallest s with a0 - b1·s + q2·s² = level (q2 >= 0, the branch where the form decreases).

    -inf when a form that never changes is already at or below ``level``; NaN when ``level`` is never reached.
    """
    cc = a0 - level
    if q2 == 0.0:
        if b1 > 0.0:
            return cc / b1
        return -np.inf if cc <= 0.0 else np.nan
    disc = b1 * b1 - 4.0 * q2 * cc
    if disc < 0.0:
        return np.nan
    return 2.0 * cc / (b1 + math.sqrt(disc))




_P1 = np.uint64(0x9E3779B185EBCA87)
_P2 = np.uint64(0xC2B2AE3D27D4EB4F)


@njit(nogil=True, cache=True)
def _round(acc, x):
    acc += x * _P2
    acc = (acc << np.uint64(31)) | (acc >> np.uint64(33))
    return acc * _P1


@njit(nogil=True, cache=True)
def _hash_keep(keep):
    """64-bit hash of a keep vector: four independent multiply-rotate lanes (xxHash64's round), so the dependent
    chain is a quarter as long as one lane over every count, then mixed together and finalised."""
    G = keep.shape[0]
    h0 = np.uint64(0x60EA27EEADC0B5D6)
    h1 = np.uint64(0xC2B2AE3D27D4EB4F)
    h2 = np.uint64(0)
    h3 = np.uint64(0x61C8864E7A143579)
    n4 = G - G % 4
    for i in range(0, n4, 4):
        h0 = _round(h0, np.uint64(keep[i]))
        h1 = _round(h1, np.uint64(keep[i + 1]))
        h2 = _round(h2, np.uint64(keep[i + 2]))
        h3 = _round(h3, np.uint64(keep[i + 3]))
    for i in range(n4, G):
        h0 = _round(h0, np.uint64(keep[i]))
    h = _round(_round(_round(h0, h1), h2), h3) ^ np.uint64(G)
    h ^= h >> np.uint64(33)
    h *= _P2
    h ^= h >> np.uint64(29)
    if h == np.uint64(0):
        h = np.uint64(1)
    return h


@njit(nogil=True, cache=True, inline="always")
def _count(r, c):
    """Kept channels of a group with ratio ``r`` and ``c`` channels: ``max(1, floor((1 - r)·c + 1/2))``, the rule of
    ``complexity.keep_from_recipe``; every count in the kernels goes through here so they all agree."""
    return max(1, int(math.floor((1.0 - r) * c + 0.5)))


@njit(nogil=True, cache=True, inline="always")
def _std(r, total):
    """Population standard deviation of a recipe whose entries sum to ``total`` (the second of numpy's two
    passes; the callers have the sum from a loop they run anyway)."""
    G = r.shape[0]
    mean = total / G
    ss = 0.0
    for i in range(G):
        ss += (r[i] - mean) * (r[i] - mean)
    return math.sqrt(ss / G)


@njit(nogil=True, cache=True, inline="always")
def _mcb(tv, ov, target_is_flops, base_ratio):
    """mCB = c_flops / c_params from the target and the other form's values."""
    return (tv / ov) / base_ratio if target_is_flops else (ov / tv) / base_ratio


# --------------------------------------------------------------------------------------------------------------------
# What the kernels take, packed: named tuples of arrays and scalars, which numba passes as they are (unpacking them
# costs nothing measurable per draw). The speed rule of the per-draw helpers below: they are inline="always" and call
# nothing that is not inlined too, because numba keeps a reference count (an atomic add) on every array an inlined
# helper holds across a call it cannot inline, on every draw. So sample_gauss calls fill_normals itself, _finish
# evaluates the forms through an inlined evaluate_one and _root_decreasing is inlined: each of these broke the rule
# at first and cost 3-8 % of the rate (ResNet-50; the former flat-argument kernels and these interleaved in one
# process, CPU time). Now both kernels run within the noise (a few %) of the former ones, row for row the same.


class Rows(NamedTuple):
    """The output rows a kernel fills, one per accepted recipe."""

    recipe: np.ndarray  # (n, G) float64: the ratios
    keep: np.ndarray    # (n, G) int64: the kept-channel counts
    target: np.ndarray  # (n,) int64: the target form's value (FLOPs for c_flops, params for c_params)
    other: np.ndarray   # (n,) int64: the other form's value
    std: np.ndarray     # (n,) float64: std(r)
    hash: np.ndarray    # (n,) uint64: the keep vector's hash (written only when the job de-duplicates)


class Job(NamedTuple):
    """How much one kernel call does, and where its rows go."""

    n_want: int         # stop after this many rows...
    max_proposals: int  # ...or this many proposals
    start: int          # the first row to fill
    dedup: bool         # hash every row's keep vector (for the caller's de-duplication)


class Table(NamedTuple):
    """The layer table's arrays: channels (or units) per group and the two forms as
    ``(const, linear, pair_a, pair_b, pair_w)`` (:meth:`nps.kernels.complexity.QuadraticForm.arrays`)."""

    channels: np.ndarray  # (G,) int64
    target: tuple         # the form the space's target is measured by
    other: tuple          # the other one (params for c_flops, FLOPs for c_params)
    tpad_mult: np.ndarray   # a padded target form's pad_mult and pad_block (QuadraticForm.pad_arrays): empty for
    tpad_block: np.ndarray  # a form without padding


class Limits(NamedTuple):
    """Every constraint of a space, as the kernels check it on a recipe's integer counts."""

    R: float                # every ratio in [0, R]
    std_lo: float           # std(r) in [std_lo, std_hi]
    std_hi: float
    lo_t: float             # the target form in [lo_t, hi_t]: absolute bounds, (value ∓ δ)·base
    hi_t: float
    mcb_lo: float           # mCB in [mcb_lo, mcb_hi]; mcb_hi <= 0 disables the band
    mcb_hi: float
    target_is_flops: bool
    base_ratio: float       # base FLOPs / base params (mCB = c_flops / c_params)


class Window(NamedTuple):
    """The proposal of :func:`sample_gauss`: ``r = u + e + t·direction``; ``zmax`` bounds the window mass."""

    u: float
    sigma: float
    direction: np.ndarray  # (G,) unit, entries >= 0
    zmax: float


class Plain(NamedTuple):
    """The proposal of :func:`sample_plain`: ``u + N(0, σ²)`` per group when ``gaussian``, else ``U[0, R]``."""

    gaussian: bool
    u: float
    sigma: float


# --------------------------------------------------------------------------------------------------------------------
# The output row (both kernels) and the exact checks of the plain one.


# complexity.evaluate_one and pad_variables, inlined where _finish calls them (the speed rule above).
_evaluate_inline = njit(nogil=True, inline="always")(getattr(evaluate_one, "py_func", evaluate_one))
_pad_inline = njit(nogil=True, inline="always")(getattr(pad_variables, "py_func", pad_variables))


@njit(nogil=True, cache=True, inline="always")
def _value(keep, form):
    """The form ``(const, linear, pair_a, pair_b, pair_w)`` at one keep vector."""
    const, linear, pair_a, pair_b, pair_w = form
    return _evaluate_inline(keep, const, linear, pair_a, pair_b, pair_w)


@njit(nogil=True, cache=True)
def _store_row(rows, row, r, keep, tv, ov, sd, dedup):
    """Row ``row`` of ``rows``: the recipe, its counts, the two forms' values, std(r) and (``dedup``) the hash."""
    for i in range(r.shape[0]):
        rows.recipe[row, i] = r[i]
        rows.keep[row, i] = keep[i]
    rows.std[row] = sd
    rows.target[row] = tv
    rows.other[row] = ov
    if dedup:
        rows.hash[row] = _hash_keep(keep)


@njit(nogil=True, cache=True, inline="always")
def _check_row(r, total, keep, tv, limits, oconst, olin, opa, opb, opw, counts):
    """The exact checks of a drawn recipe whose target value ``tv`` the kernel priced itself (window, cells), in
    _finish's order: the target's band, std(r), then the other form's value and the mCB band. Returns (ok, other
    value, std(r)). evaluate_one is called only for the draws that met the target and std(r), so its reference counts
    (the speed rule) are paid there only."""
    if tv < limits.lo_t or tv > limits.hi_t:
        counts[REASON_TARGET] += 1
        return False, 0, 0.0
    sd = _std(r, total)
    if sd < limits.std_lo or sd > limits.std_hi:
        counts[REASON_STD] += 1
        return False, 0, sd
    ov = evaluate_one(keep, oconst, olin, opa, opb, opw)
    if limits.mcb_hi > 0.0:
        mcb = _mcb(tv, ov, limits.target_is_flops, limits.base_ratio)
        if mcb < limits.mcb_lo or mcb > limits.mcb_hi:
            counts[REASON_MCB] += 1
            return False, ov, sd
    return True, ov, sd


@njit(nogil=True, cache=True, inline="always")  # inline: the speed rule above
def _finish(r, keep, x, table, limits, counts):
    """Round to integer channels and check every constraint exactly; returns (ok, target value, other value,
    std(r)). The target goes first: it is the check that fails most often, and std(r) is only computed after it.
    ``x``: work space for a padded target's 2G variables."""
    channels = table.channels
    total = 0.0
    for i in range(channels.shape[0]):
        if r[i] < 0.0 or r[i] > limits.R:
            counts[REASON_BOX] += 1
            return False, 0, 0, 0.0
        total += r[i]
        keep[i] = _count(r[i], channels[i])
    if table.tpad_mult.shape[0] > 0:  # a padded target: its form over keep and the padded counts
        _pad_inline(keep, table.tpad_mult, table.tpad_block, x)
        tv = _value(x, table.target)
    else:
        tv = _value(keep, table.target)
    if tv < limits.lo_t or tv > limits.hi_t:
        counts[REASON_TARGET] += 1
        return False, 0, 0, 0.0
    sd = _std(r, total)
    if sd < limits.std_lo or sd > limits.std_hi:
        counts[REASON_STD] += 1
        return False, 0, 0, 0.0
    ov = _value(keep, table.other)
    if limits.mcb_hi > 0.0:
        m = _mcb(tv, ov, limits.target_is_flops, limits.base_ratio)
        if m < limits.mcb_lo or m > limits.mcb_hi:
            counts[REASON_MCB] += 1
            return False, 0, 0, 0.0
    return True, tv, ov, sd


# --------------------------------------------------------------------------------------------------------------------
# The window kernel: what it fixes for a whole call.


@njit(nogil=True, cache=True)
def _slack_terms(form, s, eta):
    """The parts of the kernel's bounding quadratics fixed for a whole run (see :func:`_window`).

    Returns the constants Σ lin·s, Σ lin·eta, Σw·s_a·s_b, Σw(s_a·eta_b + eta_a·s_b), Σw·eta_a·eta_b and the
    vectors ``cs``, ``ce`` with Σw(m_a·s_b + s_a·m_b) = cs·m and Σw(m_a·eta_b + eta_a·m_b) = ce·m, so that a draw
    needs the pair loop only for Σw·m_a·m_b.
    """
    lin, pa, pb, pw = form[1], form[2], form[3], form[4]
    G = lin.shape[0]
    ls = 0.0
    le = 0.0
    cs = np.zeros(G)
    ce = np.zeros(G)
    for i in range(G):
        ls += lin[i] * s[i]
        le += lin[i] * eta[i]
    ss = 0.0
    se = 0.0
    ee = 0.0
    for p in range(pw.shape[0]):
        a = pa[p]
        b = pb[p]
        w = pw[p]
        ss += w * s[a] * s[b]
        se += w * (s[a] * eta[b] + eta[a] * s[b])
        ee += w * eta[a] * eta[b]
        cs[a] += w * s[b]
        cs[b] += w * s[a]
        ce[a] += w * eta[b]
        ce[b] += w * eta[a]
    return ls, le, ss, se, ee, cs, ce


@njit(nogil=True, cache=True)
def _moving_variables(direction, V):
    """``moving[v]``: variable v's place among the variables t moves (-1: fixed by e); ``mov``: the moving
    variables in order; and how many of them are groups' counts (they come first). Variables ``0 .. G-1`` are the
    groups' counts, which move where the direction does; a padded form's variable ``G + i`` (group i's padded
    count) moves with group i."""
    G = direction.shape[0]
    moving = np.zeros(V, dtype=np.int64) - 1
    n_mov = 0
    n_mov_groups = 0
    for v in range(V):
        if direction[v if v < G else v - G] > 0.0:
            moving[v] = n_mov
            n_mov += 1
        if v == G - 1:
            n_mov_groups = n_mov
    mov = np.empty(n_mov, dtype=np.int64)
    for v in range(V):
        if moving[v] >= 0:
            mov[moving[v]] = v
    return moving, mov, n_mov_groups


@njit(nogil=True, cache=True)
def _pairs_by_kind(moving, form):
    """The form's pair terms by kind: both variables fixed by e (FF: a, b, w), one moving (FM: the fixed one, the
    moving one, its place among the moving ones, w) or both moving (MM: a, b, w)."""
    tpa, tpb, tpw = form[2], form[3], form[4]
    kind = np.empty(tpw.shape[0], dtype=np.int64)
    for p in range(tpw.shape[0]):
        kind[p] = (moving[tpa[p]] >= 0) + (moving[tpb[p]] >= 0)
    ff = np.nonzero(kind == 0)[0]
    fm = np.nonzero(kind == 1)[0]
    fm_f = np.empty(fm.shape[0], dtype=np.int64)
    fm_m = np.empty(fm.shape[0], dtype=np.int64)
    fm_j = np.empty(fm.shape[0], dtype=np.int64)
    for q in range(fm.shape[0]):
        pa_, pb_ = tpa[fm[q]], tpb[fm[q]]
        if moving[pa_] >= 0:
            pa_, pb_ = pb_, pa_
        fm_f[q] = pa_
        fm_m[q] = pb_
        fm_j[q] = moving[pb_]
    mmp = np.nonzero(kind == 2)[0]
    return ((tpa[ff].copy(), tpb[ff].copy(), tpw[ff].copy()), (fm_f, fm_m, fm_j, tpw[fm].copy()),
            (tpa[mmp].copy(), tpb[mmp].copy(), tpw[mmp].copy()))


class _Terms(NamedTuple):
    """Everything about the window that is the same for every draw of a call (built by :func:`_window_terms`).
    The target's variables: the G groups' counts, then (a padded form) their G padded counts."""

    inv_d: np.ndarray   # 1 / direction_i on the moving groups, 0 on the fixed ones (G)
    moving: np.ndarray  # variable v's place among the moving variables, -1 when fixed
    mov: np.ndarray     # the moving variables, in order (the groups' counts first, then the padded ones)
    n_mov_groups: int   # how many of them are groups' counts
    cs: np.ndarray      # see _slack_terms
    ce: np.ndarray
    ls: float
    le: float
    ss: float
    se: float
    ee: float
    ff_a: np.ndarray    # the target's pairs of two fixed variables...
    ff_b: np.ndarray
    ff_w: np.ndarray
    fm_f: np.ndarray    # ...of a fixed and a moving one (the fixed one, the moving one, its place)...
    fm_m: np.ndarray
    fm_j: np.ndarray
    fm_w: np.ndarray
    mm_a: np.ndarray    # ...and of two moving ones
    mm_b: np.ndarray
    mm_w: np.ndarray
    one_kk: int         # one group moving (n_mov_groups == 1): the weights of its pairs k·k, k·P and P·P (P: its
    one_kp: int         # padded count), so that the target at its count k is A + B·(k, P) + these (scalars only,
    one_pp: int         # see _one_group_window)...
    one_g: int          # ...that group,
    one_mult: int       # its padded count's pad_mult and pad_block (block 0: no padded count moves with it)
    one_block: int


class _Scratch(NamedTuple):
    """Per-draw work arrays of :func:`sample_gauss`."""

    e: np.ndarray     # the noise less its part along the direction, times σ (G)
    m: np.ndarray     # every variable at t = 0 (a fixed one's exact value, a moving one's midpoint)
    r: np.ndarray     # the recipe at t (G)
    x: np.ndarray     # the integer variables (the fixed ones set from e, the moving ones at t); x[:G] the counts
    B: np.ndarray     # the exact target's coefficient of each moving variable, given the fixed ones


@njit(nogil=True, cache=True)
def _window_terms(channels, direction, form, pad_mult, pad_block):
    """The :class:`_Terms` of a call: the target ``form`` along ``direction`` (``pad_mult``, ``pad_block``: a
    padded form's, empty otherwise).

    Each variable lies in ``[m - s - t·eta, m + s - t·eta]`` (:func:`_window`): a moving group's count with
    ``s = 1/2``, ``eta = h = direction·channels``; its padded count ``P = block·ceil(mult·k / block)`` within
    ``[mult·k, mult·k + block - 1]``, so with ``s = mult/2 + (block - 1)/2``, ``eta = mult·h`` around
    ``mult·m + (block - 1)/2``; a fixed variable with ``s = eta = 0``."""
    G = channels.shape[0]
    V = form[1].shape[0]
    h = np.zeros(V)
    s = np.zeros(V)
    inv_d = np.empty(G)
    for i in range(G):
        h[i] = direction[i] * channels[i]
        s[i] = 0.5 if direction[i] > 0.0 else 0.0
        inv_d[i] = 1.0 / direction[i] if direction[i] > 0.0 else 0.0
    for i in range(V - G):
        if direction[i] > 0.0:
            h[G + i] = pad_mult[i] * h[i]
            s[G + i] = 0.5 * pad_mult[i] + 0.5 * (pad_block[i] - 1)
    ls, le, ss, se, ee, cs, ce = _slack_terms(form, s, h)
    moving, mov, n_mov_groups = _moving_variables(direction, V)
    (ff_a, ff_b, ff_w), (fm_f, fm_m, fm_j, fm_w), (mm_a, mm_b, mm_w) = _pairs_by_kind(moving, form)
    one_kk = 0
    one_kp = 0
    one_pp = 0
    one_g = mov[0] if n_mov_groups == 1 else -1
    one_mult = 1
    one_block = 0
    if n_mov_groups == 1:
        if mov.shape[0] > 1:  # the group's padded count moves with it
            one_mult = pad_mult[one_g]
            one_block = pad_block[one_g]
        for q in range(mm_w.shape[0]):
            padded_pair = (mm_a[q] >= G) + (mm_b[q] >= G)
            if padded_pair == 0:
                one_kk += mm_w[q]
            elif padded_pair == 1:
                one_kp += mm_w[q]
            else:
                one_pp += mm_w[q]
    return _Terms(inv_d, moving, mov, n_mov_groups, cs, ce, ls, le, ss, se, ee, ff_a, ff_b, ff_w, fm_f, fm_m,
                  fm_j, fm_w, mm_a, mm_b, mm_w, one_kk, one_kp, one_pp, one_g, one_mult, one_block)


# --------------------------------------------------------------------------------------------------------------------
# The window kernel: one draw.


@njit(nogil=True, cache=True, inline="always")
def _add_terms(lm, ms, me, lin, c_s, c_e, mv):
    """One variable's share of Σ lin·m, cs·m and ce·m (:func:`_counts_at_zero`) added (scalars only, inlined)."""
    return lm + lin * mv, ms + c_s * mv, me + c_e * mv


@njit(nogil=True, cache=True, inline="always")
def _counts_at_zero(proj, buf, table, limits, win, proposal):
    """Finish e (``buf.e`` holds N(0, 1) draws whose projection on the direction is ``proj``): e = σ·(draws less
    that projection). The fixed variables go to ``x``, every variable at t = 0 (exact, or a moving one's midpoint)
    to ``m``, the target's linear coefficients of the moving variables to ``B``. Returns (out of the box, box_lo,
    box_hi, Σ lin·m, cs·m, ce·m, the fixed variables' linear terms): ``box_lo``/``box_hi`` bound t by every moving
    ratio staying in [0, R]."""
    e, m, x, B = buf.e, buf.m, buf.x, buf.B
    inv_d, moving, cs, ce = win.inv_d, win.moving, win.cs, win.ce
    channels = table.channels
    tlin = table.target[1]
    u, sigma, direction = proposal.u, proposal.sigma, proposal.direction
    R = limits.R
    G = channels.shape[0]
    box_lo = -np.inf
    box_hi = np.inf
    lm = float(table.target[0])
    ms = 0.0
    me = 0.0
    a_lin = 0
    out_of_box = False
    for i in range(G):
        e[i] = sigma * (e[i] - proj * direction[i])
        if inv_d[i] > 0.0:
            m[i] = (1.0 - u - e[i]) * channels[i]
            lo_i = (-u - e[i]) * inv_d[i]
            hi_i = (R - u - e[i]) * inv_d[i]
            if lo_i > box_lo:
                box_lo = lo_i
            if hi_i < box_hi:
                box_hi = hi_i
            B[moving[i]] = tlin[i]
        else:  # the same arithmetic as _finish, so the count is the one it would find
            ri = u + e[i]
            if ri < 0.0 or ri > R:
                out_of_box = True
            k = _count(ri, channels[i])
            x[i] = k
            m[i] = k
            a_lin += tlin[i] * k
        lm, ms, me = _add_terms(lm, ms, me, tlin[i], cs[i], ce[i], m[i])
    pad_mult, pad_block = table.tpad_mult, table.tpad_block
    for i in range(pad_mult.shape[0]):  # a padded target's padded counts (none for any other form)
        v = G + i
        bk = pad_block[i]
        if moving[v] >= 0:  # the middle of [mult·k, mult·k + block - 1] at k = m (_window_terms)
            m[v] = pad_mult[i] * m[i] + 0.5 * (bk - 1)
            B[moving[v]] = tlin[v]
        else:
            p = padded_channels(x[i], pad_mult[i], bk)
            x[v] = p
            m[v] = p
            a_lin += tlin[v] * p
        lm, ms, me = _add_terms(lm, ms, me, tlin[v], cs[v], ce[v], m[v])
    return out_of_box, box_lo, box_hi, lm, ms, me, a_lin


@njit(nogil=True, cache=True, inline="always")
def _window(buf, table, limits, win, sums, sigma):
    """The window of t for the e in ``buf`` (``sums``: what :func:`_counts_at_zero` returned), in units of σ:
    returns ``(A, a, b)``, no window when not ``a < b``.

    A group the direction leaves out (``direction_i = 0``) has its count fixed by ``e``, and it is computed
    exactly; a moving group's count at t is ``floor(k0_i - t·h_i + 1/2)``, within ``k0_i ± 1/2 - t·h_i``. So every
    count lies in ``[m_i - s_i - t·eta_i, m_i + s_i - t·eta_i]`` (fixed: m exact, s = eta = 0; moving: m = k0,
    s = 1/2, eta = h; a padded count likewise, see :func:`_window_terms`), and the target form (non-negative
    coefficients) at the upper and lower ends is a pair of quadratics in t that bound it. Where the lower one is
    above ``hi_t`` or the upper one below ``lo_t`` no recipe exists; between, the window.

    ``A`` is the exact target's part that t does not change (the fixed variables' terms); ``B`` gains the
    coefficients of the pairs with one fixed variable, so the target at t is ``A + B·x_moving`` + the pairs of two
    moving ones.
    """
    m, x, B = buf.m, buf.x, buf.B
    ls, le, ss, se, ee = win.ls, win.le, win.ss, win.se, win.ee
    ff_a, ff_b, ff_w = win.ff_a, win.ff_b, win.ff_w
    fm_f, fm_m, fm_j, fm_w = win.fm_f, win.fm_m, win.fm_j, win.fm_w
    mm_a, mm_b, mm_w = win.mm_a, win.mm_b, win.mm_w
    box_lo, box_hi, lm, ms, me, a_lin = sums[1], sums[2], sums[3], sums[4], sums[5], sums[6]
    a_ff = 0
    for q in range(ff_w.shape[0]):
        a_ff += ff_w[q] * x[ff_a[q]] * x[ff_b[q]]
    A = table.target[0] + a_lin + a_ff
    mm = float(a_ff)
    for q in range(fm_w.shape[0]):
        wk = fm_w[q] * x[fm_f[q]]
        B[fm_j[q]] += wk
        mm += wk * m[fm_m[q]]
    for q in range(mm_w.shape[0]):
        mm += mm_w[q] * m[mm_a[q]] * m[mm_b[q]]
    t_lo = _root_decreasing(lm - ls + mm - ms + ss, le + me - se, ee, limits.hi_t)
    if np.isnan(t_lo):
        return A, 0.0, 0.0
    t_hi = _root_decreasing(lm + ls + mm + ms + ss, le + me + se, ee, limits.lo_t)
    if np.isnan(t_hi):
        t_hi = np.inf
    return A, max(t_lo, box_lo) / sigma, min(t_hi, box_hi) / sigma


@njit(nogil=True, cache=True, inline="always")
def _exact_target(buf, table, limits, win, proposal, A, t):
    """The recipe at t into ``r`` and its moving variables into ``x`` (the fixed ones are there from e, so this
    is not _finish, which rounds every group and evaluates the whole form); returns (in the box, target value,
    Σ r)."""
    e, r, x, B = buf.e, buf.r, buf.x, buf.B
    mov, mm_a, mm_b, mm_w = win.mov, win.mm_a, win.mm_b, win.mm_w
    u, direction = proposal.u, proposal.direction
    channels = table.channels
    G = channels.shape[0]
    total = 0.0
    for i in range(G):
        r[i] = u + e[i] + t * direction[i]
        total += r[i]
    tv = A
    in_box = True
    for j in range(win.n_mov_groups):
        i = mov[j]
        if r[i] < 0.0 or r[i] > limits.R:
            in_box = False
        k = _count(r[i], channels[i])
        x[i] = k
        tv += B[j] * k
    pad_mult, pad_block = table.tpad_mult, table.tpad_block
    for j in range(win.n_mov_groups, mov.shape[0]):  # a padded target's moving padded counts, from the counts
        v = mov[j]
        i = v - G
        p = padded_channels(x[i], pad_mult[i], pad_block[i])
        x[v] = p
        tv += B[j] * p
    if in_box:
        for q in range(mm_w.shape[0]):
            tv += mm_w[q] * x[mm_a[q]] * x[mm_b[q]]
    return in_box, tv, total


@njit(nogil=True, cache=True, inline="always")
def _lower_tail(a, b):
    """The window ``[a, b]`` (σ units) on the lower tail, where the normal CDF has full relative precision:
    ``(a, b, flipped, Φ(a), Φ(b))``, mirrored (``-b, -a``) when it lies above 0; a t drawn there is negated back."""
    flip = a > 0.0
    if flip:
        a, b = -b, -a
    return a, b, flip, _phi_cdf(a), _phi_cdf(b)


@njit(nogil=True, cache=True, inline="always")
def _one_group_window(a, b, base, d, c, A, B0, B1, mult, block, kk, kp, pp, lo_t, hi_t):
    """The exact window (σ units) inside ``[a, b]`` when one group moves along t: the t at which that group's count
    gives a target within ``[lo_t, hi_t]``. Its count is ``k = _count(base + d·t, c)`` (``d``: the direction times
    σ); the target at k is ``A + B0·k + B1·P + kk·k² + kp·k·P + pp·P²`` with P its padded count (``block`` 0: no
    padded count), exact in integers. The target never falls as k grows (non-negative coefficients), so the counts
    that meet it are a run ``k1 .. k2`` of the few the window spans; their ratios, by the rounding rule, bound t,
    widened by 1e-9 of the window against floating point, so the window still holds every t that meets the target
    (the exact check after the draw does the rest). ``lo >= hi``: none does.

    Scalars only: an inlined helper that holds the kernel's arrays costs a reference count per array and draw."""
    k_top = _count(base + d * a, c)  # the counts at the window's ends (the count falls as t grows)
    k_bottom = _count(base + d * b, c)
    k1 = k_top + 1  # the run of counts that meet the target, empty until found
    k2 = k_top
    for k in range(k_bottom, k_top + 1):
        p = padded_channels(k, mult, block) if block > 0 else 0
        tv = A + B0 * k + B1 * p + kk * k * k + kp * k * p + pp * p * p
        if tv > hi_t:
            break  # and above it for every larger count
        if tv >= lo_t:
            if k1 > k:
                k1 = k
            k2 = k
    if k1 > k2:
        return a, a
    slack = 1e-9 * (b - a)
    lo = a
    hi = b
    if k2 < k_top:  # a count <= k2 needs (1 - r)·c + 1/2 < k2 + 1: r > 1 - (k2 + 1/2)/c
        lo = max(a, ((1.0 - (k2 + 0.5) / c) - base) / d - slack)
    if k1 > k_bottom:  # a count >= k1 needs (1 - r)·c + 1/2 >= k1: r <= 1 - (k1 - 1/2)/c
        hi = min(b, ((1.0 - (k1 - 0.5) / c) - base) / d + slack)
    return lo, hi


@njit(nogil=True, cache=True)
def sample_gauss(state, job, rows, table, limits, proposal, counts):
    """Fill rows ``job.start..`` of ``rows`` with accepted recipes of a Gaussian space (``proposal``: a
    :class:`Window`; ``counts``: rejections by reason, added to). Stops after ``job.n_want`` rows or
    ``job.max_proposals`` proposals; returns (rows filled, proposals used, largest window mass Z seen).

    ``proposal.direction`` is a unit vector with non-negative entries; the noise is split into its part ``e``
    orthogonal to it and ``t·direction``, ``t ~ N(0, σ²)``, and t is drawn inside :func:`_window`'s window.
    """
    sigma, zmax = proposal.sigma, proposal.zmax
    G = table.channels.shape[0]
    V = table.target[1].shape[0]  # the target's variables: G counts, and G padded ones for a padded target
    win = _window_terms(table.channels, proposal.direction, table.target, table.tpad_mult, table.tpad_block)
    buf = _Scratch(np.empty(G), np.empty(V), np.empty(G), np.empty(V, dtype=np.int64),
                   np.empty(win.mov.shape[0], dtype=np.int64))
    e, r, direction = buf.e, buf.r, proposal.direction
    keep = buf.x[:G]  # the counts (a view: what _exact_target writes into x)
    oconst, olin, opa, opb, opw = table.other  # unpacked once: faster here than an inlined _value (measured)
    g1 = win.one_g  # the one moving group (-1: several), its direction times σ and its channels, fixed for the call
    d1 = direction[g1] * sigma if g1 >= 0 else 0.0
    c1 = table.channels[g1] if g1 >= 0 else 1
    filled = 0
    used = 0
    zseen = 0.0
    while filled < job.n_want and used < job.max_proposals:
        used += 1
        fill_normals(state, e)  # here, not in _counts_at_zero: the speed rule above
        proj = 0.0
        for i in range(G):
            proj += e[i] * direction[i]
        sums = _counts_at_zero(proj, buf, table, limits, win, proposal)
        if sums[0]:
            counts[REASON_BOX] += 1
            continue
        A, a, b = _window(buf, table, limits, win, sums, sigma)
        if not a < b:
            counts[REASON_WINDOW] += 1
            continue
        a0, b0 = a, b
        a, b, flip, fa, fb = _lower_tail(a, b)
        z = fb - fa
        v = uniform(state) * zmax
        # One group moving: its few counts in the window give the exact window, whose mass z replaces the bound's.
        # Not needed where the bound's own mass is rejected (v >= z) and is no new largest mass (z <= zseen).
        if g1 >= 0 and (v < z or z > zseen):
            lo, hi = _one_group_window(a0, b0, proposal.u + e[g1], d1, c1, A, buf.B[0],
                                       buf.B[1] if win.one_block > 0 else 0, win.one_mult, win.one_block,
                                       win.one_kk, win.one_kp, win.one_pp, limits.lo_t, limits.hi_t)
            if not lo < hi:
                counts[REASON_TARGET] += 1
                continue
            if lo != a0 or hi != b0:
                a, b, flip, fa, fb = _lower_tail(lo, hi)
                z = fb - fa
        if z > zseen:
            zseen = z
        if v >= z:
            counts[REASON_ENVELOPE] += 1
            continue
        t = sigma * _truncated_from(state, a, b, fa, fb)
        if flip:
            t = -t
        # exact checks on the integer counts, in _finish's order
        in_box, tv, total = _exact_target(buf, table, limits, win, proposal, A, t)
        if not in_box:
            counts[REASON_BOX] += 1
            continue
        ok, ov, sd = _check_row(r, total, keep, tv, limits, oconst, olin, opa, opb, opw, counts)
        if not ok:
            continue
        _store_row(rows, job.start + filled, r, keep, tv, ov, sd, job.dedup)
        filled += 1
    return filled, used, zseen


@njit(nogil=True, cache=True)
def sample_plain(state, job, rows, table, limits, proposal, counts):
    """Plain rejection: ``r = u + N(0, σ²)`` per group or ``r_i ~ U[0, R]`` (``proposal``: a :class:`Plain`; the
    uniform one is the initial space, the numba twin of the numpy reference), kept when every constraint holds.

    For a Gaussian space it is cheaper per draw than :func:`sample_gauss`; the caller picks it when the window there
    would hold most of the prior anyway (small σ), so that the window buys no acceptance.
    """
    gaussian, u, sigma = proposal
    R = limits.R
    G = table.channels.shape[0]
    r = np.empty(G)
    keep = np.empty(G, dtype=np.int64)
    x = np.empty(2 * table.tpad_mult.shape[0], dtype=np.int64)
    filled = 0
    used = 0
    while filled < job.n_want and used < job.max_proposals:
        used += 1
        if gaussian:
            fill_normals(state, r)
            for i in range(G):
                r[i] = u + sigma * r[i]
        else:
            for i in range(G):
                r[i] = R * uniform(state)
        ok, tv, ov, sd = _finish(r, keep, x, table, limits, counts)
        if not ok:
            continue
        _store_row(rows, job.start + filled, r, keep, tv, ov, sd, job.dedup)
        filled += 1
    return filled, used, 0.0
