"""Analysis of populations of pruned subnetworks (paper §3): per regime, EDFs with bootstrap bands, best-k,
distributions, winners and the baseline; across regimes, the optimal mCB and the drop-vs-mCB fit.

Pure computations on numpy arrays (no HDF5, no plotting; the statistics are :mod:`nps.pipeline.results.stats`):
:mod:`nps.pipeline.results.report` reads results.h5, calls these and draws what they return.

Conventions
-----------
- **accuracy drop** ``e`` = base top-1 − subnetwork top-1, in percentage points (the ``acc_drop`` column).
- **EDF** (paper Eq. 1): ``F(e) = (1/n) Σ 1[e_i < e]`` — strictly less than, evaluated on a grid of ``e``.
- **EDF area**: the mean of ``F`` over a regime's common, evenly spaced e-grid. It is a Riemann sum of
  ``∫F de / (e_max − e_min) = (e_max − mean drop) / (e_max − e_min)``, so "A's EDF is higher than B's" in this
  summary sense is the same as "A has the lower mean drop".
- **Bootstrap** (as pycls does for its EDF comparisons): each space's drops are resampled with replacement
  ``n_boot`` times; bands are percentiles of the resampled EDFs, and ``P(A higher than B)`` is the fraction of
  paired draws (draw b of A against draw b of B, ties counted half) in which A's EDF area is larger.

The two fits (see :func:`fit_power_law` and :func:`fit_offset_power_law` for the reasons behind each form):

- optimal mCB vs remaining FLOPs: ``mCB = a · c_flops^(−p)``;
- accuracy drop of the winners vs their mCB (Conjecture 4): ``drop = e0 + a · mCB^b``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from nps.kernels.spaces import RATIOS
from nps.pipeline.network.pruning_kind import FILTERS, KINDS, kind_of
from nps.pipeline.results import retraining_study
from nps.pipeline.results.stats import (
    DEFAULT_BAND,
    DEFAULT_BOOTSTRAP,
    DEFAULT_EDF_POINTS,
    MIN_INTERVAL_N,
    Fit,
    best_k,
    bootstrap_edf,
    compare_areas,
    edf_grid,
    fit_offset_power_law,
    fit_power_law,
    histogram,
    histogram_edges,
)

# --------------------------------------------------------------------------------------------------------------------
# A whole results file, summarised.

HIST_FIELDS = ("std", "c_flops", "c_params", "mcb")
WHY_OPTIMAL_MCB = ("a power law in the remaining FLOPs: monotone and positive, two parameters (a few regimes pin "
                   "it down), rising ever faster as c_flops -> 0 as the paper's curve does above 90 % reduction; "
                   "a is the mCB extrapolated to the unpruned network (1 for the base itself)")
WHY_DROP_VS_MCB = ("a power law with an offset: if the optimal mCB is a power law in c_flops and the drop above "
                   "its floor e0 is a power law in the remaining capacity (pruning scaling laws, Rosenfeld et al. "
                   "2021), then drop - e0 is a power law in mCB; linear in (e0, a) for a fixed b, so the fit is "
                   "exact least squares in e0, a and a 1-D search in b")
WINNER_FIELDS = ("acc_drop", "top1", "c_flops", "c_params", "mcb", "std", "flops", "params")


@dataclass
class Population:
    """The finished rows of one space (``/spaces/<group>``) and the status counts of all its rows.

    ``row`` holds the row indices in the file; every other array is aligned with it. ``counts`` has ``total``,
    ``pending``, ``running``, ``done``, ``failed`` and ``nan`` (done, but top-1 or drop not finite: excluded).
    """

    group: str
    space: str
    target: str
    value: float
    counts: dict
    row: np.ndarray
    acc_drop: np.ndarray
    top1: np.ndarray
    c_flops: np.ndarray
    c_params: np.ndarray
    mcb: np.ndarray
    std: np.ndarray
    flops: np.ndarray
    params: np.ndarray
    recipe: np.ndarray
    keep: np.ndarray
    delta: float = math.nan
    """The regime's tolerance (``|c − value| <= delta``), NaN when the file does not say."""
    criterion: str = ""
    """How the rows were pruned and retrained (the group's attributes; empty or 0 when the file does not say)."""
    method: str = ""
    epochs: int = 0

    @property
    def n(self) -> int:
        return int(self.row.size)

    @property
    def regime(self) -> str:
        return regime_key(self.target, self.value)

    @property
    def pruning(self) -> str:
        """``filters`` or ``weights``: the kind of pruning of this space (its regime is of that kind alone)."""
        return kind_of(self.group).name


def regime_key(target: str, value: float) -> str:
    """``c_flops=0.25``: the regime part of a space key (:func:`nps.kernels.spaces.regime_key`)."""
    from nps.kernels.spaces import regime_key as key

    return key(target, value)


