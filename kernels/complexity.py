"""Closed-form FLOPs and params of many recipes at once.

Both FLOPs (multiply-accumulates of conv and linear layers) and params (conv, linear, BN) of a pruned ResNet are a
quadratic form in the kept-channel counts ``keep`` (one count per group of the layer table)::

    value(keep) = const + sum_i linear[i] * keep[i] + sum_p weight[p] * keep[a[p]] * keep[b[p]]

A conv whose input and output channels both belong to prunable groups contributes a pair term; one whose input (or
output) is fixed (the image, an unpruned residual stream, the classifier's classes) contributes a linear term; what no
group touches is the constant. All coefficients are non-negative integers, so the form is exact in int64 and monotone
in every ``keep[i]``.

A **padded** form (a latency model whose layers run channels in blocks, ``nps latency-model``) has G more
variables: variable ``G + i`` is group i's channel count rounded up to its block,
``P_i = block[i] · ceil(mult[i] · keep[i] / block[i])`` (``mult``: channels per unit), so a term may price a layer's
output channels as the hardware computes them. Its value is the same quadratic form over ``(keep, P)``; it is
still exact in int64 and monotone in every ``keep[i]`` (P is non-decreasing), a step function whose padded counts
lie within ``[mult·keep, mult·keep + block - 1]``: the bounds the samplers' window kernel uses for them
(:mod:`nps.kernels.gauss_kernel`).

This module imports only numpy and numba (docs/design.md, "The layers"); the layer table in
``nps.pipeline.network.layer_table`` builds the forms.
"""
from __future__ import annotations

import math
import os

import numpy as np
from numba import njit

# Tests may run the kernels as plain Python (ffcv's convention): NPS_NUMBA_DISABLE=1.
if os.environ.get("NPS_NUMBA_DISABLE") == "1":  # pragma: no cover - exercised by the env switch
    def njit(*args, **kwargs):  # noqa: F811
        if args and callable(args[0]):
            return args[0]
        return lambda f: f


