"""Padding waste of fused cohorts: how much the driver's cohort forming saves against cohorts in sampling order.

A fused cohort computes every member at the cohort's widest width of every group, so its FLOPs are
``K × FLOPs(padded keep)`` against the members' own sum; its waste (``nps.pipeline.run.forming.waste``) is that
ratio minus 1. For each model and space this samples ``--n`` recipes at ``c_flops`` (seed ``--seed``, the default
tolerance), then forms cohorts of ``--k`` as the driver does: ``forming.similar_rows`` on the pending rows (in line
order), those rows removed, again until none is left, once per ``--thresholds`` value (``inf``: every cohort full;
0.5: the default ``retrain.fuse_max_waste``, which cuts a cohort short).

One JSON line per (model, space, threshold)::

    {"bench": "waste", "model", "space", "max_waste", "forming": "greedy",
     "cohorts", "full_cohorts", "mean_size", "median_waste", "mean_waste", "p90_waste",   # over FULL cohorts
     "median_waste_all", "p90_waste_all", "min_size",   # over ALL cohorts (a threshold can leave none full)
     "pooled_waste",                        # all cohorts: sum of fused FLOPs / sum of members' FLOPs - 1
     "baseline": {...},                     # the same figures for cohorts in sampling order (chunks of k: no forming)
     "baseline_cut": {...},                 # sampling order, each cohort cut where the threshold would cut it
     "alternatives": {name: {...}}, ...}    # max_waste = inf only: other forming strategies (below)

Alternatives (all full cohorts, for comparison; none is used by the driver):

- ``sort_flops``: rows sorted by their own FLOPs, then chunks of k (a 1-D key);
- ``sort_pc1``: rows sorted by the first principal component of their relative widths ``keep / channels``, each
  group weighted by the square root of its share of the base network's FLOPs, then chunks of k (a 1-D key);
- ``bisect``: recursive halving of the rows at the median of that weighted first principal component (recomputed in
  each half) until k rows are left (a k-d split);
- ``greedy_swaps``: the greedy cohorts, then local search: swap two rows of different cohorts whenever that lowers
  the two cohorts' fused FLOPs, until no swap helps (or ``--swap-sweeps``).

usage: python tools/bench_waste.py [--n 512] [--k 16] [--c-flops 0.1] [--thresholds inf,0.5] > waste.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("NUMBA_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

from nps.kernels.samplers import sample_space
from nps.kernels.spaces import parse_space
from nps.pipeline.network.layer_table import build_layer_table
from nps.pipeline.run import forming

MODELS = {"resnet20": (32, 10), "resnet50": (224, 1000)}  # resolution, classes
SPACES = ["std-0.01", "std-0.05", "std-0.1", "mcb-0.9-1.1"]


# --------------------------------------------------------------------------------------------------------------------
# Forming strategies: each returns a list of index arrays (cohorts) into ``keeps``.


def greedy(table, keeps, k, max_waste):
    """The driver's forming (``forming.form_cohorts``)."""
    return forming.form_cohorts(table, keeps, k, max_waste)


def in_order(table, keeps, k, max_waste):
    """No forming: rows in sampling order, k at a time; with a finite threshold each cohort is cut before the first
    row that would take its waste past it (what the threshold alone would do)."""
    if not np.isfinite(max_waste):
        return chunks(np.arange(len(keeps)), k)
    cohorts, start = [], 0
    while start < len(keeps):
        end = start + 1
        while end < min(start + k, len(keeps)) and forming.waste(table, keeps[start:end + 1]) <= max_waste:
            end += 1
        cohorts.append(np.arange(start, end))
        start = end
    return cohorts


def chunks(order, k):
    return [np.asarray(order[i:i + k]) for i in range(0, len(order), k)]


