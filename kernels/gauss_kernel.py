"""Numba kernels that draw recipes of the Gaussian spaces (STD-σ, mCB-refined) and of the uniform space.

Exact sampling, fast (docs/design.md, "recipe samplers"): the noise ``ε ~ N(0, σ²I)`` is split into its part ``e``
orthogonal to a unit direction ``d`` with non-negative entries and ``t·d`` with ``t ~ N(0, σ²)``; for an isotropic
Gaussian the two are independent, whatever ``d`` is (the caller picks the target's gradient restricted to the groups
worth moving, see ``samplers._direction``). Along ``t`` every kept-channel count is non-increasing, so for a given
``e`` the ``t`` that meet the target form an interval, and two quadratics (the form at the upper and lower ends of
every count: a moving count is rounded, a count ``d`` leaves out is exact) give a window ``[a, b]`` that contains
it. The kernel draws ``e``, computes the window, accepts ``e`` with probability ``Z(e)/zmax`` (``Z`` = prior mass of
``t`` in the window) and draws ``t`` from the prior truncated to the window. The product is the prior times the
window indicator, so after the exact check of every constraint on the integer counts the accepted recipes follow the
space's distribution, the same as plain rejection. ``zmax`` must bound ``Z``: the caller sets it from a pilot and the
kernel reports any ``Z`` above it, and the caller then restarts with a larger bound.
"""
from __future__ import annotations

import math

import numpy as np

from nps.kernels.complexity import evaluate_one, njit
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


@njit(nogil=True, cache=True)
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


@njit(nogil=True, cache=True)
def _slack_terms(lin, pa, pb, pw, s, eta):
    """The parts of the kernel's bounding quadratics fixed for a whole run (see :func:`sample_gauss`).

    Returns the constants Σ lin·s, Σ lin·eta, Σw·s_a·s_b, Σw(s_a·eta_b + eta_a·s_b), Σw·eta_a·eta_b and the
    vectors ``cs``, ``ce`` with Σw(m_a·s_b + s_a·m_b) = cs·m and Σw(m_a·eta_b + eta_a·m_b) = ce·m, so that a draw
    needs the pair loop only for Σw·m_a·m_b.
    """
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


@njit(nogil=True, cache=True)
def _store_row(row, r, keep, tv, ov, sd, out_r, out_keep, out_t, out_o, dedup, out_hash, out_std):
    for i in range(r.shape[0]):
        out_r[row, i] = r[i]
        out_keep[row, i] = keep[i]
    out_std[row] = sd
    out_t[row] = tv
    out_o[row] = ov
    if dedup:
        out_hash[row] = _hash_keep(keep)


@njit(nogil=True, cache=True)
def _finish(r, keep, channels, R, std_lo, std_hi, lo_t, hi_t, tconst, tlin, tpa, tpb, tpw, oconst, olin, opa, opb,
            opw, mcb_lo, mcb_hi, target_is_flops, base_ratio, counts):
    """Round to integer channels and check every constraint exactly; returns (ok, target value, other value,
    std(r)). The target goes first: it is the check that fails most often, and std(r) is only computed after it."""
    total = 0.0
    for i in range(channels.shape[0]):
        if r[i] < 0.0 or r[i] > R:
            counts[REASON_BOX] += 1
            return False, 0, 0, 0.0
        total += r[i]
        keep[i] = _count(r[i], channels[i])
    tv = evaluate_one(keep, tconst, tlin, tpa, tpb, tpw)
    if tv < lo_t or tv > hi_t:
        counts[REASON_TARGET] += 1
        return False, 0, 0, 0.0
    sd = _std(r, total)
    if sd < std_lo or sd > std_hi:
        counts[REASON_STD] += 1
        return False, 0, 0, 0.0
    ov = evaluate_one(keep, oconst, olin, opa, opb, opw)
    if mcb_hi > 0.0:
        m = _mcb(tv, ov, target_is_flops, base_ratio)
        if m < mcb_lo or m > mcb_hi:
            counts[REASON_MCB] += 1
            return False, 0, 0, 0.0
    return True, tv, ov, sd