def _regime_order(target: str, value: float) -> tuple:
    # c_flops regimes first, then c_params; within a target from the least to the most pruned.
    rank = {"c_flops": 0, "c_params": 1}.get(target, 2)
    return rank, -value if math.isfinite(value) else math.inf, target


def _seed_for(seed: int, name: str) -> np.random.Generator:
    import zlib

    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def _tolist(a) -> list:
    """JSON-ready list: numpy scalars to Python, non-finite floats to None."""
    a = np.asarray(a)
    if a.dtype.kind == "f":
        return [None if not math.isfinite(v) else float(v) for v in a.ravel().tolist()] if a.ndim <= 1 else \
            [_tolist(r) for r in a]
    return a.tolist()


def _winner(pop: Population, i: int) -> dict:
    out = {"group": pop.group, "space": pop.space, "row": int(pop.row[i])}
    for name in WINNER_FIELDS:
        value = getattr(pop, name)[i]
        out[name] = int(value) if name in ("flops", "params") else float(value)
    out["recipe"] = _tolist(pop.recipe[i].astype(np.float64))
    out["keep"] = [int(v) for v in pop.keep[i]]
    return out


def beats_baseline(drops, baseline_drop: float, n_boot: int, rng: np.random.Generator,
                   band: Sequence[float] = DEFAULT_BAND) -> dict:
    """The fraction of ``drops`` below the baseline's drop (``wins`` of ``n``; the baseline is one trained
    subnetwork, a fixed reference), with its Wilson score interval at the band's level from
    :data:`~nps.pipeline.results.stats.MIN_INTERVAL_N` rows on (``ci`` None below: say the count instead).

    Wilson's interval, not a bootstrap: resampling 0 wins of 10 gives [0 %, 0 %], which reads as certain; Wilson's
    gives [0 %, 28 %] (``n_boot`` and ``rng`` are kept for the callers' signature)."""
    d = np.asarray(drops, dtype=np.float64)
    wins = int(np.count_nonzero(d < baseline_drop))
    ci = list(wilson_interval(wins, d.size, band)) if d.size >= MIN_INTERVAL_N else None
    return {"fraction": wins / d.size if d.size else math.nan, "wins": wins, "ci": ci, "n": int(d.size),
            "baseline_drop": float(baseline_drop)}


def wilson_interval(wins: int, n: int, band: Sequence[float] = DEFAULT_BAND) -> tuple[float, float]:
    """Wilson's score interval for a proportion ``wins / n`` at the level of ``band`` (percentiles, e.g. 2.5, 97.5)."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - (100 - (band[1] - band[0])) / 200)
    p = wins / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (0.0 if wins == 0 else max(0.0, centre - half)), (1.0 if wins == n else min(1.0, centre + half))


def uniform_reference(baseline: Population | None, computed: dict | None) -> dict | None:
    """The one uniform reference a regime's figures show: the trained baseline row's own values (ratio, c_flops,
    c_params, mCB, keep) when it has finished, else the uniform recipe computed from the layer table (``trained``
    False), else None."""
    if baseline is not None and baseline.n:
        i = int(np.argmin(baseline.acc_drop))
        recipe = baseline.recipe[i].astype(np.float64)
        return {"ratio": float(np.mean(recipe)), "keep": [int(v) for v in baseline.keep[i]],
                "c_flops": float(baseline.c_flops[i]), "c_params": float(baseline.c_params[i]),
                "mcb": float(baseline.mcb[i]), "std": float(baseline.std[i]), "trained": True,
                "group": baseline.group, "row": int(baseline.row[i])}
    return None if computed is None else {**computed, "trained": False}


def _baseline_entry(pop: Population) -> dict:
    """The baseline of a regime: its best row's values, and with several rows (a seeded ``weights:uniform``) the
    mean drop of them all as ``acc_drop``."""
    entry = {"group": pop.group, "space": pop.space, "counts": dict(pop.counts), "n": pop.n}
    if pop.n:
        entry.update(_winner(pop, int(np.argmin(pop.acc_drop))))
        entry["acc_drop"] = float(np.mean(pop.acc_drop))
    return entry


def _space_entry(p: Population, grid, edges, *, n_boot: int, seed: int, band,
                 baseline_drop: float | None) -> tuple[dict, np.ndarray | None]:
    """One space of a regime: its EDF with a bootstrap band, its drops, histograms, winner and the baseline test,
    and its bootstrap EDF areas (None without finished rows). Intervals are given from :data:`MIN_INTERVAL_N` rows
    on; below, ``mean_ci``/``area_ci`` are None."""
    entry = {"group": p.group, "space": p.space, "counts": dict(p.counts), "n": p.n}
    if not p.n:
        return entry, None
    boot = bootstrap_edf(p.acc_drop, grid, n_boot, _seed_for(seed, p.group))
    lo, hi = boot.band(band)
    banded = p.n >= MIN_INTERVAL_N
    entry.update({
        "finished": {"row": _tolist(p.row), "acc_drop": _tolist(p.acc_drop), "mcb": _tolist(p.mcb)},
        "edf": {"F": _tolist(boot.F), "lo": _tolist(lo), "hi": _tolist(hi), "area": boot.area,
                "area_ci": _tolist(np.percentile(boot.areas, band)) if banded else None},
        "drop": {"mean": float(p.acc_drop.mean()), "median": float(np.median(p.acc_drop)),
                 "min": float(p.acc_drop.min()), "max": float(p.acc_drop.max()),
                 "mean_ci": _tolist(np.percentile(boot.means, band)) if banded else None},
        "hist": {f: _tolist(histogram(getattr(p, f), edges[f])) for f in HIST_FIELDS},
        "winner": _winner(p, int(best_k(p.acc_drop, 1)[0])),
    })
    if baseline_drop is not None:
        entry["beats_baseline"] = beats_baseline(p.acc_drop, baseline_drop, n_boot,
                                                 _seed_for(seed, p.group + "|baseline"), band)
    return entry, boot.areas


def _best_of_regime(finished: Sequence[Population], k: int) -> dict:
    """The best ``k`` rows of a regime over all its populations (the baseline included: the best network of a
    regime is whichever space it came from), its winner, and the rest's c_flops/c_params."""
    drops = np.concatenate([p.acc_drop for p in finished])
    owner = np.concatenate([np.full(p.n, i) for i, p in enumerate(finished)])
    local = np.concatenate([np.arange(p.n) for p in finished])
    top = best_k(drops, k)
    cols = {"space": [finished[owner[j]].space for j in top], "row": [int(finished[owner[j]].row[local[j]]) for j in top]}
    for name in WINNER_FIELDS:
        cols[name] = [getattr(finished[owner[j]], name)[local[j]].item() for j in top]
    rest = np.setdiff1d(np.arange(drops.size), top)  # the finished rows outside the best k
    return {"best_k": {"k": int(k), "n": int(top.size), "of": int(drops.size), **cols},
            "winner": _winner(finished[owner[top[0]]], int(local[top[0]])),
            "rest": {name: _tolist(np.concatenate([getattr(p, name) for p in finished])[rest])
                     for name in ("c_flops", "c_params")}}


