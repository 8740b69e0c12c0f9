"""Reference networks beside the population: a pruned larger model against a smaller model of its family.

An experiment may name ``[[references]]``: networks trained like the base (``[base]``) on the same data and
evaluated on the same validation images, stored as ``/references/<model>`` (top-1, top-5, FLOPs, params and their
ratios to the base network's, training seconds). This module puts each next to the population at its FLOPs: the
regime whose target is closest to the reference's c_flops (or c_params), and per space of that regime:

A reference may be trained from several seeds (``[[references]] seeds``, stored as ``model``, ``model#1`` ...): it is
compared by its mean top-1 over them, its values listed (too few for an interval of their own). Per space:

- ``beats``: the fraction of the space's subnetworks whose top-1 is higher than the reference's mean, with Wilson's
  interval from 10 rows on;
- ``gain``: the space's mean top-1 minus the reference's, with a bootstrap interval from 10 rows on that resamples
  the subnetworks and the reference's seeds independently (:func:`gain_interval`), and ``best_gain``, its best
  subnetwork's top-1 minus the reference's (a value: a maximum has no honest bootstrap);
- the space's best and median top-1, and the mean accuracy drop with its bootstrap interval (from the regime's
  summary).

``cost`` gives the training seconds of the base network and of each reference, and per space its rows' ``train_s``
(median, largest): a row's is its cohort's wall time, so a space's cost (its cohorts, each once) comes from the
run's log (``tools/study_cost.py``), not from summing rows.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from nps.pipeline.results.analysis import beats_baseline
from nps.pipeline.results.stats import MIN_INTERVAL_N, bootstrap_weights


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


def _trainings(references: dict[str, dict]) -> dict[str, list[dict]]:
    """The reference trainings grouped by architecture (``model``): one list per reference, its seeds in turn."""
    by_model: dict[str, list[dict]] = {}
    for name, ref in sorted(references.items()):
        by_model.setdefault(str(ref.get("model", name)), []).append(dict(ref, name=name))
    return by_model


def gain_interval(top1, ref_top1, n_boot: int, rng: np.random.Generator, band) -> list[float]:
    """Bootstrap interval of mean(``top1``) - mean(``ref_top1``): the subnetworks and the reference's seeds
    resampled independently, so the interval carries both the population's spread and the reference's own
    training noise (with one seed, only the first)."""
    a, b = np.asarray(top1, dtype=np.float64), np.asarray(ref_top1, dtype=np.float64)
    gains = bootstrap_weights(a.size, n_boot, rng) @ a / a.size - bootstrap_weights(b.size, n_boot, rng) @ b / b.size
    lo, hi = np.percentile(gains, band)
    return [float(lo), float(hi)]


def compare(references: dict[str, dict], pops, regimes: list[dict], base_top1: float, *, n_boot: int,
            seed: int, band) -> list[dict]:
    """One entry per reference network (its trainings over seeds together): its metrics and, per space of the
    regime nearest its FLOPs, how the pruned subnetworks compare (see the module docstring)."""
    out = []
    by_group = {p.group: p for p in pops}
    for i, (model, trainings) in enumerate(_trainings(references).items()):
        first = trainings[0]
        entry: dict[str, Any] = {"model": model}
        for key in ("flops", "params", "c_flops", "c_params"):
            if key in first:
                entry[key] = first[key]
        done = [t for t in trainings if "error" not in t and math.isfinite(float(t.get("top1", math.nan)))]
        errors = [str(t["error"]) for t in trainings if "error" in t]
        if errors:
            entry["error"] = errors[0]
        entry["trainings"] = [{k: t.get(k) for k in ("name", "seed", "top1", "top5", "train_s", "error") if k in t}
                              for t in trainings]
        values = np.asarray([float(t["top1"]) for t in done], dtype=np.float64)
        entry["seeds"] = int(values.size)
        top1 = float(values.mean()) if values.size else math.nan
        if values.size:
            entry["top1"] = top1  # the mean over its seeds: the number it is compared by
            entry["top1_values"] = [float(v) for v in values]
            entry["top1_range"] = [float(values.min()), float(values.max())]
            entry["top5"] = float(np.mean([float(t.get("top5", math.nan)) for t in done]))
            entry["train_s"] = float(np.mean([float(t.get("train_s", math.nan)) for t in done]))
        entry["acc_drop"] = base_top1 - top1 if math.isfinite(top1) else math.nan
        regs = _nearest_regimes(regimes, float(entry.get("c_flops", math.nan)), float(entry.get("c_params", math.nan)))
        entry["regime"] = regs[0]["key"] if regs else None
        entry["spaces"] = {}
        if not regs or not values.size:
            out.append(entry)
            continue
        for s in (s for reg in regs for s in reg["spaces"]):
            pop = by_group.get(s["group"])
            if pop is None or not pop.n:
                continue
            rng = np.random.default_rng([seed, i, len(entry["spaces"])])
            # a subnetwork beats the reference when its drop is below the reference's (same base, same images)
            beats = beats_baseline(pop.acc_drop, float(entry["acc_drop"]), n_boot, rng, band)
            gain = float(np.mean(pop.top1)) - top1
            entry["spaces"][s["space"]] = {
                "n": int(pop.n), "beats": beats, "best_top1": float(np.max(pop.top1)),
                "median_top1": float(np.median(pop.top1)), "mean_drop": s["drop"]["mean"],
                "mean_drop_ci": s["drop"]["mean_ci"], "median_c_flops": float(np.median(pop.c_flops)),
                # mean top-1 of the space minus the reference's mean over seeds, with an interval from 10 rows on
                "gain": gain, "gain_ci": (gain_interval(pop.top1, values, n_boot, rng, band)
                                          if pop.n >= MIN_INTERVAL_N else None),
                "best_gain": float(np.max(pop.top1)) - top1,
            }
        out.append(entry)
    return out


def cost(reader, attrs) -> dict:
    """Training seconds: the base network, each reference training, and per space its finished rows' ``train_s``
    (median and largest). A row's ``train_s`` is the wall time of the cohort it trained in, shared by the cohort's
    members, so summing a space's rows would overstate its cost as many times as its cohorts had members; what a
    space cost (its cohorts, each once) is in the run's log: ``tools/study_cost.py RUN_DIR``."""
    spaces = {}
    for name in reader.spaces():
        t = np.asarray(reader.read(name, ["train_s"])["train_s"], dtype=np.float64)
        t = t[np.isfinite(t) & (t > 0)]
        spaces[name] = {"rows": int(t.size), "row_train_s_median": float(np.median(t)) if t.size else None,
                        "row_train_s_max": float(np.max(t)) if t.size else None}
    refs = {name: float(r.get("train_s", math.nan)) for name, r in reader.references().items()}  # per training
    return {"base_train_s": float(attrs.get("base_train_s", math.nan)), "spaces": spaces,
            "references_train_s": refs,
            "note": "a row's train_s is its cohort's wall time (shared by the members): a space's cost is its "
                    "cohorts' time, each once (tools/study_cost.py RUN_DIR reads it from the run's log.jsonl)"}
