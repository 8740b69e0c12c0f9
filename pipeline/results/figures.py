"""The figures of ``nps report``, drawn from the summary alone (``summary.json`` holds every number they show) with
matplotlib's object API: no pyplot state, no display needed.

One figure per regime (paper Fig. 2 / 4: accuracy-drop EDFs with bootstrap bands, the distributions of std(r),
c_flops, c_params and mCB, drop vs mCB and each space's winning recipe), the mean drop per space, the best-k
(Fig. 3), the optimal mCB against FLOPs reduction (Fig. 5 right), the winners' drop against their mCB (Fig. 5
left), and the uniform-ratio studies (Fig. 1, :mod:`nps.pipeline.results.retraining_study`).
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np

from nps.pipeline.results.stats import MIN_INTERVAL_N, fit_from_dict

_LABELS = {
    "std": "std(r): std of the recipe's pruning ratios over groups",
    "c_flops": "c_flops = FLOPs(sub) / FLOPs(base)",
    "c_params": "c_params = Params(sub) / Params(base)",
    "mcb": "mCB = (FLOPs/Params)(sub) / (FLOPs/Params)(base)",
}
_WEIGHT_STD = "std(r): std of the recipe's sparsities over layers"
_TITLES = {"std": "Spread of the recipe: std(r)", "c_flops": "Remaining FLOPs",
           "c_params": "Remaining parameters", "mcb": "Mean computation budget"}
_DROP = "accuracy drop (percentage points: base top-1 − top-1)"
_DROP_SHORT = "accuracy drop (percentage points)"
_UNIFORM = "#ff7f0e"
# Below this many subnetworks a 95 % EDF band covers most of [0, 1] and only hides the other spaces' curves: the
# band is left out of the figure (it is still in summary.json).
MIN_BAND_N = MIN_INTERVAL_N


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _colors(summary: dict) -> dict:
    from matplotlib import colormaps

    names = sorted({s["space"] for r in summary["regimes"] for s in r["spaces"]})
    palette = colormaps["tab10"].colors
    # tab10's orange marks the uniform recipe everywhere: spaces skip it.
    palette = [c for i, c in enumerate(palette) if i != 1]
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def _nan_array(values) -> np.ndarray:
    """A JSON list (None where a value was not finite) as a float array with NaN there."""
    return np.asarray([np.nan if v is None else v for v in values], dtype=float)


def _slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", key).strip("_")


def percent(x: float) -> str:
    return f"{100 * x:.1f} %"


def _regime_title(summary: dict, reg: dict) -> str:
    m = summary.get("model") or {}
    what = f"{m.get('name', '?')} ({m.get('mode', '?')}, {m.get('resolution', '?')} px)" if m else "model ?"
    c = {n: sum(s["counts"][n] for s in reg["spaces"]) for n in ("total", "pending", "running", "failed")}
    top1 = summary["base"].get("top1")
    base = f"base top-1 {top1:.2f} %" if top1 is not None else "base top-1 unknown"
    status = f"{reg['n']} of {c['total']} subnetworks finished"
    extra = [f"{c['pending'] + c['running']} unfinished"] if c["pending"] + c["running"] else []
    extra += [f"{c['failed']} failed"] if c["failed"] else []
    if extra:
        status += f" ({', '.join(extra)})"
    delta = f"{reg['delta']:g}" if reg.get("delta") is not None else "δ"
    how = "weights pruned" if reg.get("pruning") == "weights" else "filters pruned"
    return f"{what}, {how} to {reg['key']} ± {delta}  ·  {base}  ·  {status}"


_MAX_BARS = 40  # up to this many groups the winning recipes are bars, beyond it lines
_MAX_TICKS = 45  # group names shown on the recipe axis; beyond it every k-th group is labelled


def _group_ticks(ax, names: list[str], unit: str = "group") -> None:
    """Group (or layer) names on the x axis: without their common prefix, and every k-th one when there are many."""
    G = len(names)
    parts = [n.split(".") for n in names]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    prefix = ".".join(parts[0][:common]) + "." if common else ""
    step = max(1, -(-G // _MAX_TICKS))
    ticks = np.arange(0, G, step)
    ax.set_xticks(ticks, [names[i][len(prefix):] for i in ticks], rotation=90, fontsize=8 if G <= _MAX_BARS else 7)
    label = "prunable channel group (network order" if unit == "group" else "prunable layer (network order"
    label += f"; one in {step} of the {G} {unit}s labelled" if step > 1 else ""
    label += f"; names after '{prefix}'" if prefix else ""
    ax.set_xlabel(label + ")")


def uniform_label(uni: dict) -> str:
    """What the one uniform reference of a regime is: the trained baseline row, or a computed recipe."""
    if uni.get("trained"):
        return "uniform baseline (trained)"
    return "uniform recipe (computed, not trained)"


def beats_text(b: dict | None) -> str:
    """``beats the baseline``: a fraction with its interval where n supports one, else the count."""
    if not b:
        return ""
    if b.get("ci") is None:
        return f"{b.get('wins', round(b['fraction'] * b['n']))} of {b['n']}"
    return f"{percent(b['fraction'])} [{percent(b['ci'][0])}, {percent(b['ci'][1])}]"


def _edf_panel(ax, summary: dict, reg: dict, spaces: list[dict], colors: dict) -> None:
    grid = np.asarray(reg["edf_grid"], dtype=float)
    baseline = reg.get("baseline") or {}
    comp = reg.get("comparison")
    for s in spaces:
        e = s["edf"]
        label = f"{s['space']}: n={s['n']}, mean drop {s['drop']['mean']:.2f} pp"
        if comp and s["space"] in comp["prob_best"]:
            label += f", P(highest EDF)={comp['prob_best'][s['space']]:.2f}"
        if s.get("beats_baseline"):
            label += f", beats the baseline: {beats_text(s['beats_baseline'])}"
        if s["n"] >= MIN_BAND_N:
            ax.fill_between(grid, np.asarray(e["lo"], float), np.asarray(e["hi"], float), color=colors[s["space"]],
                            alpha=0.18, linewidth=0, step="post")
        else:
            label += f" (no band: n < {MIN_BAND_N})"
        ax.step(grid, np.asarray(e["F"], float), where="post", color=colors[s["space"]], linewidth=2, label=label)
    if grid.size and grid[0] < 0 < grid[-1]:
        ax.axvline(0, color="0.5", linewidth=0.8, linestyle=":")
    if baseline.get("n"):
        what = f"mean drop of {baseline['n']} rows" if baseline["n"] > 1 else "drop"
        ax.axvline(baseline["acc_drop"], color=_UNIFORM, linewidth=1.8, linestyle="--",
                   label=f"uniform baseline ({baseline['space']}, trained): {what} {baseline['acc_drop']:.2f} pp")
    banded = any(s["n"] >= MIN_BAND_N for s in spaces)
    ax.set_title(f"Accuracy-drop EDF (shaded: {band_text(summary)} bootstrap band)" if banded else "Accuracy-drop EDF")
    ax.set_xlabel(_DROP)
    ax.set_ylabel("F(e): fraction with drop < e")
    ax.set_ylim(-0.02, 1.02)
    # below the axes: inside, the wide labels would hide the curves' tails
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8.5, frameon=False)
    ax.grid(alpha=0.3)


def _hist_panel(ax, reg: dict, spaces: list[dict], field: str, colors: dict) -> None:
    uni = reg.get("uniform")
    edges = np.asarray(reg["hist_edges"][field], dtype=float)
    for s in spaces:
        counts = np.asarray(s["hist"][field], dtype=float)
        ax.stairs(counts, edges, color=colors[s["space"]], linewidth=2, label=s["space"])
        ax.stairs(counts, edges, color=colors[s["space"]], alpha=0.12, fill=True)
    if uni and field in uni:
        label = f"{uniform_label(uni)}: {uni[field]:.4g}"
        if field == reg["target"] and reg.get("delta") is not None and abs(uni[field] - reg["value"]) > reg["delta"]:
            label += f"\n(rounding to integer channels misses ±{reg['delta']:g})"
        ax.axvline(uni[field], color=_UNIFORM, linestyle="--", linewidth=1.6, label=label)
    if field == "mcb":
        ax.axvline(1.0, color="0.4", linestyle=":", linewidth=1, label="base network (1.0)")
    ax.set_title(_TITLES[field])
    ax.set_xlabel(_WEIGHT_STD if field == "std" and reg.get("pruning") == "weights" else _LABELS[field])
    ax.set_ylabel("subnetworks (count)")
    ax.ticklabel_format(axis="x", useOffset=False)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _drop_mcb_panel(ax, reg: dict, spaces: list[dict], colors: dict) -> None:
    uni = reg.get("uniform")
    baseline = reg.get("baseline") or {}
    dot = 12 if reg["n"] > 150 else 28
    for s in spaces:
        f = s["finished"]
        ax.scatter(f["mcb"], f["acc_drop"], s=dot, alpha=0.55, color=colors[s["space"]], label=s["space"],
                   edgecolors="none")
        w = s["winner"]
        ax.scatter([w["mcb"]], [w["acc_drop"]], marker="*", s=260, color=colors[s["space"]], edgecolors="black",
                   linewidths=0.8, zorder=5)
    if baseline.get("n"):
        ax.scatter([baseline["mcb"]], [baseline["acc_drop"]], marker="D", s=70, color=_UNIFORM, edgecolors="black",
                   linewidths=0.8, zorder=6, label=f"uniform baseline (trained): mCB {baseline['mcb']:.3f}")
    elif uni:
        ax.axvline(uni["mcb"], color=_UNIFORM, linestyle="--", linewidth=1.6,
                   label=f"{uniform_label(uni)}: mCB {uni['mcb']:.3f}")
    best = reg.get("winner")
    title = "Accuracy drop vs mCB  (★ the winner of each space)"
    if best:
        title += f"\nbest of the regime: {best['space']} row {best['row']}, drop {best['acc_drop']:.2f} pp"
    ax.set_title(title)
    ax.set_xlabel(_LABELS["mcb"])
    ax.set_ylabel(_DROP_SHORT)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _fig_regime(summary: dict, reg: dict, colors: dict, path: Path) -> None:
    fig = _figure(14, 17)
    gs = fig.add_gridspec(4, 2, height_ratios=[1.25, 1, 1, 1.15])
    fig.suptitle(_regime_title(summary, reg), fontsize=13, fontweight="bold")
    spaces = [s for s in reg["spaces"] if s["n"]]
    _edf_panel(fig.add_subplot(gs[0, 0]), summary, reg, spaces, colors)
    slots = {"std": gs[0, 1], "c_flops": gs[1, 0], "c_params": gs[1, 1], "mcb": gs[2, 0]}
    for field, slot in slots.items():
        _hist_panel(fig.add_subplot(slot), reg, spaces, field, colors)
    _drop_mcb_panel(fig.add_subplot(gs[2, 1]), reg, spaces, colors)
    _winning_recipes(fig.add_subplot(gs[3, :]), summary, reg, spaces, colors)
    fig.savefig(path, dpi=100)


def _winning_recipes(ax, summary: dict, reg: dict, spaces: list[dict], colors: dict) -> None:
    """The winning recipe of each space of one regime: a filter space's ratios per channel group, a weight space's
    sparsity per prunable layer (a regime holds one kind, so one axis); bars, or lines for many entries."""
    from nps.pipeline.network.pruning_kind import kind_named

    kind = kind_named(reg.get("pruning", "filters"))
    unit, what = kind.unit, kind.recipe_axis  # the kind says what one recipe entry is
    uni = reg.get("uniform")

    def label(s: dict) -> str:
        w = s["winner"]
        return f"{s['space']}: row {w['row']}, drop {w['acc_drop']:.2f}, std(r) {w['std']:.3f}, mCB {w['mcb']:.3f}"

    G = len(spaces[0]["winner"]["recipe"]) if spaces else 0
    names = (summary.get("model") or {}).get(kind.unit + "s")  # the model's "groups" or "layers"
    names = names if names and len(names) == G else [str(i) for i in range(G)]
    width = 0.8 / max(1, len(spaces))
    x = np.arange(G)
    for i, s in enumerate(spaces):
        recipe = np.asarray(s["winner"]["recipe"], float)
        if G <= _MAX_BARS:
            ax.bar(x - 0.4 + width * (i + 0.5), recipe, width, color=colors[s["space"]], label=label(s))
        else:  # many entries: one line per space reads better than bars a pixel wide
            ax.plot(x, recipe, marker="o", markersize=2.5, linewidth=1.0, color=colors[s["space"]], label=label(s))
    if uni:
        ax.axhline(uni["ratio"], color=_UNIFORM, linestyle="--", linewidth=1.6,
                   label=f"{uniform_label(uni)}: {uni['ratio']:.3f} in every {unit}")
    if G:
        _group_ticks(ax, names, unit)
        ax.set_xlim(-0.6, G - 0.4)
    ax.set_ylabel(what)
    ax.set_ylim(0, 1.3)  # room for the legend above the bars (ratios are at most R < 1)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_title("Winning recipe of each space")
    ax.legend(fontsize=8, loc="upper left", ncols=1 if len(spaces) < 3 else 2)
    ax.grid(alpha=0.3, axis="y")


def baseline_ratio(baseline: dict) -> float:
    recipe = baseline.get("recipe") or [math.nan]
    return float(np.mean(recipe)) if None not in recipe else math.nan


def band_text(summary: dict) -> str:
    lo, hi = summary["settings"]["band"]
    return f"{hi - lo:g} %"


def best_k_title(summary: dict) -> str:
    """The best-k figure's title, counting what it draws."""
    k = summary["settings"]["k"]
    regs = [r for r in summary["regimes"] if r["best_k"]]
    drawn = sum(r["best_k"]["n"] for r in regs)
    finished = sum(r["best_k"]["of"] for r in regs)
    if all(r["best_k"]["n"] == r["best_k"]["of"] for r in regs):
        return f"All {finished} finished subnetworks (no regime has more than k = {k}), by space"
    return f"Best k = {k} subnetworks of each regime: {drawn} of {finished} finished (grey: the rest)"