class QuadraticForm:
    """``const + linear·keep + Σ weight[p]·keep[a[p]]·keep[b[p]]`` with int64 coefficients.

    Parameters
    ----------
    const : int
        Part of the count that no group changes.
    linear : array of int64, shape (G,)
        Coefficient of ``keep[i]``.
    pair_a, pair_b : arrays of int64, shape (P,)
        Group indices of each product term (``a <= b``; ``a == b`` is a square term).
    pair_w : array of int64, shape (P,)
        Coefficient of ``keep[a] * keep[b]``.
    pad_mult, pad_block : arrays of int64, shape (G,), optional
        A padded form (see the module docstring): ``linear`` then has 2G entries and pair indices run to 2G - 1.
    """

    def __init__(self, const, linear, pair_a, pair_b, pair_w, pad_mult=None, pad_block=None):
        self.const = int(const)
        self.linear = np.ascontiguousarray(linear, dtype=np.int64)
        self.pair_a = np.ascontiguousarray(pair_a, dtype=np.int64)
        self.pair_b = np.ascontiguousarray(pair_b, dtype=np.int64)
        self.pair_w = np.ascontiguousarray(pair_w, dtype=np.int64)
        if not (len(self.pair_a) == len(self.pair_b) == len(self.pair_w)):
            raise ValueError("pair_a, pair_b and pair_w must have the same length")
        if (pad_mult is None) != (pad_block is None):
            raise ValueError("a padded form needs both pad_mult and pad_block")
        self.pad_mult = self.pad_block = None
        if pad_mult is not None:
            self.pad_mult = np.ascontiguousarray(pad_mult, dtype=np.int64)
            self.pad_block = np.ascontiguousarray(pad_block, dtype=np.int64)
            if len(self.linear) != 2 * len(self.pad_mult) or len(self.pad_block) != len(self.pad_mult):
                raise ValueError("a padded form over G groups has 2G linear coefficients and G pad_mult, pad_block")
            if np.any(self.pad_mult < 1) or np.any(self.pad_block < 1):
                raise ValueError("pad_mult and pad_block must be positive")

    @property
    def padded(self) -> bool:
        return self.pad_mult is not None

    @property
    def groups(self) -> int:
        return len(self.pad_mult) if self.padded else len(self.linear)

    def arrays(self):
        """The coefficients as a tuple, in the order the numba kernels take them (a padded form's padding:
        :meth:`pad_arrays`)."""
        return self.const, self.linear, self.pair_a, self.pair_b, self.pair_w

    def pad_arrays(self):
        """``(pad_mult, pad_block)``: empty arrays for a form without padding (what the kernels take)."""
        if not self.padded:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return self.pad_mult, self.pad_block

    def variables(self, keep) -> np.ndarray:
        """The form's variables at ``keep`` (G,) or (n, G): keep itself, or for a padded form keep then the padded
        channel counts (2G). Real-valued counts are padded with a real ceiling."""
        if not self.padded:
            return keep
        keep = np.asarray(keep)
        x = keep * self.pad_mult
        padded = self.pad_block * (np.ceil(x / self.pad_block) if keep.dtype.kind == "f" else
                                   -(-x // self.pad_block))
        return np.concatenate([keep, padded], axis=-1)

    def __call__(self, keep) -> np.ndarray:
        """Exact value for one keep vector (G,) or many (n, G); returns int64 of shape () or (n,)."""
        keep = np.asarray(keep, dtype=np.int64)
        if keep.ndim == 1:
            return evaluate_many(np.ascontiguousarray(self.variables(keep)[None, :]), *self.arrays())[0]
        return evaluate_many(np.ascontiguousarray(self.variables(keep)), *self.arrays())

    def _partials(self, keep) -> np.ndarray:
        """d value / d variable at one real-valued keep vector (float64): over keep, and for a padded form over
        the padded counts too, taken at the middle of their range ``mult·keep + (block - 1)/2``."""
        keep = np.asarray(keep, dtype=np.float64)
        x = keep if not self.padded else np.concatenate([keep, self.pad_mult * keep + 0.5 * (self.pad_block - 1)])
        g = self.linear.astype(np.float64).copy()
        np.add.at(g, self.pair_a, self.pair_w * x[self.pair_b])
        np.add.at(g, self.pair_b, self.pair_w * x[self.pair_a])
        return g

    def _per_group(self, keep, padded_weight) -> np.ndarray:
        """:meth:`_partials` summed per group: a padded form's padded count's partial weighted by ``padded_weight``
        (G,) onto its group's."""
        g = self._partials(keep)
        return g if not self.padded else g[:self.groups] + padded_weight * g[self.groups:]

    def gradient(self, keep) -> np.ndarray:
        """d value / d keep at one real-valued keep vector (float64, shape (G,)): the window kernel's direction.
        A padded form's padded counts count as ``mult·keep`` plus half a block (their trend)."""
        return self._per_group(keep, self.pad_mult)

    def slack(self, keep) -> np.ndarray:
        """How far the value can move per group when only the group's real-valued count is known, to within one
        channel (shape (G,)): the window kernel's rounding slack. The gradient for a smooth form; a padded count
        adds its block, its range at a count known to one channel being ``mult + block - 1`` wide."""
        return self._per_group(keep, None if not self.padded else self.pad_mult + self.pad_block - 1)

    def __eq__(self, other):
        return isinstance(other, QuadraticForm) and self.const == other.const and all(
            np.array_equal(x, y) for x, y in zip(self.arrays()[1:], other.arrays()[1:])
        ) and all(np.array_equal(x, y) for x, y in zip(self.pad_arrays(), other.pad_arrays()))

    def __repr__(self):
        pad = f", padded to blocks of {sorted(set(self.pad_block.tolist()))}" if self.padded else ""
        return f"QuadraticForm(groups={self.groups}, pairs={len(self.pair_w)}, const={self.const}{pad})"


@njit(nogil=True, cache=True)
def evaluate_one(keep, const, linear, pair_a, pair_b, pair_w):
    """Value of the form at one keep vector: exact int64 for integer counts, float64 for real-valued ones."""
    total = const
    for i in range(linear.shape[0]):
        total += linear[i] * keep[i]
    for p in range(pair_w.shape[0]):
        total += pair_w[p] * keep[pair_a[p]] * keep[pair_b[p]]
    return total


@njit(nogil=True, cache=True, inline="always")
def padded_channels(k, mult, block):
    """``block · ceil(mult · k / block)``: ``k`` units of ``mult`` channels as a kernel computing blocks of ``block``
    channels pays for them (integers)."""
    return block * ((mult * k + block - 1) // block)


@njit(nogil=True, cache=True)
def pad_variables(keep, pad_mult, pad_block, x):
    """A padded form's 2G variables at one integer keep vector (G,) into ``x``: keep, then each group's channels
    rounded up to its block (see the module docstring); the form's value is then :func:`evaluate_one` at ``x``."""
    G = keep.shape[0]
    for i in range(G):
        x[i] = keep[i]
        x[G + i] = padded_channels(keep[i], pad_mult[i], pad_block[i])


@njit(nogil=True, cache=True)
def evaluate_many(keep, const, linear, pair_a, pair_b, pair_w):
    """Exact int64 value of the form for each row of ``keep`` (n, G)."""
    n = keep.shape[0]
    out = np.empty(n, dtype=np.int64)
    for j in range(n):
        total = const
        row = keep[j]
        for i in range(linear.shape[0]):
            total += linear[i] * row[i]
        for p in range(pair_w.shape[0]):
            total += pair_w[p] * row[pair_a[p]] * row[pair_b[p]]
        out[j] = total
    return out


@njit(nogil=True, cache=True)
def expected_padded_form(u, sigma, R, channels, const, linear, pair_a, pair_b, pair_w, pad_mult, pad_block):
    """A padded form's expectation when each group's ratio is ``N(u, σ²)`` truncated to ``[0, R]``, groups
    independent: each count ``k`` by the rounding rule ``max(1, floor((1 - r)·c + 1/2))``, its padded count
    :func:`padded_channels`; a pair of two groups' variables takes the product of their means, a pair of one group's
    two (k·k, k·P, P·P) its own second moment (float)."""
    G = channels.shape[0]
    moments = np.zeros((5, G))  # E[k], E[P], E[k²], E[k·P], E[P²] per group
    root2 = math.sqrt(2.0)
    for i in range(G):
        c = channels[i]
        total = 0.0
        cdf_hi = 0.5 * math.erfc(-(R - u) / sigma / root2)  # max(1, ·): count 1 takes every ratio up to R
        for k in range(1, c + 1):
            r_lo = min(max(1.0 - (k + 0.5) / c, 0.0), R)  # the ratios that round to k: (r_lo, r_hi]
            cdf_lo = 0.5 * math.erfc(-(r_lo - u) / sigma / root2)
            p = cdf_hi - cdf_lo
            cdf_hi = cdf_lo  # count k + 1's upper ratio is count k's lower one
            if p <= 0.0:
                continue
            P = padded_channels(k, pad_mult[i], pad_block[i])
            total += p
            moments[0, i] += p * k
            moments[1, i] += p * P
            moments[2, i] += p * k * k
            moments[3, i] += p * k * P
            moments[4, i] += p * P * P
        for m in range(5):
            moments[m, i] /= total
    value = float(const)
    for v in range(2 * G):
        value += linear[v] * moments[v // G, v % G]
    for q in range(pair_w.shape[0]):
        a = pair_a[q]
        b = pair_b[q]
        if a % G == b % G:  # one group's two variables: its second moment
            value += pair_w[q] * moments[2 + (a >= G) + (b >= G), a % G]
        else:
            value += pair_w[q] * moments[a // G, a % G] * moments[b // G, b % G]
    return value


def keep_from_recipe(recipe, channels, granularity=None) -> np.ndarray:
    """Kept channels per group: ``g · max(1, floor((1 - r) · c / g + 0.5))`` (round half up, never zero), with
    ``g = granularity`` (1 by default: ``max(1, floor((1 - r) · c + 0.5))``).

    Works on one recipe (G,) or many (n, G); float64 arithmetic, the same rule as the numba samplers (which draw
    unit counts ``c / g``, so ``(1 - r) · (c / g)`` is computed exactly as they do).
    """
    r = np.asarray(recipe, dtype=np.float64)
    if granularity is None:
        c = np.asarray(channels, dtype=np.float64)
        return np.maximum(1, np.floor((1.0 - r) * c + 0.5)).astype(np.int64)
    g = np.asarray(granularity, dtype=np.int64)
    units = (np.asarray(channels, dtype=np.int64) // g).astype(np.float64)
    return g * np.maximum(1, np.floor((1.0 - r) * units + 0.5)).astype(np.int64)


class UnitTable:
    """A layer table seen in unit counts (``channels / granularity``), what the samplers draw: ``channels`` are
    the unit counts and the forms are the table's own (they are written over units)."""

    def __init__(self, table):
        self.table = table
        self.unit_size = np.asarray(table.granularity, dtype=np.int64)
        self.channels = np.asarray(table.channels, dtype=np.int64) // self.unit_size
        self.flops, self.params = table.flops, table.params
        self.base_flops, self.base_params = table.base_flops, table.base_params
        self.latency, self.base_latency = getattr(table, "latency", None), getattr(table, "base_latency", None)
        self.model, self.mode = table.model, table.mode


def unit_table(table):
    """``(view, granularity)``: the view to sample on, and the granularity to multiply its unit counts by (None
    when every group has granularity 1, the view then being the table itself)."""
    g = getattr(table, "granularity", None)
    if isinstance(table, UnitTable) or g is None or np.all(np.asarray(g) == 1):
        return table, None
    view = UnitTable(table)
    return view, view.unit_size
