"""Pruning spaces: names, constraints and what can be reached (numpy only).

A space is a distribution over recipes ``r`` (one pruning ratio per group of the layer table) restricted by
constraints (paper §3):

``uniform``
    The initial space: ``r_i ~ U[0, R]`` i.i.d. (EagleEye's sampler and the paper's baseline).
``std-<σ>``
    A uniform ratio ``u`` meeting the target plus ``N(0, σ)`` noise per group, truncated to ``[0, R]``, and
    ``std(r)`` (population std over groups) within ``[STD_BAND[0]·σ, STD_BAND[1]·σ]``. Under a padded latency form
    ``u`` is where the noisy recipes meet the target on average (:func:`space_center`).
``mcb-<lo>-<hi>``
    The refined space of paper §4: the same noise model with ``σ = MCB_SIGMA`` and no std constraint, restricted to
    ``lo <= mCB <= hi``.

Every space also carries the regime's target, ``c_flops``, ``c_params`` or ``c_latency`` within ``±δ`` on the
integer channel counts ``keep = max(1, floor((1 - r)·c + 0.5))``. ``c_latency`` is the predicted latency relative to
the base network's, by a latency model (``nps latency-model``) whose per-layer terms have the shape of the FLOPs
form, so the table carries it as a third form (``table.latency``, ``table.base_latency``, integer femtoseconds).

A **space key** names one space in one regime, and is its group name in results.h5: ``<space>@<target>=<value>``
(``std-0.05@c_flops=0.25``; the part after ``@`` is the **regime key**), with ``#top`` appended for the two-stage
retraining of that space's best rows. :func:`space_key` writes one, :func:`parse_space_key` reads one; nothing
else builds or splits these strings.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from nps.kernels.defaults import DEFAULT_DELTA, DEFAULT_R  # noqa: E402,F401 - defined once
from nps.kernels.errors import SamplerError

# std(r) must fall within this band around σ (as multiples of σ). With G groups the sample std of N(0, σ) noise has a
# relative spread of about 1/sqrt(2G) (0.12 for ResNet-50's 37 groups), so the band removes only atypical draws and
# the truncation at [0, R].
STD_BAND = (0.5, 1.5)
# Noise level of the mCB-refined space: the widest of the paper's STD spaces, so that the mCB band, not σ, is what
# restricts the recipes.
MCB_SIGMA = 0.1
TARGETS = ("c_flops", "c_params", "c_latency")
LATENCY = "c_latency"  # the target measured by a latency model (the table must carry one)
BASELINE = "baseline"
"""The space name of a regime's uniform baseline: one row, the uniform ratio meeting the target (paper §3.1)."""

RATIOS = "ratios"
"""The space name of a ratio study's rows: every group at one uniform ratio (paper §2, Fig. 1)."""

TOP_SUFFIX = "#top"  # the two-stage space of a space key

WEIGHTS = "weights:"
"""Prefix of a weight-pruning space's name (``weights:std-0.05``): its recipe is one sparsity per prunable layer
(conv and linear weights, masked by magnitude), drawn on the weight table (``mode == "weights"``). Two weight spaces
are one recipe each, not a distribution: ``weights:uniform`` (the same sparsity in every layer) and ``weights:global``
(one magnitude threshold across layers, so it depends on the trained base weights); their ``n`` rows differ by seed."""
DETERMINISTIC = ("uniform", "global")  # the weight spaces that are one recipe

_STD_RE = re.compile(r"^std-(\d*\.?\d+)$")
_MCB_RE = re.compile(r"^mcb-(\d*\.?\d+)-(\d*\.?\d+)$")