def summarize_regime(pops: Sequence[Population], *, k: int, n_boot: int, seed: int, edf_points: int,
                     band: Sequence[float], baseline: Population | None = None, uniform: dict | None = None) -> dict:
    """Everything the per-regime figure shows, for the spaces of one regime of one kind of pruning (and its
    baseline row, if any)."""
    target, value = pops[0].target, pops[0].value
    kind = kind_of(pops[0].group)
    finished = [p for p in pops if p.n > 0]
    grid = edf_grid([p.acc_drop for p in finished], edf_points)
    edges = {f: histogram_edges([getattr(p, f) for p in finished]) for f in HIST_FIELDS}
    baseline_drop = float(np.mean(baseline.acc_drop)) if baseline is not None and baseline.n else None
    spaces, areas = [], {}
    for p in pops:
        entry, boot_areas = _space_entry(p, grid, edges, n_boot=n_boot, seed=seed, band=band,
                                         baseline_drop=baseline_drop)
        if boot_areas is not None and p.n >= MIN_INTERVAL_N:  # resampling a handful of rows decides nothing
            areas[p.space] = boot_areas
        spaces.append(entry)
    deltas = [p.delta for p in pops if math.isfinite(p.delta)]
    key = regime_key(target, value)
    summary = {"key": key, "id": regime_id(kind.name, key), "pruning": kind.name, "target": target, "value": value,
               "delta": max(deltas) if deltas else None, "spaces": spaces,
               "baseline": _baseline_entry(baseline) if baseline is not None else None,
               "uniform": uniform_reference(baseline, uniform if kind is FILTERS else None),
               "n": sum(p.n for p in pops), "edf_grid": _tolist(grid),
               "hist_edges": {f: _tolist(e) for f, e in edges.items()},
               "comparison": compare_areas(areas) if len(areas) >= 2 else None,
               "best_k": None, "winner": None}
    ranked = finished + ([baseline] if baseline is not None and baseline.n else [])
    if ranked:
        summary.update(_best_of_regime(ranked, k))
    return summary


def regime_id(pruning: str, key: str) -> str:
    """A regime's name among all of a file's: its key, with ``(weights)`` for a weight-pruning regime."""
    return key if pruning == FILTERS.name else f"{key} ({pruning})"


def _baseline_of(p: Population) -> bool:
    return kind_of(p.group).is_baseline(p.space)


