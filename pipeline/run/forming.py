"""Forming fused cohorts: rows of similar keep vectors together, so that padding every group to the cohort's widest
member wastes little.

A fused cohort (:mod:`nps.pipeline.training.fuse`) computes each member at the cohort's widest width of every group
(:func:`padded_keeps`), so its FLOPs are K × FLOPs(padded keep) against the members' own sum: its **padding waste**
(:func:`waste`, 0 when the members are alike). :func:`similar_rows` picks a cohort from the pending rows of a space:
the first in line, then, one at a time, the row that adds the least padded FLOPs, while the waste stays within the
threshold (``retrain.fuse_max_waste``): a cohort that would exceed it is cut short. Plain numpy, no torch.
"""
from __future__ import annotations

import numpy as np

POOL = 512  # pending rows considered for one cohort (the first in line): bounds the driver's work per dispatch


def padded_keeps(table, keeps) -> np.ndarray:
    """The keep vector a fused cohort computes for each member: every group at the cohort's widest (a group kept in
    blocks at the widest block, times its blocks)."""
    keeps = np.asarray(keeps, dtype=np.int64)
    blocks = np.asarray(getattr(table, "granularity", np.ones(keeps.shape[1])), dtype=np.int64)
    return (keeps // blocks).max(axis=0) * blocks


def waste(table, keeps) -> float:
    """A fused cohort's padding waste: its FLOPs over the sum of its members' FLOPs, minus 1."""
    keeps = np.asarray(keeps, dtype=np.int64)
    fused = len(keeps) * float(table.flops_of(padded_keeps(table, keeps)[None])[0])
    return fused / float(table.flops_of(keeps).sum()) - 1.0


def cohort_rows(kind, table, keeps: np.ndarray, k: int, max_waste: float) -> list[int]:
    """The rows of a cohort that will be fused, of a space of pruning ``kind``: :func:`similar_rows`, or for a kind
    that is never fused (weights: every member keeps every channel) the first ``k`` in line order."""
    if not kind.fusable:
        return list(range(min(k, len(keeps))))
    return similar_rows(table, keeps, k, max_waste)


def similar_rows(table, keeps: np.ndarray, k: int, max_waste: float) -> list[int]:
    """Positions (into ``keeps``, pending rows in line order) of a cohort of at most ``k`` rows: the first, then
    greedily the row adding the least padded FLOPs, while the cohort's waste stays within ``max_waste``."""
    keeps = np.asarray(keeps, dtype=np.int64)[:POOL]
    flops = table.flops_of(keeps).astype(np.float64)
    blocks = np.asarray(getattr(table, "granularity", np.ones(keeps.shape[1])), dtype=np.int64)
    units = keeps // blocks
    chosen = [0]
    widest = units[0].copy()
    total = flops[0]
    left = np.ones(len(keeps), dtype=bool)
    left[0] = False
    while len(chosen) < k and left.any():
        candidates = np.flatnonzero(left)
        padded = np.maximum(widest[None, :], units[candidates]) * blocks
        cost = (len(chosen) + 1) * table.flops_of(padded).astype(np.float64)
        best = int(np.argmin(cost - flops[candidates]))
        row = int(candidates[best])
        if cost[best] / (total + flops[row]) - 1.0 > max_waste:
            break
        chosen.append(row)
        left[row] = False
        widest = np.maximum(widest, units[row])
        total += flops[row]
    return chosen


def form_cohorts(table, keeps: np.ndarray, k: int, max_waste: float) -> list[np.ndarray]:
    """Every row of ``keeps`` in cohorts as the driver forms them one dispatch after another: :func:`similar_rows`
    on the rows still pending (in line order), those rows removed, until none is left (tools/bench_waste.py)."""
    pending = np.arange(len(keeps))
    cohorts = []
    while len(pending):
        pos = similar_rows(table, np.asarray(keeps)[pending], k, max_waste)
        cohorts.append(pending[pos])
        pending = np.delete(pending, pos)
    return cohorts


def pooled_waste(table, keeps: np.ndarray, cohorts: list[np.ndarray]) -> float:
    """The padding waste of all ``cohorts`` together: their fused FLOPs over the rows' own FLOPs, minus 1."""
    keeps = np.asarray(keeps, dtype=np.int64)
    fused = sum(len(c) * float(table.flops_of(padded_keeps(table, keeps[c])[None])[0]) for c in cohorts)
    return fused / float(table.flops_of(keeps).sum()) - 1.0