@dataclass(frozen=True)
class Space:
    """One pruning space in one regime.

    Parameters
    ----------
    name : str
        ``uniform``, ``std-<σ>`` or ``mcb-<lo>-<hi>``.
    target : str
        ``c_flops``, ``c_params`` or ``c_latency``: which relative cost the regime fixes.
    value : float
        The target, e.g. 0.25.
    delta : float
        Tolerance: ``|c - value| <= delta``.
    R : float
        Largest pruning ratio of a group.
    sigma : float
        Noise std per group (0 for ``uniform``).
    std_band : tuple of float or None
        Allowed ``std(r)`` range, absolute.
    mcb_band : tuple of float or None
        Allowed mCB range.
    """

    name: str
    target: str
    value: float
    delta: float = DEFAULT_DELTA
    R: float = DEFAULT_R
    sigma: float = 0.0
    std_band: tuple | None = None
    mcb_band: tuple | None = None

    @property
    def pruning(self) -> str:
        """``filters`` or ``weights``: what a recipe of this space prunes."""
        return pruning_of(self.name)

    @property
    def kind(self) -> str:
        """``uniform``, ``std``, ``mcb`` (or, for weights, ``global``), without the ``weights:`` prefix."""
        return self.name.removeprefix(WEIGHTS).split("-")[0]

    @property
    def deterministic(self) -> bool:
        """A weight space that is one recipe (``weights:uniform``, ``weights:global``), not a distribution."""
        return self.pruning == "weights" and self.kind in DETERMINISTIC

    @property
    def key(self) -> str:
        """The space key: group name of this space in results.h5, ``<space>@<target>=<value>``."""
        return space_key(self.name, self.target, self.value)

    @property
    def regime(self) -> str:
        """The older name of :attr:`key`."""
        return self.key


def regime_key(target: str, value: float) -> str:
    """``c_flops=0.25``: the regime part of a space key (just the target when the value is unknown)."""
    return f"{target}={value:g}" if np.isfinite(value) else str(target)


def space_key(space: str, target: str, value: float, *, top: bool = False) -> str:
    """``<space>@<target>=<value>`` (``std-0.05@c_flops=0.25``), with ``#top`` for the two-stage space."""
    return f"{space}@{regime_key(target, value)}{TOP_SUFFIX if top else ''}"


@dataclass(frozen=True)
class SpaceKey:
    """A parsed space key: the space's name, its regime, and whether it is a two-stage ``#top`` space."""

    space: str
    target: str
    value: float
    top: bool = False

    @property
    def regime(self) -> str:
        return regime_key(self.target, self.value)

    @property
    def label(self) -> str:
        """The space's name with ``#top`` for a two-stage space (keeps the two populations apart)."""
        return self.space + (TOP_SUFFIX if self.top else "")

    @property
    def parent(self) -> str:
        """The key of the sampled space (itself, without ``#top``)."""
        return space_key(self.space, self.target, self.value)

    def __str__(self) -> str:
        return space_key(self.space, self.target, self.value, top=self.top)


_KEY_RE = re.compile(r"^(?P<space>[^@/]+)@(?P<target>c_flops|c_params|c_latency)=(?P<value>[0-9.eE+-]+)"
                     rf"(?P<top>{re.escape(TOP_SUFFIX)})?$")


def parse_space_key(key: str) -> SpaceKey | None:
    """The parts of a space key, or None when ``key`` is not one (a group written by other tools)."""
    m = _KEY_RE.match(key)
    if not m:
        return None
    try:
        value = float(m.group("value"))
    except ValueError:
        return None
    return SpaceKey(m.group("space"), m.group("target"), value, bool(m.group("top")))


def pruning_of(key: str) -> str:
    """``weights`` for the key (or name) of a weight-pruning space, else ``filters``."""
    return "weights" if key.startswith(WEIGHTS) else "filters"