def _strip(ax, j: int, offset: float, values, **style) -> None:
    """Values of one category on one vertical line at ``j + offset``: no jitter, which would read as an axis."""
    v = np.asarray(values, float)
    if v.size:
        ax.scatter(np.full(v.size, j + offset), v, alpha=0.75, **style)


def _fig_best_k(summary: dict, colors: dict, path: Path) -> None:
    """Paper Fig. 3: params of the best-k per c_flops regime, FLOPs of the best-k per c_params regime. Each regime
    is one column, each space a fixed slot in it (the grey slot: the finished rows outside the best k)."""
    panels = [("c_flops", "c_params", "Parameters of the best subnetworks under a FLOPs target"),
              ("c_params", "c_flops", "FLOPs of the best subnetworks under a parameter target")]
    panels = [p for p in panels if any(r["target"] == p[0] and r["best_k"] for r in summary["regimes"])]
    fig = _figure(max(9.5, 7.5 * len(panels)), 6)
    fig.suptitle(best_k_title(summary), fontsize=12, fontweight="bold")
    for i, (target, shown, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        regs = [r for r in summary["regimes"] if r["target"] == target and r["best_k"]]
        seen = set()
        for j, r in enumerate(regs):
            b = r["best_k"]
            names = sorted(set(b["space"]))
            slots = np.linspace(-0.25, 0.25, len(names) + 1)
            _strip(ax, j, slots[0], r["rest"][shown], s=8, color="0.75", edgecolors="none",
                   label="finished, not in the best k" if j == 0 and r["rest"][shown] else None)
            for slot, space in zip(slots[1:], names):
                v = [val for sp, val in zip(b["space"], b[shown]) if sp == space]
                _strip(ax, j, slot, v, s=24, color=colors.get(space, _UNIFORM), edgecolors="black", linewidths=0.3,
                       label=space if space not in seen else None, zorder=3)
                seen.add(space)
            med = float(np.median(b[shown]))
            ax.hlines(med, j - 0.35, j + 0.35, color="black", linewidth=2, zorder=4,
                      label="median of the best k" if j == 0 else None)
            if r.get("uniform") and not r["uniform"]["trained"]:  # a trained baseline is a point of its own
                ax.scatter([j + 0.42], [r["uniform"][shown]], marker="D", s=45, color=_UNIFORM, zorder=4,
                           edgecolors="black", linewidths=0.4,
                           label=uniform_label(r["uniform"]) if j == 0 else None)
        ax.set_xticks(range(len(regs)), [f"{r['value']:g}" + (" (weights)" if r.get("pruning") == "weights" else "")
                                         for r in regs])
        ax.set_xlim(-0.6, len(regs) - 0.4)
        if log_wanted([v for r in regs for v in r["rest"][shown] + r["best_k"][shown] if v is not None]):
            _log_axis(ax, "y")
        ax.set_title(title)
        ax.set_xlabel(f"regime: the {target} target (a category; within it, one slot per space)")
        ax.set_ylabel(_LABELS[shown])
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=100)


