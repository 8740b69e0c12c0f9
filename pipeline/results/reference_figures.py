"""The family comparison figure: the pruned larger model's populations next to reference networks at their FLOPs.

Left panels (one per regime that holds a reference): the accuracy-drop EDF of every space of that regime, with each
reference's drop as a vertical line (a space's curve left of the line at height F: a fraction F of its subnetworks
lose less accuracy than the reference has against the base). Right panel: top-1 against c_flops: each space's
winner in every regime (joined per space), every reference (a star, named), and the base network.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from nps.pipeline.results.figures import _DROP, _colors, _figure, _log_axis, log_wanted


def render_references(summary: dict, out_dir: str | Path) -> dict:
    """Draw ``references.png`` when the summary has trained references; returns ``{name: {"file", "caption"}}``."""
    refs = [r for r in summary.get("references") or [] if r.get("top1") is not None and r.get("regime")]
    if not refs or not summary.get("regimes"):
        return {}
    colors = _colors(summary)
    base_top1 = float((summary.get("base") or {}).get("top1") or np.nan)
    regimes: dict[str, list[dict]] = {}  # a key's regimes of both kinds share its panel: the reference is one line
    for reg in summary["regimes"]:
        if reg["n"]:
            regimes.setdefault(reg["key"], []).append(reg)
    shown = [key for key in dict.fromkeys(r["regime"] for r in refs) if key in regimes]
    fig = _figure(6.5 * (len(shown) + 1), 5.5)
    axes = fig.subplots(1, len(shown) + 1, squeeze=False)[0]
    for ax, key in zip(axes, shown):
        for reg in regimes[key]:
            grid = np.asarray(reg["edf_grid"], dtype=float)
            for s in reg["spaces"]:
                if s["n"]:
                    ax.step(grid, np.asarray(s["edf"]["F"], float), where="post", color=colors[s["space"]],
                            linewidth=2, label=f"{s['space']} (n={s['n']})")
        for r in refs:
            if r["regime"] == key:
                ax.axvline(r["acc_drop"], color="black", linestyle="--", linewidth=1.5,
                           label=f"{_named(r)} (c_flops {r['c_flops']:.3f}): drop {r['acc_drop']:.2f} pp")
                lo, hi = r.get("top1_range") or (r["top1"], r["top1"])
                if hi > lo:  # its seeds' spread, as drops
                    ax.axvspan(base_top1 - hi, base_top1 - lo, color="black", alpha=0.08)
        ax.set_title(f"{key}: pruned subnetworks vs reference")
        ax.set_xlabel(_DROP)
        ax.set_ylabel("F(e): fraction with drop < e")
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    ax = axes[-1]
    by_space: dict[str, list[tuple[float, float]]] = {}
    for reg in summary["regimes"]:
        for s in reg["spaces"]:
            w = s.get("winner")
            if w:
                by_space.setdefault(s["space"], []).append((w["c_flops"], w["top1"]))
    for space, points in by_space.items():
        points.sort()
        x, y = zip(*points)
        ax.plot(x, y, marker="o", color=colors.get(space), label=f"{space}: winner per regime")
    for r in refs:
        lo, hi = r.get("top1_range") or (r["top1"], r["top1"])
        ax.errorbar([r["c_flops"]], [r["top1"]], yerr=[[r["top1"] - lo], [hi - r["top1"]]], marker="*",
                    markersize=14, color="black", linestyle="none", capsize=4)
        seeds = len(r.get("top1_values") or [])
        ax.annotate(r["model"] + (f" ({seeds} seeds)" if seeds > 1 else ""), (r["c_flops"], r["top1"]),
                    textcoords="offset points", xytext=(8, 4), fontsize=8)
    base = summary.get("base") or {}
    if base.get("top1") is not None:
        ax.plot([1.0], [base["top1"]], marker="D", color="0.3", linestyle="none", label="base network")
    xs = [x for points in by_space.values() for x, _ in points] + [r["c_flops"] for r in refs] + [1.0]
    if log_wanted(xs):  # ticks as plain numbers where it is log
        _log_axis(ax, "x")
    ax.set_xlabel("c_flops (FLOPs relative to the base network)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Top-1 against FLOPs: winners and references\n(stars: mean over seeds; bars: lowest to highest)",
                 fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3, which="both")
    path = Path(out_dir) / "references.png"
    fig.savefig(path, dpi=110)
    return {"references": {"file": path.name, "caption": "The pruned populations against the reference networks "
                           "at their FLOPs: accuracy-drop EDFs with each reference's drop (dashed: its mean over "
                           "seeds; shaded: their range), and top-1 against c_flops of every space's winners, the "
                           "references (stars, bars from the lowest to the highest seed) and the base."}}


def _named(ref: dict) -> str:
    """A reference's label: its model, and its seeds when more than one (their top-1 values listed)."""
    values = ref.get("top1_values") or []
    if len(values) < 2:
        return ref["model"]
    return f"{ref['model']}, {len(values)} seeds ({', '.join(f'{v:.2f}' for v in values)})"