def parse_space(name: str, target: str, value: float, *, delta: float = DEFAULT_DELTA, R: float = DEFAULT_R,
                sigma: float | None = None) -> Space:
    """Build a :class:`Space` from its name, checking every number; raises SamplerError naming the bad input."""
    if target not in TARGETS:
        raise SamplerError(f"target {target!r}: use one of {', '.join(TARGETS)}")
    if not (0.0 < value <= 1.0):
        raise SamplerError(f"{target}={value}: a relative complexity must be in (0, 1]")
    if not (0.0 < delta < 0.5):
        raise SamplerError(f"delta={delta}: the tolerance must be in (0, 0.5)")
    if not (0.0 < R < 1.0):
        raise SamplerError(f"R={R}: the largest pruning ratio must be in (0, 1)")
    if name.startswith(WEIGHTS):
        if target == LATENCY:
            raise SamplerError(f"space {name!r} at {LATENCY}: weight pruning keeps every layer's dense shape, so its "
                               "latency on dense kernels does not change; use a filter space, or c_flops/c_params")
        rest = name[len(WEIGHTS):]
        if rest in DETERMINISTIC:
            return Space(name, target, float(value), delta, R)
        if not (_STD_RE.match(rest) or _MCB_RE.match(rest)):
            raise SamplerError(f"space {name!r}: a weight space is weights:uniform, weights:global, "
                               "weights:std-<sigma> or weights:mcb-<lo>-<hi>")
        inner = parse_space(rest, target, value, delta=delta, R=R, sigma=sigma)
        return Space(name, inner.target, inner.value, inner.delta, inner.R, inner.sigma, inner.std_band,
                     inner.mcb_band)
    if name == "uniform":
        return Space(name, target, float(value), delta, R)
    m = _STD_RE.match(name)
    if m:
        s = float(m.group(1)) if sigma is None else float(sigma)
        if not (0.0 < s < 1.0):
            raise SamplerError(f"space {name!r}: σ must be in (0, 1)")
        return Space(name, target, float(value), delta, R, s, (STD_BAND[0] * s, STD_BAND[1] * s))
    m = _MCB_RE.match(name)
    if m:
        lo, hi = float(m.group(1)), float(m.group(2))
        if not (0.0 < lo < hi):
            raise SamplerError(f"space {name!r}: the mCB band needs 0 < lo < hi")
        s = MCB_SIGMA if sigma is None else float(sigma)
        return Space(name, target, float(value), delta, R, s, None, (lo, hi))
    raise SamplerError(f"space {name!r}: use 'uniform', 'std-<sigma>' (e.g. std-0.05) or 'mcb-<lo>-<hi>' "
                       "(e.g. mcb-0.9-1.1), or a weight space 'weights:<space>' (weights:global, weights:uniform, "
                       "weights:std-0.05)")


def target_form(table, target: str):
    """(form, base value) of the constrained quantity, and of the other one (for ``c_latency``: FLOPs, params being
    computed after the kernel)."""
    if target == "c_flops":
        return (table.flops, table.base_flops), (table.params, table.base_params)
    if target == LATENCY:
        if getattr(table, "latency", None) is None:
            raise SamplerError(f"{LATENCY} needs a latency model of {table.model}: measure one with nps "
                               "latency-model and pass it (--latency-model, or [model] latency_model)")
        return (table.latency, table.base_latency), (table.flops, table.base_flops)
    return (table.params, table.base_params), (table.flops, table.base_flops)


def continuous_form(form, keep):
    """A complexity form at real-valued keep counts (no rounding): one value for a keep vector, one per row of a
    matrix of them."""
    keep = form.variables(np.asarray(keep, dtype=np.float64))  # a padded form's padded counts too
    pairs = form.pair_w * keep[..., form.pair_a] * keep[..., form.pair_b]
    return form.const + keep @ form.linear + np.sum(pairs, axis=-1)


def uniform_ratio(table, target: str, value: float) -> float:
    """The uniform pruning ratio ``u`` whose continuous keep counts ``(1 - u)·c`` give ``value`` (bisection)."""
    from nps.kernels.complexity import unit_table  # numba: only when a space is computed

    table, _ = unit_table(table)
    (form, base), _ = target_form(table, target)
    c = np.asarray(table.channels, dtype=np.float64)
    lo, hi = 0.0, 1.0 - 0.5 / c.min()
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if continuous_form(form, (1.0 - mid) * c) / base > value:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


