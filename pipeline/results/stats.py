"""The statistics of the analysis: accuracy-drop EDFs, the bootstrap, best-k, histograms and the two fits.

Pure computations on numpy arrays (no HDF5, no plotting); :mod:`nps.pipeline.results.analysis` applies them to the
populations of a results file.

- **EDF** (paper Eq. 1): ``F(e) = (1/n) Σ 1[e_i < e]`` — strictly less than, evaluated on a grid of ``e``.
- **EDF area**: the mean of ``F`` over a regime's common, evenly spaced e-grid. It is a Riemann sum of
  ``∫F de / (e_max − e_min) = (e_max − mean drop) / (e_max − e_min)``, so "A's EDF is higher than B's" in this
  summary sense is the same as "A has the lower mean drop".
- **Bootstrap** (as pycls does for its EDF comparisons): each space's drops are resampled with replacement
  ``n_boot`` times; bands are percentiles of the resampled EDFs, and ``P(A higher than B)`` is the fraction of
  paired draws (draw b of A against draw b of B, ties counted half) in which A's EDF area is larger.
- **Fits**: ``mCB = a · c_flops^b`` (:func:`fit_power_law`) and ``drop = e0 + a · mCB^b``
  (:func:`fit_offset_power_law`); see each for the reasons behind its form.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from nps.pipeline.catalog import DEFAULT_BAND, DEFAULT_BOOTSTRAP, DEFAULT_EDF_POINTS  # noqa: F401 - defined once

# Range searched for the exponent of drop = e0 + a·mCB^b. mCB of real subnetworks lies within ~[0.2, 5], where
# |b| <= 40 already spans 28 orders of magnitude: anything steeper is not a curve a population can support.
EXPONENT_RANGE = (-40.0, 40.0)


# --------------------------------------------------------------------------------------------------------------------
# EDFs and the bootstrap.


def edf(drops, grid) -> np.ndarray:
    """``F(e) = fraction of drops < e`` at every ``e`` of ``grid`` (paper Eq. 1); all NaN when there are no drops."""
    d = np.sort(np.asarray(drops, dtype=np.float64))
    grid = np.asarray(grid, dtype=np.float64)
    if d.size == 0:
        return np.full(grid.shape, np.nan)
    return np.searchsorted(d, grid, side="left") / d.size


def edf_grid(samples: Sequence, points: int = DEFAULT_EDF_POINTS) -> np.ndarray:
    """An evenly spaced e-grid over the drops of all ``samples`` (one array per space).

    It runs from the smallest drop (where every F is 0) to 2 % of the range past the largest (where every F is 1:
    F counts drops strictly below e). A single distinct value gets a grid of ±0.5 points around it.
    """
    values = [np.asarray(s, dtype=np.float64).ravel() for s in samples]
    values = np.concatenate(values) if values else np.empty(0)
    if values.size == 0:
        return np.empty(0)
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    else:
        hi += 0.02 * (hi - lo)
    return np.linspace(lo, hi, int(points))


def bootstrap_weights(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """How often each of ``n`` items is drawn in each of ``n_boot`` resamples with replacement: (n_boot, n) ints."""
    idx = rng.integers(0, n, size=(n_boot, n))
    offsets = (np.arange(n_boot, dtype=np.int64) * n)[:, None]
    return np.bincount((idx + offsets).ravel(), minlength=n_boot * n).reshape(n_boot, n)


@dataclass
class BootstrapEDF:
    """A space's EDF on a grid with its bootstrap distribution.

    ``F`` (grid,), ``samples`` (n_boot, grid) resampled EDFs, ``areas`` (n_boot,) their areas, ``means``
    (n_boot,) the resampled mean drops.
    """

    F: np.ndarray
    samples: np.ndarray
    areas: np.ndarray
    means: np.ndarray

    def band(self, q: Sequence[float] = DEFAULT_BAND) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = np.percentile(self.samples, q, axis=0)
        return lo, hi

    @property
    def area(self) -> float:
        return float(np.mean(self.F))


def bootstrap_edf(drops, grid, n_boot: int = DEFAULT_BOOTSTRAP, seed: int | np.random.Generator = 0) -> BootstrapEDF:
    """The EDF of ``drops`` on ``grid`` and ``n_boot`` resampled EDFs (resampling with replacement).

    Sorting the drops once turns every resample into a weight vector over the sorted drops; the resampled EDF at
    ``e`` is then a cumulative sum of weights read at ``searchsorted(drops, e)``: O(n_boot · (n + grid)), no per
    resample sorting.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    d = np.sort(np.asarray(drops, dtype=np.float64))
    grid = np.asarray(grid, dtype=np.float64)
    n = d.size
    if n == 0:
        raise ValueError("bootstrap_edf needs at least one drop")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    pos = np.searchsorted(d, grid, side="left")
    w = bootstrap_weights(n, n_boot, rng)
    cum = np.zeros((n_boot, n + 1), dtype=np.int64)
    np.cumsum(w, axis=1, out=cum[:, 1:])
    samples = cum[:, pos] / n
    return BootstrapEDF(F=pos / n, samples=samples, areas=samples.mean(axis=1), means=(w @ d) / n)