def summarize(populations: Sequence[Population], *, k: int = 40, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0,
              edf_points: int = DEFAULT_EDF_POINTS, band: Sequence[float] = DEFAULT_BAND,
              uniform: Mapping[str, dict] | None = None) -> dict:
    """The analysis of a whole results file as a JSON-ready dict (what ``summary.json`` holds).

    A regime is one kind of pruning at one target: filter and weight spaces are never summarised, fitted or drawn
    together, and each is compared with its own uniform baseline (``baseline`` for filters, ``weights:uniform`` for
    weights). ``uniform`` maps a regime key (``c_flops=0.25``) to the uniform filter recipe at that regime
    (``ratio``, ``keep``, ``c_flops``, ``c_params``, ``mcb``), computed by the caller from the layer table: shown
    only where no baseline row has finished. Regimes are ordered filters first, then c_flops before c_params, each
    from the least to the most pruned; spaces by name. ``optimal_mcb`` and ``drop_vs_mcb`` are the filter
    regimes' fits (the paper's); ``fits`` holds them per kind.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    by_regime: dict[tuple, list[Population]] = {}
    baselines: dict[tuple, Population] = {}
    for p in populations:
        if p.space == RATIOS:  # ratio spaces have no regime: see nps.pipeline.results.retraining_study
            continue
        key = (p.pruning, p.target, p.value)
        if _baseline_of(p):
            baselines[key] = p
        else:
            by_regime.setdefault(key, []).append(p)
    regimes = []
    order = {kind.name: i for i, kind in enumerate(KINDS)}
    for key in sorted(by_regime, key=lambda kv: (order[kv[0]], *_regime_order(kv[1], kv[2]))):
        pops = sorted(by_regime[key], key=lambda p: p.space)
        regimes.append(summarize_regime(pops, k=k, n_boot=n_boot, seed=seed, edf_points=edf_points, band=band,
                                        baseline=baselines.get(key),
                                        uniform=(uniform or {}).get(regime_key(key[1], key[2]))))

    counts = {name: 0 for name in ("total", "pending", "running", "done", "failed", "nan")}
    for p in populations:
        for name in counts:
            counts[name] += int(p.counts.get(name, 0))
    counts["finished"] = sum(p.n for p in populations)
    fits = {kind.name: {"optimal_mcb": _optimal_mcb([r for r in regimes if r["pruning"] == kind.name]),
                        "drop_vs_mcb": _drop_vs_mcb([r for r in regimes if r["pruning"] == kind.name])}
            for kind in KINDS if any(r["pruning"] == kind.name for r in regimes)}
    filters = fits.get(FILTERS.name) or {"optimal_mcb": _optimal_mcb([]), "drop_vs_mcb": _drop_vs_mcb([])}
    return {"counts": counts, "settings": {"k": int(k), "bootstrap": int(n_boot), "seed": int(seed),
                                           "edf_points": int(edf_points), "band": [float(b) for b in band],
                                           "min_interval_n": MIN_INTERVAL_N},
            "regimes": regimes, "fits": fits, "optimal_mcb": filters["optimal_mcb"],
            "drop_vs_mcb": filters["drop_vs_mcb"], "ratio_study": retraining_study.summarize(populations)}


def _optimal_mcb(regimes: Sequence[dict]) -> dict:
    """The mCB of the best-k of every regime against FLOPs reduction, with the power-law fit (Fig. 5 right)."""
    c, m, label, target = [], [], [], []
    for reg in regimes:
        if reg["best_k"]:
            c += reg["best_k"]["c_flops"]
            m += reg["best_k"]["mcb"]
            label += [reg["key"]] * reg["best_k"]["n"]
            target += [reg["target"]] * reg["best_k"]["n"]
    fit = fit_power_law(c, m, groups=label) if c else Fit("none", "mCB = a · c_flops^b", note="no finished rows")
    return {"points": {"regime": label, "target": target, "c_flops": c, "mcb": m}, "fit": fit.as_dict(),
            "why": WHY_OPTIMAL_MCB, "pruning": regimes[0]["pruning"] if regimes else FILTERS.name}


def _drop_vs_mcb(regimes: Sequence[dict]) -> dict:
    """Each regime's winner: accuracy drop against mCB, with the offset power-law fit (Fig. 5 left)."""
    pts = {"regime": [], "space": [], "row": [], "mcb": [], "acc_drop": []}
    for reg in regimes:
        w = reg["winner"]
        if w:
            pts["regime"].append(reg["key"])
            for name in ("space", "row", "mcb", "acc_drop"):
                pts[name].append(w[name])
    return {"points": pts, "fit": fit_offset_power_law(pts["mcb"], pts["acc_drop"]).as_dict(),
            "why": WHY_DROP_VS_MCB, "pruning": regimes[0]["pruning"] if regimes else FILTERS.name}