def log_wanted(values) -> bool:
    """A log axis only where the values span more than a factor of 4 (over 0.83-1.0 it would only make odd ticks)."""
    values = [v for v in values if v is not None and v > 0]
    return bool(values) and max(values) / min(values) > 4


def _log_axis(ax, which: str) -> None:
    """A log axis whose ticks read as plain numbers (0.9, not 9×10⁻¹)."""
    from matplotlib.ticker import FuncFormatter

    axis = ax.yaxis if which == "y" else ax.xaxis
    (ax.set_yscale if which == "y" else ax.set_xscale)("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(plain)
    axis.set_minor_formatter(plain)
    ax.tick_params(axis=which, which="minor", labelsize=7)


def _fit_label(fit: dict) -> str:
    if fit["kind"] == "none":
        return "no fit: " + fit["note"]
    params = ", ".join(f"{k}={v:.4g}" for k, v in fit["params"].items())
    r2 = "n/a" if fit["r2"] is None else f"{fit['r2']:.3f}"
    return f"fit {fit['formula']}:\n{params}  (R²={r2}, RMSE={fit['rmse']:.3g}, n={fit['n']})"


def _draw_fit(ax, fit: dict, xs, transform=lambda x: x) -> None:
    """The fitted curve with its R² where the fit is drawn (:meth:`Fit.drawn`'s rule), else a legend line saying
    why it is not."""
    if fit.get("drawn", fit["kind"] != "none"):
        ax.plot(transform(xs), fit_from_dict(fit).predict(xs), color="#d62728", linestyle="--", linewidth=2,
                label=_fit_label(fit))
    else:
        shown = _fit_label(fit) if fit["kind"] != "none" else ""
        why = fit.get("not_drawn") or fit["note"]
        ax.plot([], [], " ", label=(shown + "\n" if shown else "") + why)


def _kind_suffix(pruning: str) -> str:
    return "" if pruning == "filters" else f" — {pruning.removesuffix('s')} spaces"


def _fig_optimal_mcb(summary: dict, om: dict, path: Path) -> None:
    """Paper Fig. 5 right: mCB of the best-k against FLOPs reduction, the fitted curve and the uniform recipe
    (one kind of pruning per figure)."""
    pts = om["points"]
    fig = _figure(9, 6)
    ax = fig.add_subplot()
    c = np.asarray(pts["c_flops"], float)
    m = np.asarray(pts["mcb"], float)
    targets = np.asarray(pts["target"])
    k = summary["settings"]["k"]
    regs = [r for r in summary["regimes"] if r["pruning"] == om.get("pruning", "filters") and r["best_k"]]
    best = f"best {k}" if all(r["best_k"]["n"] >= k for r in regs) else f"best ≤ {k}"
    for target, marker in (("c_flops", "o"), ("c_params", "^")):
        sel = targets == target
        if sel.any():
            ax.scatter(100 * (1 - c[sel]), m[sel], marker=marker, s=18, alpha=0.6, color="#1f77b4",
                       edgecolors="none", label=f"{best} subnetworks of each {target} regime ({int(sel.sum())})")
    if c.size:
        lo, hi = float(c.min()), float(c.max())
        pad = max(0.01, 0.05 * (hi - lo))
        xs = np.linspace(max(lo - pad, 1e-3), min(hi + pad, 1.0), 300)
        _draw_fit(ax, om["fit"], xs, lambda x: 100 * (1 - x))
        curve = summary.get("uniform_curve")
        if curve and om.get("pruning", "filters") == "filters" and len(regs) >= 2:  # a trend needs two regimes
            uc = np.asarray(curve["c_flops"], float)
            um = np.asarray(curve["mcb"], float)
            keep = (uc >= xs[0]) & (uc <= xs[-1])
            ax.plot(100 * (1 - uc[keep]), um[keep], color=_UNIFORM, linestyle=":", linewidth=1.5,
                    label="uniform ratio in every group, continuous channel counts (the trend between regimes)")
    unis = [r["uniform"] for r in regs if r.get("uniform")]
    if unis:
        ax.scatter([100 * (1 - u["c_flops"]) for u in unis], [u["mcb"] for u in unis], marker="D", s=50,
                   color=_UNIFORM, edgecolors="black", linewidths=0.5, zorder=4,
                   label=f"{uniform_label(unis[0])} of each regime")
    ax.axhline(1.0, color="0.4", linestyle=":", linewidth=1, label="base network (mCB = 1)")
    ax.set_title("Optimal mCB vs FLOPs reduction" + _kind_suffix(om.get("pruning", "filters")), fontsize=12,
                 fontweight="bold")
    ax.set_xlabel("FLOPs reduction 1 − c_flops (%)")
    ax.set_ylabel(_LABELS["mcb"])
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)