def compare_areas(areas: Mapping[str, np.ndarray]) -> dict:
    """Which space's EDF is higher, with what confidence, from paired bootstrap draws of the EDF areas.

    Returns ``prob_higher[A][B]`` = P(area_A > area_B) (ties count half; ``prob_higher[A][B] + prob_higher[B][A]
    = 1``), ``prob_best[A]`` = P(A's area is the largest of all; ties split) and ``ranking`` (names by observed
    probability of being best, then name).
    """
    names = list(areas)
    if not names:
        return {"prob_higher": {}, "prob_best": {}, "ranking": []}
    sizes = {len(np.asarray(areas[n])) for n in names}
    if len(sizes) != 1:
        raise ValueError("every space needs the same number of bootstrap draws")
    a = np.stack([np.asarray(areas[n], dtype=np.float64) for n in names])  # (spaces, n_boot)
    higher = {}
    for i, name_a in enumerate(names):
        higher[name_a] = {}
        for j, name_b in enumerate(names):
            if i == j:
                continue
            p = np.mean((a[i] > a[j]) + 0.5 * (a[i] == a[j]))
            higher[name_a][name_b] = float(p)
    top = a.max(axis=0)
    is_top = a == top
    best = (is_top / is_top.sum(axis=0)).mean(axis=1)
    prob_best = {name: float(p) for name, p in zip(names, best)}
    ranking = sorted(names, key=lambda n: (-prob_best[n], n))
    return {"prob_higher": higher, "prob_best": prob_best, "ranking": ranking}


# --------------------------------------------------------------------------------------------------------------------
# Winners and distributions.


def best_k(drops, k: int) -> np.ndarray:
    """Indices of the ``k`` lowest drops (best first; a stable sort keeps the input order among ties)."""
    d = np.asarray(drops, dtype=np.float64)
    if np.any(~np.isfinite(d)):
        raise ValueError("best_k needs finite drops; drop the unfinished rows first")
    return np.argsort(d, kind="stable")[: max(0, int(k))]


def histogram_edges(samples: Sequence, bins: int | None = None) -> np.ndarray:
    """Common bin edges for the values of several spaces (so their histograms can be overlaid).

    ``bins`` defaults to √(total count) clipped to [8, 40]. A single distinct value gets a bin of width 1e-3·|x|
    (or 1e-3) centred on it.
    """
    values = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in samples]) if samples else np.empty(0)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return np.empty(0)
    if bins is None:
        bins = int(np.clip(round(math.sqrt(values.size)), 8, 40))
    lo, hi = float(values.min()), float(values.max())
    if hi - lo <= 1e-12 * max(1.0, abs(lo)):
        half = 5e-4 * (abs(lo) or 1.0)
        lo, hi = lo - half, hi + half
    return np.linspace(lo, hi, int(bins) + 1)


def histogram(values, edges) -> np.ndarray:
    """Counts of ``values`` in the bins ``edges`` (``np.histogram``: the last bin includes its right edge)."""
    return np.histogram(np.asarray(values, dtype=np.float64), bins=np.asarray(edges, dtype=np.float64))[0]


# --------------------------------------------------------------------------------------------------------------------
# Fits.


MIN_FIT_DOF = 2
"""A fit is drawn only with at least this many more points than parameters."""
MIN_FIT_R2 = 0.5
"""... and only when it explains at least this share of the variance (R², on y itself)."""
MIN_INTERVAL_N = 10
"""Below this many subnetworks a bootstrap interval is not shown (resampling 4 values gives an interval that looks
certain and is not): figures and tables show the values themselves, or a count (``0 of 4``)."""