def flops_weights(table) -> np.ndarray:
    """Per group: sqrt of its share of the FLOPs the base network loses when that group alone is halved."""
    full = np.asarray(table.channels, dtype=np.int64)
    base = float(table.flops_of(full[None])[0])
    blocks = np.asarray(table.granularity, dtype=np.int64)
    loss = []
    for i in range(len(full)):
        half = full.copy()
        half[i] = max(blocks[i], (full[i] // 2) // blocks[i] * blocks[i])
        loss.append(base - float(table.flops_of(half[None])[0]))
    loss = np.asarray(loss)
    return np.sqrt(loss / loss.sum())


def weighted_pc1(table, keeps, weights) -> np.ndarray:
    x = keeps / np.asarray(table.channels, dtype=np.float64)
    x = (x - x.mean(axis=0)) * weights
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[0]


def sort_flops(table, keeps, k, weights):
    return chunks(np.argsort(table.flops_of(keeps), kind="stable"), k)


def sort_pc1(table, keeps, k, weights):
    return chunks(np.argsort(weighted_pc1(table, keeps, weights), kind="stable"), k)


def bisect(table, keeps, k, weights, rows=None):
    rows = np.arange(len(keeps)) if rows is None else rows
    if len(rows) <= k:
        return [rows]
    order = rows[np.argsort(weighted_pc1(table, keeps[rows], weights), kind="stable")]
    half = max(k, (len(rows) // k // 2) * k)  # both halves whole cohorts where the count allows
    return bisect(table, keeps, k, weights, order[:half]) + bisect(table, keeps, k, weights, order[half:])


def swaps(table, keeps, cohorts, sweeps):
    """Local search on the cohorts' fused FLOPs: swap row i (cohort A) with row j (cohort B) when that lowers
    ``|A|·F(widest A) + |B|·F(widest B)``; best swap per row, rows in turn, until a sweep changes nothing."""
    blocks = np.asarray(table.granularity, dtype=np.int64)
    units = keeps // blocks
    n = len(keeps)
    label = np.empty(n, dtype=np.int64)
    for c, rows in enumerate(cohorts):
        label[rows] = c
    size = np.bincount(label, minlength=len(cohorts)).astype(np.float64)

    def flops(u):
        return table.flops_of(np.atleast_2d(u) * blocks).astype(np.float64)

    def stats(c):  # widest, second widest and how many rows are widest, per group
        u = np.sort(units[label == c], axis=0)
        top1 = u[-1]
        top2 = u[-2] if len(u) > 1 else u[-1]
        return top1, top2, (u == top1).sum(axis=0)

    st = [stats(c) for c in range(len(cohorts))]
    top1 = np.stack([s[0] for s in st])
    top2 = np.stack([s[1] for s in st])
    count = np.stack([s[2] for s in st])
    cost = size * flops(top1)
    for _ in range(sweeps):
        moved = False
        for i in range(n):
            a = label[i]
            others = np.flatnonzero(label != a)
            if not len(others):
                break
            b = label[others]

            def without(c, r):  # widest of cohort c without row r
                alone = (units[r] == top1[c]) & (count[c] == 1)
                return np.where(alone, top2[c], top1[c])

            a_without = without(np.full(1, a), np.full(1, i))[0]
            new_a = np.maximum(a_without[None], units[others])
            new_b = np.maximum(without(b, others), units[i][None])
            gain = cost[a] + cost[b] - size[a] * flops(new_a) - size[b] * flops(new_b)
            best = int(np.argmax(gain))
            if gain[best] <= 1e-9 * cost[a]:
                continue
            j = int(others[best])
            label[i], label[j] = label[j], label[i]
            for c in (a, label[i]):
                top1[c], top2[c], count[c] = stats(c)
                cost[c] = size[c] * flops(top1[c])[0]
            moved = True
        if not moved:
            break
    return [np.flatnonzero(label == c) for c in range(len(cohorts))]


# --------------------------------------------------------------------------------------------------------------------


def summary(table, keeps, cohorts, k, seconds) -> dict:
    wastes = np.array([forming.waste(table, keeps[c]) for c in cohorts])
    sizes = np.array([len(c) for c in cohorts])
    full = wastes[sizes == k]
    out = {"cohorts": len(cohorts), "full_cohorts": int((sizes == k).sum()), "mean_size": round(float(sizes.mean()), 2)}
    if len(full):
        out.update(median_waste=round(float(np.median(full)), 4), mean_waste=round(float(full.mean()), 4),
                   p90_waste=round(float(np.percentile(full, 90)), 4))
    out.update(median_waste_all=round(float(np.median(wastes)), 4),
               p90_waste_all=round(float(np.percentile(wastes, 90)), 4), min_size=int(sizes.min()))
    out.update(pooled_waste=round(forming.pooled_waste(table, keeps, cohorts), 4),
               seconds=round(seconds, 3))
    return out


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--spaces", default=",".join(SPACES))
    ap.add_argument("--c-flops", type=float, default=0.1)
    ap.add_argument("--n", type=int, default=512, help="recipes per space (the driver's pool is 512 pending rows)")
    ap.add_argument("--k", type=int, default=16, help="cohort size")
    ap.add_argument("--thresholds", default="inf,0.5", help="max_waste values (inf: full cohorts)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--swap-sweeps", type=int, default=5, help="greedy_swaps: at most this many sweeps")
    args = ap.parse_args(argv)

    for model in args.models.split(","):
        resolution, classes = MODELS[model]
        table = build_layer_table(model, "all", resolution, classes, 3)
        weights = flops_weights(table)
        for name in args.spaces.split(","):
            space = parse_space(name, "c_flops", args.c_flops)
            sample = sample_space(table, space, args.n, seed=args.seed)
            keeps = np.asarray(sample.keep, dtype=np.int64)
            head = {"bench": "waste", "model": model, "resolution": resolution, "classes": classes, "space": name,
                    "c_flops": args.c_flops, "delta": space.delta,
                    "mean_c_flops": round(float(sample.c_flops.mean()), 4),
                    "n": len(keeps), "k": args.k, "seed": args.seed}
            for threshold in (float(v) for v in args.thresholds.split(",")):
                cohorts, s = timed(greedy, table, keeps, args.k, threshold)
                line = {**head, "max_waste": threshold if np.isfinite(threshold) else "inf", "forming": "greedy",
                        **summary(table, keeps, cohorts, args.k, s),
                        "baseline": summary(table, keeps, chunks(np.arange(len(keeps)), args.k), args.k, 0.0)}
                if np.isfinite(threshold):
                    cut, s_cut = timed(in_order, table, keeps, args.k, threshold)
                    line["baseline_cut"] = summary(table, keeps, cut, args.k, s_cut)
                else:
                    alt = {}
                    for label, fn in (("sort_flops", sort_flops), ("sort_pc1", sort_pc1), ("bisect", bisect)):
                        c, s_alt = timed(fn, table, keeps, args.k, weights)
                        alt[label] = summary(table, keeps, c, args.k, s_alt)
                    c, s_alt = timed(swaps, table, keeps, cohorts, args.swap_sweeps)
                    alt["greedy_swaps"] = summary(table, keeps, c, args.k, s + s_alt)
                    line["alternatives"] = alt
                print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