def _fig_drop_vs_mcb(summary: dict, dv: dict, path: Path) -> None:
    """Paper Fig. 5 left (Conjecture 4): accuracy drop of each regime's best network (whichever space, the
    baseline included) against its mCB, with the fit where it explains something (one kind per figure)."""
    pts = dv["points"]
    fig = _figure(13, 6.5)
    ax = fig.add_subplot()
    from matplotlib import colormaps

    pruning = dv.get("pruning", "filters")
    regs = [r for r in summary["regimes"] if r["best_k"] and r["pruning"] == pruning]
    cmap = colormaps["viridis"]
    shade = {r["key"]: cmap(0.85 * i / max(1, len(regs) - 1)) for i, r in enumerate(regs)}
    for r in regs:
        ax.scatter(r["best_k"]["mcb"], r["best_k"]["acc_drop"], s=9, color=shade[r["key"]], alpha=0.35,
                   edgecolors="none")
    x = np.asarray(pts["mcb"], float)
    y = np.asarray(pts["acc_drop"], float)
    for xi, yi, key, space in zip(x, y, pts["regime"], pts["space"]):
        ax.scatter([xi], [yi], s=80, color=shade.get(key, "#1f77b4"), edgecolors="black", linewidths=0.8,
                   zorder=4, label=f"best at {key} ({space})")
        ax.annotate(key, (xi, yi), textcoords="offset points", xytext=(7, 4), fontsize=8)
    ax.scatter([], [], s=9, color="0.6", label=f"faint: best {summary['settings']['k']} of each regime "
                                                "(context, not fitted)")
    if x.size:
        pad = 0.08 * max(x.max() - x.min(), 0.05)
        _draw_fit(ax, dv["fit"], np.linspace(max(x.min() - pad, 1e-3), x.max() + pad, 300))
    ax.set_title("Accuracy drop of each regime's best network vs its mCB (Conjecture 4)" + _kind_suffix(pruning),
                 fontsize=12, fontweight="bold")
    ax.set_xlabel(_LABELS["mcb"])
    ax.set_ylabel(_DROP)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the plot: one entry per regime
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)