@dataclass
class Fit:
    """A least-squares fit of ``y`` against ``x``.

    ``kind`` is ``"power"`` (y = a·x^b), ``"offset_power"`` (y = e0 + a·x^b), ``"linear"`` (y = e0 + a·x),
    ``"constant"`` (y = a) or ``"none"`` (not enough data; ``note`` says why). ``r2`` and ``rmse`` are measured on
    ``y`` itself (not on a transformed scale); ``dof`` = points − parameters.
    """

    kind: str
    formula: str
    params: dict = field(default_factory=dict)
    n: int = 0
    dof: int = 0
    r2: float = math.nan
    rmse: float = math.nan
    note: str = ""

    def predict(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        p = self.params
        if self.kind == "power":
            return p["a"] * x ** p["b"]
        if self.kind == "offset_power":
            return p["e0"] + p["a"] * x ** p["b"]
        if self.kind == "linear":
            return p["e0"] + p["a"] * x
        if self.kind == "constant":
            return np.full(x.shape, p["a"])
        return np.full(x.shape, np.nan)

    def drawn(self) -> tuple[bool, str]:
        """Whether a figure draws this fit as a curve, and if not why (the rule: :data:`MIN_FIT_DOF`,
        :data:`MIN_FIT_R2`). A fit that explains little, or that as many parameters as points can always pass
        through, would read as a law the data do not show: its points are drawn alone."""
        if self.kind in ("none", "constant"):  # a constant is no law in x: nothing to draw beside the points
            return False, self.note
        if self.dof < MIN_FIT_DOF:
            return False, (f"not drawn: {self.n} points for {self.n - self.dof} parameters leave {self.dof} degree(s) "
                           f"of freedom (at least {MIN_FIT_DOF} needed)")
        if not math.isfinite(self.r2) or self.r2 < MIN_FIT_R2:
            r2 = "undefined" if not math.isfinite(self.r2) else f"{self.r2:.3f}"
            return False, f"not drawn: R² = {r2} < {MIN_FIT_R2:g} (the fit explains less than half the variance)"
        return True, ""

    def as_dict(self) -> dict:
        drawn, why = self.drawn()
        return {"kind": self.kind, "formula": self.formula, "params": {k: float(v) for k, v in self.params.items()},
                "n": int(self.n), "dof": int(self.dof), "r2": _json_float(self.r2), "rmse": _json_float(self.rmse),
                "note": self.note, "drawn": drawn, "not_drawn": why}


def _json_float(x: float):
    return None if x is None or not math.isfinite(x) else float(x)


def _goodness(fit: Fit, x: np.ndarray, y: np.ndarray) -> Fit:
    residual = y - fit.predict(x)
    ss_res = float(np.sum(residual ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    fit.rmse = math.sqrt(ss_res / y.size)
    fit.r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan
    return fit


def _clean(x, y) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length: {x.size} vs {y.size}")
    ok = np.isfinite(x) & np.isfinite(y)
    return x[ok], y[ok]


def fit_power_law(x, y, *, groups=None) -> Fit:
    """``y = a · x^b`` by least squares on ``log y = log a + b · log x`` (needs x > 0 and y > 0).

    Used for the optimal mCB against the remaining FLOPs: ``mCB = a · c_flops^b`` (the paper's curve in Fig. 5
    right; ``b < 0`` means mCB rises as more FLOPs are removed). Why this form: it is monotone, positive, has
    two parameters (so a handful of regimes pins it down), rises ever faster as ``c_flops → 0`` — the paper's curve
    "rises significantly when the reduction is above 90 %" — and ``a`` reads directly as the mCB extrapolated to the
    unpruned network (1.0 for the base itself), a sanity check. Fitting in log space weighs every regime by relative
    error, as the mCB spread grows with pruning.

    ``groups`` (one label per point, e.g. the regime) sets how many distinct x-levels the data has: with fewer than
    two the exponent is not identifiable (points of one regime differ in c_flops only by ±δ) and a constant
    (the geometric mean) is returned instead, with a note.
    """
    x, y = _clean(x, y)
    ok = (x > 0) & (y > 0)
    x, y = x[ok], y[ok]
    formula = "mCB = a · c_flops^b"
    if x.size == 0:
        return Fit("none", formula, note="no points with positive x and y")
    levels = len(set(np.asarray(groups)[ok].tolist())) if groups is not None else np.unique(x).size
    if levels < 2:
        a = float(np.exp(np.mean(np.log(y))))
        fit = _goodness(Fit("constant", "mCB = a", {"a": a}, n=x.size, dof=x.size - 1,
                            note="one regime only: the exponent needs at least two; a is the geometric mean"), x, y)
        fit.r2 = math.nan  # a constant explains no variance by construction
        return fit
    design = np.column_stack([np.ones_like(x), np.log(x)])
    (log_a, b), *_ = np.linalg.lstsq(design, np.log(y), rcond=None)
    fit = Fit("power", formula, {"a": float(np.exp(log_a)), "b": float(b)}, n=x.size, dof=x.size - 2)
    return _goodness(fit, x, y)


def _linear_rss(u: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least squares ``y = e0 + a·u``: (e0, a, residual sum of squares)."""
    um, ym = u.mean(), y.mean()
    du = u - um
    suu = float(du @ du)
    if not math.isfinite(suu) or suu <= 1e-300 * max(1.0, float(u @ u)):
        return float(ym), 0.0, float(np.sum((y - ym) ** 2))
    a = float(du @ (y - ym)) / suu
    e0 = float(ym - a * um)
    return e0, a, float(np.sum((y - e0 - a * u) ** 2))


def fit_offset_power_law(x, y, *, exponent_range: tuple[float, float] = EXPONENT_RANGE) -> Fit:
    """``y = e0 + a · x^b`` by least squares (variable projection: exact in e0 and a, a 1-D search in b).

    Used for Conjecture 4: the accuracy drop of each regime's winner against its mCB, ``drop = e0 + a·mCB^b``.
    Why this form: the optimal mCB follows a power law in the remaining FLOPs (:func:`fit_power_law`), and the
    pruning scaling laws of Rosenfeld et al. (2021) make the error a power law in the remaining capacity above a
    floor. Composing ``drop − e0 ∝ c^(−q)`` with ``mCB ∝ c^(−p)`` gives ``drop − e0 ∝ mCB^(q/p)``: a power law in
    mCB with an offset ``e0`` (the drop floor; negative when subnetworks beat their base network). Three
    parameters, and for a fixed ``b`` the model is linear in ``(e0, a)``, so the search is one-dimensional and
    needs no optimiser beyond numpy.

    Needs at least 4 points with 3 distinct x for the three-parameter form (one residual degree of freedom for the
    goodness of fit); with 2–3 distinct x, or when the best exponent runs to the edge of ``exponent_range`` (the
    data show no curvature), a line ``e0 + a·mCB`` is fitted instead and the note says so; fewer gives no fit.
    """
    x, y = _clean(x, y)
    ok = x > 0
    x, y = x[ok], y[ok]
    formula = "drop = e0 + a · mCB^b"
    distinct = np.unique(x).size
    if x.size < 2 or distinct < 2:
        return Fit("none", formula, n=x.size,
                   note=f"{x.size} point(s) with {distinct} distinct mCB: a fit needs at least two regimes")
    if x.size < 4 or distinct < 3:
        e0, a, _ = _linear_rss(x, y)
        fit = Fit("linear", "drop = e0 + a · mCB", {"e0": e0, "a": a}, n=x.size, dof=x.size - 2,
                  note=f"{x.size} points / {distinct} distinct mCB: too few for e0 + a·mCB^b, fitted a line")
        return _goodness(fit, x, y)
    logx = np.log(x)

    def rss(b: float) -> float:
        return _linear_rss(np.exp(b * logx), y)[2]

    lo, hi = exponent_range
    coarse = np.linspace(lo, hi, 1601)
    coarse = coarse[np.abs(coarse) > 1e-9]
    values = np.array([rss(b) for b in coarse])
    i = int(np.nanargmin(values))
    if i in (0, coarse.size - 1):
        # No interior optimum: the data pull the exponent to ±infinity (a step, not a curve) — too little
        # curvature for three parameters. A line is the honest summary.
        e0, a, _ = _linear_rss(x, y)
        fit = Fit("linear", "drop = e0 + a · mCB", {"e0": e0, "a": a}, n=x.size, dof=x.size - 2,
                  note=f"e0 + a·mCB^b has no optimum with b in [{lo:g}, {hi:g}] (the data show no curvature): "
                       "fitted a line")
        return _goodness(fit, x, y)
    b_best = _golden_min(rss, coarse[i - 1], coarse[i + 1])
    if rss(b_best) > values[i]:
        b_best = coarse[i]
    e0, a, _ = _linear_rss(np.exp(b_best * logx), y)
    fit = Fit("offset_power", formula, {"e0": e0, "a": a, "b": float(b_best)}, n=x.size, dof=x.size - 3)
    return _goodness(fit, x, y)


def _golden_min(f, lo: float, hi: float, tol: float = 1e-10, iters: int = 200) -> float:
    """Minimum of a unimodal function on [lo, hi] by golden-section search."""
    g = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = hi - g * (hi - lo), lo + g * (hi - lo)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if hi - lo < tol:
            break
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - g * (hi - lo)
            fc = f(c)
        else:
            lo, c, fc = c, d, fd
            d = lo + g * (hi - lo)
            fd = f(d)
    return 0.5 * (lo + hi)


def fit_from_dict(d: Mapping) -> Fit:
    """The :class:`Fit` back from its ``as_dict`` form (to draw a curve from summary.json)."""
    return Fit(d["kind"], d["formula"], dict(d["params"]), d["n"], d["dof"],
               math.nan if d["r2"] is None else d["r2"], math.nan if d["rmse"] is None else d["rmse"], d["note"])