_CENTRES: dict = {}  # space_center's results by everything they depend on (the form, channels and space)


def space_center(table, space: Space) -> float:
    """The centre ``u`` of a Gaussian space (``r = u + N(0, σ²)`` per group): :func:`uniform_ratio`, the uniform
    ratio whose continuous counts meet the target, except for a padded target form (a latency model with channel
    blocks), where it is the ratio at which the space's own recipes meet the target on average.

    A padded form is a staircase in the counts: over the uniform recipes its value jumps at every ratio where a group
    crosses a block, and no uniform recipe meets a target inside a jump. :func:`uniform_ratio` then returns the jump
    itself, one ratio for a whole range of targets (MobileNetV2 on a CPU model padded to 16: every c_latency in about
    [0.72, 0.76] got u = 1/3), and the recipes that meet such a target lie far out in the noise: the window sampler
    accepted 5.6 % of its proposals there against 42 % at the FLOPs regime of the same mean latency. The centre used
    instead is continuous and decreasing in the target: the u at which the form's expectation over the space's noise
    (each group's ratio ``N(u, σ²)`` truncated to ``[0, R]``, its count and padded count by the rounding rule, groups
    independent) equals the target (bisection). The same centre is used by every sampler of the space."""
    from nps.kernels.complexity import expected_padded_form, unit_table  # numba: only when a space is computed

    table, _ = unit_table(table)
    (form, base), _ = target_form(table, space.target)
    if not form.padded or space.sigma <= 0:
        return uniform_ratio(table, space.target, space.value)
    c = np.asarray(table.channels, dtype=np.int64)
    arrays = form.arrays()[1:] + form.pad_arrays()
    key = (b"".join(a.tobytes() for a in (c,) + arrays), form.const, base, space.value, space.sigma, space.R)
    if key in _CENTRES:  # a sampler asks once to check the space and once to draw it (and mCB's probe again)
        return _CENTRES[key]
    lo, hi = 0.0, 1.0 - 0.5 / c.min()
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if expected_padded_form(mid, space.sigma, space.R, c, form.const, *arrays) / base > space.value:
            lo = mid
        else:
            hi = mid
    if len(_CENTRES) >= 256:
        _CENTRES.pop(next(iter(_CENTRES)))
    _CENTRES[key] = 0.5 * (lo + hi)
    return _CENTRES[key]


def uniform_baseline(table, target: str, value: float, R: float = DEFAULT_R) -> tuple[float, np.ndarray, float]:
    """``(ratio, keep, achieved)``: the uniform pruning ratio in [0, R] whose integer counts come closest to the
    target, its unit counts and the relative complexity they give.

    Every group's count is a step function of the ratio, so the target, a monotone function of them, takes
    finitely many values: one per interval between the ratios where some count steps. The ratio returned is the
    middle of the best interval (any ratio in it gives the same subnetwork).
    """
    from nps.kernels.complexity import keep_from_recipe, unit_table  # numba: only when a space is computed

    table, _ = unit_table(table)
    (form, base), _ = target_form(table, target)
    c = np.asarray(table.channels, dtype=np.float64)
    if c.sum() > _STEPS_MAX:  # a weight table: millions of steps; bisection on the ratio instead
        return _uniform_by_bisection(form, base, table.channels, value, R)
    # count k of a group steps where (1 - r)·c = k - 1/2, i.e. at r = 1 - (k - 1/2)/c
    steps = np.concatenate([1.0 - (np.arange(1, int(ci) + 1) - 0.5) / ci for ci in c])
    edges = np.unique(np.clip(np.concatenate([[0.0, R], steps]), 0.0, R))
    mids = 0.5 * (edges[:-1] + edges[1:]) if edges.size > 1 else edges
    keeps = keep_from_recipe(np.repeat(mids[:, None], len(c), axis=1), table.channels)
    achieved = form(keeps) / base
    best = int(np.argmin(np.abs(achieved - value)))
    return float(mids[best]), keeps[best], float(achieved[best])


