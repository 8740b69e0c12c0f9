"""Reference networks beside the population: a pruned larger model against a smaller model of its family.

An experiment may name ``[[references]]``: networks trained like the base (``[base]``) on the same data and
evaluated on the same validation images, stored as ``/references/<model>`` (top-1, top-5, FLOPs, params and their
ratios to the base network's, training seconds). This module puts each next to the population at its FLOPs: the
regime whose target is closest to the reference's c_flops (or c_params), and per space of that regime:

- ``beats``: the fraction of the space's subnetworks whose top-1 is higher than the reference's, with a bootstrap
  interval (the space's rows resampled; the reference is one trained network, a fixed value);
- the space's best and median top-1, and the mean accuracy drop with its bootstrap interval (from the regime's
  summary).

``cost`` gives the training seconds of the base network, of each space's population (the sum of its rows'
``train_s``) and of each reference: what each answer cost.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from nps.pipeline.results.analysis import beats_baseline


def _nearest_regimes(regimes: list[dict], c_flops: float, c_params: float) -> list[dict]:
    """The regimes whose target is closest to the reference's (one per kind of pruning at that target)."""
    gaps = []
    for reg in regimes:
        value = c_flops if reg["target"] == "c_flops" else c_params
        if reg["value"] is None or not math.isfinite(value):
            continue
        gaps.append((abs(value - reg["value"]), reg))
    if not gaps:
        return []
    best = min(g for g, _ in gaps)
    return [reg for g, reg in gaps if g == best]


def compare(references: dict[str, dict], pops, regimes: list[dict], base_top1: float, *, n_boot: int,
            seed: int, band) -> list[dict]:
    """One entry per reference: its metrics and, per space of the regime nearest its FLOPs, how the pruned
    subnetworks compare (see the module docstring)."""
    out = []
    by_group = {p.group: p for p in pops}
    for i, (name, ref) in enumerate(sorted(references.items())):
        entry: dict[str, Any] = {"model": str(ref.get("model", name))}
        for key in ("top1", "top5", "flops", "params", "c_flops", "c_params", "train_s", "error"):
            if key in ref:
                entry[key] = ref[key]
        top1 = float(ref.get("top1", math.nan))
        entry["acc_drop"] = base_top1 - top1 if math.isfinite(top1) else math.nan
        regs = _nearest_regimes(regimes, float(ref.get("c_flops", math.nan)), float(ref.get("c_params", math.nan)))
        entry["regime"] = regs[0]["key"] if regs else None
        entry["spaces"] = {}
        if not regs or not math.isfinite(top1):
            out.append(entry)
            continue
        for s in (s for reg in regs for s in reg["spaces"]):
            pop = by_group.get(s["group"])
            if pop is None or not pop.n:
                continue
            rng = np.random.default_rng([seed, i, len(entry["spaces"])])
            # a subnetwork beats the reference when its drop is below the reference's (same base, same images)
            beats = beats_baseline(pop.acc_drop, float(entry["acc_drop"]), n_boot, rng, band)
            entry["spaces"][s["space"]] = {
                "n": int(pop.n), "beats": beats, "best_top1": float(np.max(pop.top1)),
                "median_top1": float(np.median(pop.top1)), "mean_drop": s["drop"]["mean"],
                "mean_drop_ci": s["drop"]["mean_ci"], "median_c_flops": float(np.median(pop.c_flops)),
            }
        out.append(entry)
    return out


def cost(reader, attrs) -> dict:
    """Training seconds: the base network, each space's population (sum of its rows), each reference."""
    spaces = {}
    for name in reader.spaces():
        t = np.asarray(reader.read(name, ["train_s"])["train_s"], dtype=np.float64)
        spaces[name] = float(np.nansum(t))
    refs = {name: float(r.get("train_s", math.nan)) for name, r in reader.references().items()}
    return {"base_train_s": float(attrs.get("base_train_s", math.nan)), "spaces_train_s": spaces,
            "population_train_s": float(sum(spaces.values())), "references_train_s": refs}