def _fig_spaces(summary: dict, colors: dict, path: Path) -> None:
    """Mean drop per space and regime, with bootstrap intervals where a space has enough rows and its drops
    themselves where it has not: the space comparison at a glance."""
    regs = [r for r in summary["regimes"] if r["n"]]
    names = sorted({s["space"] for r in regs for s in r["spaces"] if s["n"]})
    fig = _figure(max(8.0, 1.6 * len(regs) + 3), 5.5)
    ax = fig.add_subplot()
    # each regime spreads its own spaces over its slot (a filter regime leaves no gaps for the weight spaces)
    present = [[s["space"] for s in r["spaces"] if s["n"]] for r in regs]
    few = False
    for name in names:
        xs, ys, lo, hi = [], [], [], []
        for j, r in enumerate(regs):
            s = next((s for s in r["spaces"] if s["space"] == name and s["n"]), None)
            if not s:
                continue
            width = 0.8 / len(present[j])
            x = j - 0.4 + width * (present[j].index(name) + 0.5)
            if s["drop"].get("mean_ci") is None:  # too few rows for an interval: the values and their mean
                few = True
                ax.scatter(np.full(s["n"], x), s["finished"]["acc_drop"], s=14, marker="o", facecolors="none",
                           edgecolors=colors[name], linewidths=1)
                ax.scatter([x], [s["drop"]["mean"]], marker="o", s=49, color=colors[name], zorder=3)
                continue
            xs.append(x)
            ys.append(s["drop"]["mean"])
            lo.append(s["drop"]["mean"] - s["drop"]["mean_ci"][0])
            hi.append(s["drop"]["mean_ci"][1] - s["drop"]["mean"])
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=4, color=colors[name], label=name, markersize=7)
    marked = [(j, r["baseline"]["acc_drop"]) for j, r in enumerate(regs) if (r.get("baseline") or {}).get("n")]
    if marked:
        ax.scatter([j for j, _ in marked], [d for _, d in marked], marker="_", s=900, linewidths=2.5,
                   color=_UNIFORM, zorder=4, label="uniform baseline of the regime (trained)")
    ax.set_xticks(range(len(regs)), [r.get("id", r["key"]) for r in regs])
    ax.set_xlim(-0.6, len(regs) - 0.4)
    fig.suptitle("Mean accuracy drop per space", fontsize=12, fontweight="bold")
    n_min = summary["settings"].get("min_interval_n", MIN_BAND_N)
    sub = f"error bars: {band_text(summary)} bootstrap interval; lower is better"
    if few:
        sub += f"\nspaces with n < {n_min}: their drops (rings) and mean (dot), no interval"
    ax.set_title(sub, fontsize=10)
    ax.set_xlabel("regime")
    ax.set_ylabel(f"mean {_DROP_SHORT}")
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)


