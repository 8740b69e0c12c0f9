"""The spaces an experiment runs: its ``[[spaces]]`` entries expanded into one planned space each.

An entry expands over its targets (``c_flops = [0.25, 0.1]``) and over the lists of its overrides
(``criterion = ["l1", "l2"]``, ``retrain.method = [...]``, ``retrain.epochs = [...]``): the cartesian product, one
space each, in file order. Three kinds of planned space:

- ``sampled``: a pruning space in a regime (``std-0.05@c_flops=0.25``), its recipes drawn by the samplers;
- ``ratios`` (``name = "ratios"``, ``ratios = [0.25, 0.5, 0.75, 0.9]``): the paper's §2 studies, every group at one
  uniform ratio, ``n`` rows per ratio (Fig. 1, :mod:`nps.pipeline.results.retraining_study`);
- ``baseline`` (``[experiment] baseline``, on by default): per regime of the sampled filter spaces, one row at the
  uniform ratio whose integer counts come closest to the target, trained like every other row (paper §3.1's
  reference). A regime's weight spaces get their own uniform baseline, ``weights:uniform`` (one sampled row), so
  that a weight space is never measured against a filter baseline.

Every planned space carries its :class:`~nps.pipeline.training.spec.SpaceSpec` (the experiment's ``[retrain]`` and
``model.criterion`` with this space's overrides), which is stored on its group in results.h5: the driver trains each
space by its own spec. Space keys name the overrides a space was given: ``std-0.05+criterion=l1@c_flops=0.25``,
``ratios+method=rewind+epochs=10``; spaces without overrides keep the plain key.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Any

from nps.kernels.spaces import RATIOS, TARGETS
from nps.pipeline.errors import NpsError
from nps.pipeline.network.pruning_kind import WEIGHTS
from nps.pipeline.training.spec import SpaceSpec

OVERRIDES = ("criterion", "method", "epochs", "distill")
# Criteria and methods whose rows differ by their seed: everything else trains the same recipe identically (the
# data order is the experiment's, not the row's), so a ratio space repeats rows only for these.
SEEDED_CRITERIA = ("random",)
SEEDED_METHODS = ("scratch",)


@dataclass(frozen=True)
class PlannedSpace:
    """One space of the experiment, as the driver creates it in results.h5."""

    index: int  # into config.spaces; for a baseline the first entry of its regime
    key: str  # its group name in results.h5
    kind: str  # "sampled", "ratios" or "baseline"
    spec: SpaceSpec
    n: int  # rows (a ratio space: rows per ratio)
    space: Any = None  # the sampler's Space (sampled)
    target: str = ""
    value: float = math.nan
    delta: float = math.nan
    R: float = math.nan
    ratios: tuple[float, ...] = ()
    overrides: dict = dataclasses.field(default_factory=dict)

    @property
    def rows(self) -> int:
        """How many subnetworks the space trains: ``n`` (a ratio space: ``n`` per ratio; a baseline: one)."""
        if self.kind == RATIOS:
            return self.n * len(self.ratios)
        return 1 if self.kind == "baseline" else self.n

    @property
    def label(self) -> str:
        """The overrides in words (``criterion=l1, epochs=10``): how the report tells such spaces apart."""
        return ", ".join(f"{k}={_text(self.overrides[k])}" for k in OVERRIDES if k in self.overrides)

    def attrs(self) -> dict:
        """What the space's group stores beside the sampler's attributes: its spec and its overrides."""
        out = {"stage": "sample", "n": int(self.n), **self.spec.attrs()}
        if self.overrides:
            out["overrides"] = self.label
        return out


def _text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)  # TOML's spelling: distill=true


def _suffix(overrides: dict) -> str:
    return "".join(f"+{k}={_text(overrides[k])}" for k in OVERRIDES if k in overrides)


def _choices(values: list, default) -> list:
    return list(values) if values else [default]


def expand(cfg) -> list[PlannedSpace]:
    """Every planned space of ``cfg`` in order: the entries (expanded), then one baseline per regime.

    Raises NpsError naming the key for a space name or a retraining override that cannot be used.
    """
    from nps.kernels.errors import SamplerError
    from nps.kernels.spaces import parse_space, space_key

    base_spec = SpaceSpec(cfg.retrain.spec(), cfg.model.criterion)
    out: list[PlannedSpace] = []
    for i, s in enumerate(cfg.spaces):
        key = f"spaces[{i}]"
        axes = {"criterion": s.criterion, "method": s.retrain.method, "epochs": s.retrain.epochs,
                "distill": s.retrain.distill}
        for combo in itertools.product(*(_choices(values, None) for values in axes.values())):
            overrides = {k: v for k, v in zip(axes, combo) if v is not None}  # the cartesian product, in file order
            retrain = dataclasses.replace(base_spec.retrain, **{k: v for k, v in overrides.items()
                                                               if k != "criterion"})
            retrain.check(f"{key}.retrain")  # e.g. a warm-up longer than an overridden epochs: an error
            spec = SpaceSpec(retrain, overrides.get("criterion") or base_spec.criterion)
            name = s.name + _suffix(overrides)
            if s.name == RATIOS:
                out.append(PlannedSpace(i, name, RATIOS, spec, s.n, ratios=tuple(s.ratios), overrides=overrides))
                continue
            target = _target(s)
            space_name = s.name
            if cfg.model.pruning == WEIGHTS.name and not space_name.startswith(WEIGHTS.prefix):
                space_name, name = WEIGHTS.space_name(space_name), WEIGHTS.space_name(name)
            for value in getattr(s, target):
                try:
                    space = parse_space(space_name, target, value, delta=s.delta, R=s.R, sigma=s.sigma or None)
                except SamplerError as exc:
                    raise NpsError(f"{key}.name: {exc}") from None
                out.append(PlannedSpace(i, space_key(name, target, value), "sampled", spec, s.n, space, target,
                                        float(value), s.delta, s.R, overrides=overrides))
    if cfg.experiment.baseline:
        out += baselines(out, base_spec)
    return out


def baselines(planned: list[PlannedSpace], spec: SpaceSpec) -> list[PlannedSpace]:
    """One uniform baseline per regime and kind of pruning: for filter spaces the ``baseline`` row (the uniform
    ratio nearest the target on integer channels), for weight spaces ``weights:uniform`` (one row, the same
    sparsity in every layer) unless the experiment already has it in that regime. Tolerance and R come from the
    first space of the regime; a kind is only ever compared with its own baseline."""
    from nps.kernels.spaces import BASELINE, parse_space, space_key
    from nps.pipeline.network.pruning_kind import FILTERS

    firsts: dict[tuple, PlannedSpace] = {}
    given = {p.key for p in planned}
    for p in planned:
        if p.kind == "sampled":
            firsts.setdefault((p.space.pruning, p.target, p.value), p)
    out = []
    for (kind, target, value), p in firsts.items():
        if kind == FILTERS.name:
            out.append(PlannedSpace(p.index, space_key(BASELINE, target, value), "baseline", spec, 1, target=target,
                                    value=value, delta=p.delta, R=p.R))
        elif space_key(WEIGHTS.baseline_space, target, value) not in given:
            space = parse_space(WEIGHTS.baseline_space, target, value, delta=p.delta, R=p.R)
            out.append(PlannedSpace(p.index, space.key, "sampled", spec, 1, space, target, float(value), p.delta,
                                    p.R))
    return out


def check(cfg) -> list[PlannedSpace]:
    """Reject impossible spaces (one line naming the key); returns the planned spaces."""
    from nps.pipeline.catalog import CRITERIA
    from nps.pipeline.training.spec import METHODS

    def need(ok: bool, key: str, problem: str) -> None:
        if not ok:
            raise NpsError(f"{key}: {problem}")

    need(bool(cfg.spaces), "spaces", "no [[spaces]] given: add at least one")
    for i, s in enumerate(cfg.spaces):
        key = f"spaces[{i}]"
        for c in s.criterion:
            need(c in CRITERIA, f"{key}.criterion", f"{c!r} is not one of {', '.join(CRITERIA)}")
        for m in s.retrain.method:
            need(m in METHODS, f"{key}.retrain.method", f"{m!r} is not one of {', '.join(METHODS)}")
        for e in s.retrain.epochs:
            need(e >= 1, f"{key}.retrain.epochs", f"must be >= 1, got {e}")
        for name, values in (("criterion", s.criterion), ("retrain.method", s.retrain.method),
                             ("retrain.epochs", s.retrain.epochs), ("retrain.distill", s.retrain.distill)):
            need(len(set(values)) == len(values), f"{key}.{name}", "a value is repeated")
        need(s.n >= 1, f"{key}.n", f"must be >= 1, got {s.n}")
        if s.name == RATIOS:
            need(cfg.model.pruning == "filters", f"{key}.name", "a ratio space prunes filters: model.pruning = "
                                                                "'weights' has no ratio spaces")
            need(bool(s.ratios), f"{key}.ratios", "a ratio space needs its uniform ratios, e.g. [0.25, 0.5, 0.75]")
            need(not s.c_flops and not s.c_params, f"{key}.c_flops",
                 "a ratio space has no target: its rows are the uniform ratios in `ratios`")
            for r in s.ratios:
                need(0 <= r < 1, f"{key}.ratios", f"{r:g} is not a pruning ratio in [0, 1)")
            need(len(set(s.ratios)) == len(s.ratios), f"{key}.ratios", "a ratio is repeated")
            seeded = any(c in SEEDED_CRITERIA for c in s.criterion or [cfg.model.criterion]) or \
                any(m in SEEDED_METHODS for m in s.retrain.method or [cfg.retrain.method])
            need(s.n == 1 or seeded, f"{key}.n",
                 f"{s.n} rows per ratio would be identical (same recipe, same data order, no per-row randomness); "
                 "set n = 1, or use criterion random or method scratch, whose rows differ by their seed")
            continue
        need(not s.ratios, f"{key}.ratios", f"only a space named {RATIOS!r} takes ratios")
        given = [t for t in TARGETS if getattr(s, t)]
        need(len(given) == 1, f"{key}.{given[0] if given else 'c_flops'}",
             f"give exactly one of c_flops, c_params and c_latency (got {' and '.join(given)})" if given
             else "give c_flops, c_params or c_latency")
        target = given[0]
        for v in getattr(s, target):
            need(0 < v <= 1, f"{key}.{target}", f"{v:g} is not a relative complexity in (0, 1]")
        need(len(set(getattr(s, target))) == len(getattr(s, target)), f"{key}.{target}", "a value is repeated")
        need(0 < s.delta < 0.5, f"{key}.delta", f"must be in (0, 0.5), got {s.delta}")
        need(0 < s.R < 1, f"{key}.R", f"must be in (0, 1), got {s.R}")
        need(0 <= s.sigma < 1, f"{key}.sigma", f"must be in [0, 1) (0: from the name), got {s.sigma}")
        need(s.max_seconds > 0, f"{key}.max_seconds", f"must be > 0, got {s.max_seconds}")
    planned = expand(cfg)
    seen: dict[str, str] = {}
    for p in planned:
        key = f"spaces[{p.index}]"
        if p.kind == "sampled" and p.space.deterministic:
            seeded = p.spec.criterion in SEEDED_CRITERIA or p.spec.retrain.method in SEEDED_METHODS
            need(p.n == 1 or seeded, f"{key}.n",
                 f"{p.space.name} is one recipe: {p.n} rows would be identical (same masks, same data order, no "
                 "per-row randomness); set n = 1")
        if p.kind != "baseline":
            need(p.key not in seen, key, f"{p.key} is already given by {seen.get(p.key)}")
        seen[p.key] = key
    t = cfg.two_stage
    if t.enabled:
        sampled = [p.n for p in planned if p.kind == "sampled"]
        need(bool(sampled), "two_stage.enabled", "two-stage retraining needs a sampled space (ratio spaces and "
                                                 "baselines have no top-k)")
        need(t.top_k <= min(sampled), "two_stage.top_k",
             f"{t.top_k} is more than the smallest space's n ({min(sampled)})")
    return planned


def _target(space) -> str:
    """The one target a ``[[spaces]]`` entry gives (checked before: exactly one)."""
    return next(t for t in TARGETS if getattr(space, t))
