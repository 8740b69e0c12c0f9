"""The paper's §2 studies (Fig. 1): accuracy drop against uniform pruning ratios, per filter-importance criterion,
per fine-tuning length and per retraining method.

A **ratio space** (``[[spaces]] name = "ratios"``, ``ratios = [0.25, 0.5, 0.75, 0.9]``) holds rows whose recipe is one
uniform ratio in every group; its group attributes say how its rows were pruned and retrained (``criterion``,
``method``, ``epochs``), and an experiment expands lists of those into one space each. This module turns the finished
rows of such spaces into the three panels of Fig. 1, as plain data (``summarize``) and as a figure (``draw``):

- **criteria**: drop against the ratio, one line per criterion (the other settings at their most common values);
- **epochs**: drop against the fine-tuning epochs, one line per ratio;
- **methods**: drop against the epochs, one line per retraining method (fine-tuning, rewinding, from scratch), at
  the ratio with the most methods (the paper: 0.75).

Each point is the mean drop of the rows with those settings (several rows, or seeds, per ratio give a mean and its
spread). A panel is drawn when its varied setting takes at least two values.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

from nps.kernels.spaces import RATIOS

_PREFERRED = {"criterion": "l2", "method": "finetune"}  # the paper's standard setting wins ties


def ratio_points(populations: Sequence) -> list[dict]:
    """One point per (criterion, method, epochs, ratio): the finished rows' drops and their mean."""
    cells: dict[tuple, list] = {}
    for p in populations:
        if p.space != RATIOS or not p.n:
            continue
        ratios = np.round(np.asarray(p.recipe, dtype=np.float64)[:, 0], 6)
        for ratio, drop, row in zip(ratios, np.asarray(p.acc_drop, dtype=np.float64), p.row):
            key = (p.criterion, p.method, int(p.epochs), float(ratio))
            cells.setdefault(key, []).append((float(drop), p.group, int(row)))
    points = []
    for (criterion, method, epochs, ratio), items in sorted(cells.items()):
        drops = [d for d, _, _ in items]
        points.append({"criterion": criterion, "method": method, "epochs": epochs, "ratio": ratio,
                       "drop_mean": float(np.mean(drops)), "drop_std": float(np.std(drops)), "n": len(drops),
                       "drops": drops, "rows": [[g, r] for _, g, r in items]})
    return points


def _mode(points: list[dict], key: str):
    """The most common value of ``key`` (the paper's standard setting, then the largest, on ties)."""
    counts = Counter(p[key] for p in points)
    best = max(counts.values())
    tied = [v for v, c in counts.items() if c == best]
    if _PREFERRED.get(key) in tied:
        return _PREFERRED[key]
    return max(tied)


def _fix(points: list[dict], keys: Sequence[str]) -> tuple[list[dict], dict]:
    """The points with each of ``keys`` at its most common value (in turn), and those values."""
    chosen = {}
    for key in keys:
        chosen[key] = _mode(points, key)
        points = [p for p in points if p[key] == chosen[key]]
    return points, chosen


def _panel(pool: list[dict], name: str, x: str, line: str, fixed: dict) -> dict:
    lines = {}
    for value in sorted({p[line] for p in pool}):
        pts = sorted((p for p in pool if p[line] == value), key=lambda p: p[x])
        lines[f"{value:g}" if isinstance(value, float) else str(value)] = {
            "x": [p[x] for p in pts], "drop_mean": [p["drop_mean"] for p in pts],
            "drop_std": [p["drop_std"] for p in pts], "n": [p["n"] for p in pts]}
    return {"name": name, "x": x, "line": line, "fixed": fixed, "lines": lines}


def summarize(populations: Sequence) -> dict | None:
    """The Fig. 1 data of a results file's ratio spaces (None when it has none with finished rows)."""
    points = ratio_points(populations)
    if not points:
        return None
    panels = []
    pool, fixed = _fix(points, ("method", "epochs"))
    if len({p["ratio"] for p in pool}) >= 2:
        panels.append(_panel(pool, "criteria", "ratio", "criterion", fixed))
    pool, fixed = _fix(points, ("criterion", "method"))
    if len({p["epochs"] for p in pool}) >= 2:
        panels.append(_panel(pool, "epochs", "epochs", "ratio", fixed))
    methods = {r: len({p["method"] for p in points if p["ratio"] == r}) for r in {p["ratio"] for p in points}}
    if max(methods.values()) >= 2:
        ratio = max(r for r, count in methods.items() if count == max(methods.values()))
        pool, fixed = _fix([p for p in points if p["ratio"] == ratio], ("criterion",))
        panels.append(_panel(pool, "methods", "epochs", "method", {**fixed, "ratio": ratio}))
    return {"points": points, "panels": panels}