@njit(nogil=True, cache=True)
def sample_gauss(state, n_want, max_proposals, out_r, out_keep, out_t, out_o, start, channels, direction, u, sigma,
                 R, std_lo, std_hi, lo_t, hi_t, tconst, tlin, tpa, tpb, tpw,
                 oconst, olin, opa, opb, opw, mcb_lo, mcb_hi, target_is_flops, base_ratio, zmax,
                 dedup, out_hash, out_std, counts):
    """Fill rows ``start..`` of the outputs with accepted recipes of a Gaussian space.

    ``direction`` is a unit vector with non-negative entries; the noise is split into its part ``e`` orthogonal to
    it and ``t·direction``, ``t ~ N(0, σ²)``. Stops after ``n_want`` rows or ``max_proposals`` proposals; returns
    (rows filled, proposals used, largest window mass Z seen). ``lo_t``/``hi_t`` are the absolute target bounds
    ((value ∓ δ)·base); ``mcb_hi <= 0`` disables the mCB band.

    The window: a group the direction leaves out (``direction_i = 0``) has its count fixed by ``e``, and it is
    computed exactly; a moving group's count at t is ``floor(k0_i - t·h_i + 1/2)``, within ``k0_i ± 1/2 - t·h_i``.
    So every count lies in ``[m_i - s_i - t·eta_i, m_i + s_i - t·eta_i]`` (fixed: m exact, s = eta = 0; moving:
    m = k0, s = 1/2, eta = h), and the target form (non-negative coefficients) at the upper and lower ends is a
    pair of quadratics in t that bound it. Where the lower one is above ``hi_t`` or the upper one below ``lo_t``
    no recipe exists; between, the window.
    """
    G = channels.shape[0]
    e = np.empty(G)
    m = np.empty(G)
    h = np.empty(G)
    s = np.empty(G)
    inv_d = np.empty(G)
    r = np.empty(G)
    keep = np.empty(G, dtype=np.int64)
    for i in range(G):
        h[i] = direction[i] * channels[i]
        s[i] = 0.5 if direction[i] > 0.0 else 0.0
        inv_d[i] = 1.0 / direction[i] if direction[i] > 0.0 else 0.0
    ls, le, ss, se, ee, cs, ce = _slack_terms(tlin, tpa, tpb, tpw, s, h)
    # Pairs by kind: both counts fixed by e (FF), one moving (FM, the moving one second) or both moving (MM). The
    # exact target at t is then A + Σ_moving B_j·keep_j + Σ_MM w·keep_a·keep_b, with A and B (int64) set from e.
    moving = np.zeros(G, dtype=np.int64) - 1
    n_mov = 0
    for i in range(G):
        if direction[i] > 0.0:
            moving[i] = n_mov
            n_mov += 1
    mov = np.empty(n_mov, dtype=np.int64)
    for i in range(G):
        if moving[i] >= 0:
            mov[moving[i]] = i
    kind = np.empty(tpw.shape[0], dtype=np.int64)
    for p in range(tpw.shape[0]):
        kind[p] = (moving[tpa[p]] >= 0) + (moving[tpb[p]] >= 0)
    ff = np.nonzero(kind == 0)[0]
    ff_a, ff_b, ff_w = tpa[ff].copy(), tpb[ff].copy(), tpw[ff].copy()
    fm = np.nonzero(kind == 1)[0]
    fm_f = np.empty(fm.shape[0], dtype=np.int64)  # the fixed group
    fm_m = np.empty(fm.shape[0], dtype=np.int64)  # the moving group
    fm_j = np.empty(fm.shape[0], dtype=np.int64)  # its place among the moving ones
    fm_w = tpw[fm].copy()
    for q in range(fm.shape[0]):
        pa_, pb_ = tpa[fm[q]], tpb[fm[q]]
        if moving[pa_] >= 0:
            pa_, pb_ = pb_, pa_
        fm_f[q] = pa_
        fm_m[q] = pb_
        fm_j[q] = moving[pb_]
    mmp = np.nonzero(kind == 2)[0]
    mm_a, mm_b, mm_w = tpa[mmp].copy(), tpb[mmp].copy(), tpw[mmp].copy()
    B = np.empty(n_mov, dtype=np.int64)
    filled = 0
    used = 0
    zseen = 0.0
    while filled < n_want and used < max_proposals:
        used += 1
        # e: the noise minus its component along `direction`
        fill_normals(state, e)
        proj = 0.0
        for i in range(G):
            proj += e[i] * direction[i]
        box_lo = -np.inf
        box_hi = np.inf
        lm = float(tconst)
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
                keep[i] = k
                m[i] = k
                a_lin += tlin[i] * k
            lm += tlin[i] * m[i]
            ms += cs[i] * m[i]
            me += ce[i] * m[i]
        if out_of_box:
            counts[REASON_BOX] += 1
            continue
        a_ff = 0
        for q in range(ff_w.shape[0]):
            a_ff += ff_w[q] * keep[ff_a[q]] * keep[ff_b[q]]
        A = tconst + a_lin + a_ff
        mm = float(a_ff)
        for q in range(fm_w.shape[0]):
            wk = fm_w[q] * keep[fm_f[q]]
            B[fm_j[q]] += wk
            mm += wk * m[fm_m[q]]
        for q in range(mm_w.shape[0]):
            mm += mm_w[q] * m[mm_a[q]] * m[mm_b[q]]
        t_lo = _root_decreasing(lm - ls + mm - ms + ss, le + me - se, ee, hi_t)
        if np.isnan(t_lo):
            counts[REASON_WINDOW] += 1
            continue
        t_hi = _root_decreasing(lm + ls + mm + ms + ss, le + me + se, ee, lo_t)
        if np.isnan(t_hi):
            t_hi = np.inf
        a = max(t_lo, box_lo) / sigma
        b = min(t_hi, box_hi) / sigma
        if not a < b:
            counts[REASON_WINDOW] += 1
            continue
        flip = a > 0.0  # work on the lower tail, where the CDF has full relative precision
        if flip:
            a, b = -b, -a
        fa = _phi_cdf(a)
        fb = _phi_cdf(b)
        z = fb - fa
        if z > zseen:
            zseen = z
        if uniform(state) * zmax >= z:
            counts[REASON_ENVELOPE] += 1
            continue
        t = sigma * _truncated_from(state, a, b, fa, fb)
        if flip:
            t = -t
        # Exact checks on the integer counts. Only the moving counts change with t; the fixed ones are in `keep`
        # already, so this is not _finish (which rounds every group and evaluates the whole form).
        total = 0.0
        for i in range(G):
            r[i] = u + e[i] + t * direction[i]
            total += r[i]
        tv = A
        out_of_box = False
        for j in range(n_mov):
            i = mov[j]
            if r[i] < 0.0 or r[i] > R:
                out_of_box = True
            k = _count(r[i], channels[i])
            keep[i] = k
            tv += B[j] * k
        if out_of_box:
            counts[REASON_BOX] += 1
            continue
        for q in range(mm_w.shape[0]):
            tv += mm_w[q] * keep[mm_a[q]] * keep[mm_b[q]]
        if tv < lo_t or tv > hi_t:
            counts[REASON_TARGET] += 1
            continue
        sd = _std(r, total)
        if sd < std_lo or sd > std_hi:
            counts[REASON_STD] += 1
            continue
        ov = evaluate_one(keep, oconst, olin, opa, opb, opw)
        if mcb_hi > 0.0:
            mcb = _mcb(tv, ov, target_is_flops, base_ratio)
            if mcb < mcb_lo or mcb > mcb_hi:
                counts[REASON_MCB] += 1
                continue
        _store_row(start + filled, r, keep, tv, ov, sd, out_r, out_keep, out_t, out_o, dedup, out_hash, out_std)
        filled += 1
    return filled, used, zseen