_STEPS_MAX = 200_000  # above this many count steps, uniform_baseline bisects instead of listing them


def _uniform_by_bisection(form, base, channels, value: float, R: float) -> tuple[float, np.ndarray, float]:
    """``uniform_baseline`` for tables with very many units (weights): the achieved complexity is monotone
    non-increasing in the ratio, so bisect to the step where it crosses ``value`` and take the closer side."""
    from nps.kernels.complexity import keep_from_recipe

    def at(r: float):
        keep = keep_from_recipe(np.full(len(channels), r), channels)
        return keep, float(form(keep[None])[0]) / base

    lo, hi = 0.0, float(R)
    if at(hi)[1] >= value:
        lo = hi
    for _ in range(64):
        if hi - lo < 1e-12:
            break
        mid = 0.5 * (lo + hi)
        if at(mid)[1] >= value:
            lo = mid
        else:
            hi = mid
    (k_lo, a_lo), (k_hi, a_hi) = at(lo), at(hi)
    return (lo, k_lo, a_lo) if abs(a_lo - value) <= abs(a_hi - value) else (hi, k_hi, a_hi)


def reachable_range(table, target: str, R: float) -> tuple[float, float]:
    """Smallest and largest relative complexity any recipe in ``[0, R]^G`` reaches (forms are monotone)."""
    from nps.kernels.complexity import keep_from_recipe, unit_table  # numba: only when a space is computed

    table, _ = unit_table(table)
    (form, base), _ = target_form(table, target)
    c = np.asarray(table.channels)
    low = form(keep_from_recipe(np.full(len(c), R), c)) / base
    return float(low), 1.0


def check_feasible(table, space: Space) -> None:
    """Fail fast, naming the constraint and the reachable range, when the target cannot be met with this R.

    A group too narrow for R (``(1 - R)·c < 1/2`` units) simply keeps its smallest count (one unit) from some ratio
    below R on: the rule's ``max(1, ·)``."""
    low, high = reachable_range(table, space.target, space.R)
    if space.value + space.delta < low:
        hint = " (use mode 'all' to prune the stem and residual channels too)" if table.mode == "internal" else ""
        raise SamplerError(f"{space.target}={space.value:g} is out of reach for {table.model} in mode "
                           f"'{table.mode}' with R={space.R}: reachable {space.target} is [{low:.4f}, {high:.4f}]"
                           f"{hint}")
    if space.kind != "uniform":
        u = space_center(table, space)
        if u > space.R:
            raise SamplerError(f"{space.target}={space.value:g} needs a uniform ratio of {u:.3f} > R={space.R}; "
                               "raise R")
        if space.pruning == "weights" and space.sigma > 0:
            # every one of G layers must stay below R: with u near R that is nearly never (a weight table has
            # many layers and linear forms, so u is large where filters' would be small)
            from math import erf, sqrt

            p_all = (0.5 * (1.0 + erf((space.R - u) / (space.sigma * sqrt(2.0))))) ** len(table.channels)
            if p_all < 1e-3:
                raise SamplerError(f"{space.name} at {space.target}={space.value:g} is nearly empty: the uniform "
                                   f"sparsity is {u:.3f} and all {len(table.channels)} layers must stay below "
                                   f"R={space.R} (chance {p_all:.1e} per draw); raise R or the target, or use a "
                                   "smaller sigma")


def describe(space: Space) -> str:
    """One line for logs and summaries."""
    parts = [f"{space.name}: {space.target}={space.value:g}±{space.delta:g}", f"R={space.R:g}"]
    if space.sigma:
        parts.append(f"σ={space.sigma:g}")
    if space.std_band:
        parts.append(f"std(r)∈[{space.std_band[0]:.4g}, {space.std_band[1]:.4g}]")
    if space.mcb_band:
        parts.append(f"mCB∈[{space.mcb_band[0]:g}, {space.mcb_band[1]:g}]")
    return ", ".join(parts)