_STUDY_TITLES = {"criteria": "Filter importance: drop against the uniform ratio",
           "epochs": "Fine-tuning epochs, per uniform ratio",
           "methods": "Fine-tuning, rewinding and retraining from scratch"}
_STUDY_XLABELS = {"ratio": "uniform pruning ratio r", "epochs": "retraining epochs"}


def _fig_ratio_study(study: dict, path: Path) -> None:
    """The panels of a ratio study (:func:`nps.pipeline.results.retraining_study.summarize`) side by side, as
    the paper's Fig. 1."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    panels = study["panels"]
    fig = Figure(figsize=(6.2 * len(panels), 5.2), layout="constrained")
    fig.suptitle("Accuracy drop of uniformly pruned subnetworks (paper Fig. 1)", fontsize=12, fontweight="bold")
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for label, line in panel["lines"].items():
            x = np.asarray(line["x"], dtype=float)
            y = np.asarray(line["drop_mean"], dtype=float)
            err = np.asarray(line["drop_std"], dtype=float)
            shown = f"{panel['line']} {label}" if panel["line"] == "ratio" else label
            ax.errorbar(x, y, yerr=err if np.any(err > 0) else None, marker="o", capsize=3, linewidth=1.8,
                        label=shown)
        fixed = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in panel["fixed"].items())
        ax.set_title(f"{_STUDY_TITLES[panel['name']]}\n({fixed})", fontsize=10)
        ax.set_xlabel(_STUDY_XLABELS[panel["x"]])
        if panel["x"] == "epochs":
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("accuracy drop (percentage points)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)


def render(summary: dict, out_dir: str | os.PathLike) -> dict:
    """Draw every figure of ``summary`` into ``out_dir``; returns ``{name: {"file", "caption"}}``."""
    out = Path(out_dir)
    figures = {}
    if summary["counts"]["finished"] == 0:
        return figures
    study = summary.get("ratio_study")
    if study and study["panels"]:
        _fig_ratio_study(study, out / "ratio_study.png")
        figures["ratio_study"] = {"file": "ratio_study.png", "caption": "Uniformly pruned subnetworks: accuracy drop "
                                  "against the ratio per filter-importance criterion, against the fine-tuning "
                                  "epochs per ratio, and per retraining method (paper Fig. 1)."}
    if not summary["regimes"]:
        return figures
    colors = _colors(summary)
    for reg in summary["regimes"]:
        if reg["n"]:
            name = f"regime_{_slug(reg.get('id', reg['key']))}.png"
            _fig_regime(summary, reg, colors, out / name)
            figures[f"regime {reg.get('id', reg['key'])}"] = {
                "file": name, "caption": f"{reg.get('id', reg['key'])}: accuracy-drop EDFs with bootstrap bands, the "
                                         "distributions of std(r), c_flops, c_params and mCB, drop vs mCB, and the "
                                         "winning recipe of each space (paper Fig. 2 / Fig. 4)."}
    figures["spaces"] = {"file": "spaces.png", "caption": "Mean accuracy drop per space and regime with bootstrap "
                                                          "intervals."}
    _fig_spaces(summary, colors, out / "spaces.png")
    figures["best_k"] = {"file": "best_k.png", "caption": "The best-k subnetworks of each regime: their parameters "
                                                          "under FLOPs targets and their FLOPs under parameter "
                                                          "targets (paper Fig. 3)."}
    _fig_best_k(summary, colors, out / "best_k.png")
    captions = {"optimal_mcb": ("mCB of the best-k per regime against FLOPs reduction, the fitted curve where it "
                                "explains something (drawn only with R² ≥ 0.5 and 2 degrees of freedom) and the "
                                "uniform reference (paper Fig. 5 right).", _fig_optimal_mcb),
                "drop_vs_mcb": ("Accuracy drop of each regime's best network (whichever space, the baseline "
                                "included) against its mCB, with the fitted form under the same rule (paper Fig. 5 "
                                "left, Conjecture 4).", _fig_drop_vs_mcb)}
    for pruning, fits in summary.get("fits", {}).items():
        suffix = "" if pruning == "filters" else f"_{pruning}"
        what = "" if pruning == "filters" else f" Weight spaces only ({pruning} pruning has its own fits)."
        for name, (caption, draw) in captions.items():
            figures[name + suffix] = {"file": f"{name}{suffix}.png", "caption": caption + what}
            draw(summary, fits[name], out / f"{name}{suffix}.png")
    return figures