@njit(nogil=True, cache=True)
def sample_plain(state, n_want, max_proposals, out_r, out_keep, out_t, out_o, start, channels, gaussian, u, sigma, R,
                 std_lo, std_hi, lo_t, hi_t, tconst, tlin, tpa, tpb, tpw, oconst, olin, opa, opb, opw,
                 mcb_lo, mcb_hi, target_is_flops, base_ratio, dedup, out_hash, out_std, counts):
    """Plain rejection: ``r = u + N(0, σ²)`` per group (``gaussian``) or ``r_i ~ U[0, R]`` (the initial space, the
    numba twin of the numpy reference), kept when every constraint holds.

    For a Gaussian space it is cheaper per draw than :func:`sample_gauss`; the caller picks it when the window there
    would hold most of the prior anyway (small σ), so that the window buys no acceptance.
    """
    G = channels.shape[0]
    r = np.empty(G)
    keep = np.empty(G, dtype=np.int64)
    filled = 0
    used = 0
    while filled < n_want and used < max_proposals:
        used += 1
        if gaussian:
            fill_normals(state, r)
            for i in range(G):
                r[i] = u + sigma * r[i]
        else:
            for i in range(G):
                r[i] = R * uniform(state)
        ok, tv, ov, sd = _finish(r, keep, channels, R, std_lo, std_hi, lo_t, hi_t, tconst, tlin, tpa, tpb, tpw,
                                 oconst, olin, opa, opb, opw, mcb_lo, mcb_hi, target_is_flops, base_ratio, counts)
        if not ok:
            continue
        _store_row(start + filled, r, keep, tv, ov, sd, out_r, out_keep, out_t, out_o, dedup, out_hash, out_std)
        filled += 1
    return filled, used, 0.0
