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

from nps.pipeline.results.stats import fit_from_dict

_LABELS = {
    "std": "std(r): std of the recipe's pruning ratios over groups",
    "c_flops": "c_flops = FLOPs(sub) / FLOPs(base)",
    "c_params": "c_params = Params(sub) / Params(base)",
    "mcb": "mCB = (FLOPs/Params)(sub) / (FLOPs/Params)(base)",
}
_TITLES = {"std": "Spread of the recipe: std(r)", "c_flops": "Remaining FLOPs",
           "c_params": "Remaining parameters", "mcb": "Mean computation budget"}
_DROP = "accuracy drop (percentage points: base top-1 − top-1)"
_DROP_SHORT = "accuracy drop (percentage points)"
_UNIFORM = "#ff7f0e"
# Below this many subnetworks a 95 % EDF band covers most of [0, 1] and only hides the other spaces' curves: the
# band is left out of the figure (it is still in summary.json).
MIN_BAND_N = 10


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
    return f"{what} pruned to {reg['key']} ± {delta}  ·  {base}  ·  {status}"


_MAX_BARS = 40  # up to this many groups the winning recipes are bars, beyond it lines
_MAX_TICKS = 45  # group names shown on the recipe axis; beyond it every k-th group is labelled


def _group_ticks(ax, names: list[str]) -> None:
    """Group names on the x axis: without their common prefix, and every k-th one when there are many."""
    G = len(names)
    parts = [n.split(".") for n in names]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    prefix = ".".join(parts[0][:common]) + "." if common else ""
    step = max(1, -(-G // _MAX_TICKS))
    ticks = np.arange(0, G, step)
    ax.set_xticks(ticks, [names[i][len(prefix):] for i in ticks], rotation=90, fontsize=8 if G <= _MAX_BARS else 7)
    label = "prunable channel group (network order"
    label += f"; one in {step} of the {G} groups labelled" if step > 1 else ""
    label += f"; names after '{prefix}'" if prefix else ""
    ax.set_xlabel(label + ")")


def _fig_regime(summary: dict, reg: dict, colors: dict, path: Path) -> None:
    fig = _figure(14, 17)
    gs = fig.add_gridspec(4, 2, height_ratios=[1.25, 1, 1, 1.15])
    fig.suptitle(_regime_title(summary, reg), fontsize=13, fontweight="bold")
    spaces = [s for s in reg["spaces"] if s["n"]]
    uni = reg.get("uniform")
    comp = reg.get("comparison")

    ax = fig.add_subplot(gs[0, 0])
    grid = np.asarray(reg["edf_grid"], dtype=float)
    baseline = reg.get("baseline") or {}
    for s in spaces:
        e = s["edf"]
        label = f"{s['space']}: n={s['n']}, mean drop {s['drop']['mean']:.2f} pp"
        if comp:
            label += f", P(highest EDF)={comp['prob_best'][s['space']]:.2f}"
        if s.get("beats_baseline"):
            b = s["beats_baseline"]
            label += f", beats the baseline: {percent(b['fraction'])} [{percent(b['ci'][0])}, {percent(b['ci'][1])}]"
        if s["n"] >= MIN_BAND_N:
            ax.fill_between(grid, np.asarray(e["lo"], float), np.asarray(e["hi"], float), color=colors[s["space"]],
                            alpha=0.18, linewidth=0, step="post")
        else:
            label += f" (no band: n < {MIN_BAND_N})"
        ax.step(grid, np.asarray(e["F"], float), where="post", color=colors[s["space"]], linewidth=2, label=label)
    if grid.size and grid[0] < 0 < grid[-1]:
        ax.axvline(0, color="0.5", linewidth=0.8, linestyle=":")
    if baseline.get("n"):
        ax.axvline(baseline["acc_drop"], color="black", linewidth=1.6, linestyle="--",
                   label=f"uniform baseline (r = {baseline_ratio(baseline):.3f}, trained): drop "
                         f"{baseline['acc_drop']:.2f} pp")
    banded = any(s["n"] >= MIN_BAND_N for s in spaces)
    ax.set_title(f"Accuracy-drop EDF (shaded: {band_text(summary)} bootstrap band)" if banded else "Accuracy-drop EDF")
    ax.set_xlabel(_DROP)
    ax.set_ylabel("F(e): fraction with drop < e")
    ax.set_ylim(-0.02, 1.02)
    # below the axes: inside, the wide labels would hide the curves' tails
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8.5, frameon=False)
    ax.grid(alpha=0.3)

    slots = {"std": gs[0, 1], "c_flops": gs[1, 0], "c_params": gs[1, 1], "mcb": gs[2, 0]}
    for field, slot in slots.items():
        ax = fig.add_subplot(slot)
        edges = np.asarray(reg["hist_edges"][field], dtype=float)
        for s in spaces:
            counts = np.asarray(s["hist"][field], dtype=float)
            ax.stairs(counts, edges, color=colors[s["space"]], linewidth=2, label=s["space"])
            ax.stairs(counts, edges, color=colors[s["space"]], alpha=0.12, fill=True)
        if uni and field in uni:
            label = f"uniform recipe ({uni[field]:.4g})"
            if field == reg["target"] and reg.get("delta") is not None \
                    and abs(uni[field] - reg["value"]) > reg["delta"]:
                label = f"uniform recipe ({uni[field]:.4g}: rounding to\ninteger channels misses ±{reg['delta']:g})"
            ax.axvline(uni[field], color=_UNIFORM, linestyle="--", linewidth=1.6, label=label)
        if field == "mcb":
            ax.axvline(1.0, color="0.4", linestyle=":", linewidth=1, label="base network (1.0)")
        ax.set_title(_TITLES[field])
        ax.set_xlabel(_LABELS[field])
        ax.set_ylabel("subnetworks (count)")
        ax.ticklabel_format(axis="x", useOffset=False)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)

    ax = fig.add_subplot(gs[2, 1])
    dot = 12 if reg["n"] > 150 else 28
    for s in spaces:
        f = s["finished"]
        ax.scatter(f["mcb"], f["acc_drop"], s=dot, alpha=0.55, color=colors[s["space"]], label=s["space"],
                   edgecolors="none")
        w = s["winner"]
        ax.scatter([w["mcb"]], [w["acc_drop"]], marker="*", s=260, color=colors[s["space"]], edgecolors="black",
                   linewidths=0.8, zorder=5)
    if uni:
        ax.axvline(uni["mcb"], color=_UNIFORM, linestyle="--", linewidth=1.6, label="uniform recipe's mCB")
    ax.set_title("Accuracy drop vs mCB  (★ the winner of each space)")
    ax.set_xlabel(_LABELS["mcb"])
    ax.set_ylabel(_DROP_SHORT)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = fig.add_subplot(gs[3, :])
    _winning_recipes(ax, summary, spaces, uni, colors)
    fig.savefig(path, dpi=100)


def _winning_recipes(ax, summary: dict, spaces: list[dict], uni: dict | None, colors: dict) -> None:
    """The winning recipe of each space: a filter space's ratios per group (bars, or lines for many groups); a
    weight space's sparsity per prunable layer (lines, on the top axis when filter spaces share the panel)."""
    from nps.kernels.spaces import pruning_of

    filters = [s for s in spaces if pruning_of(s["space"]) == "filters"]
    weights = [s for s in spaces if pruning_of(s["space"]) == "weights"]

    def label(s: dict) -> str:
        w = s["winner"]
        return f"{s['space']}: row {w['row']}, drop {w['acc_drop']:.2f}, std(r) {w['std']:.3f}, mCB {w['mcb']:.3f}"

    if filters:
        names = (summary.get("model") or {}).get("groups")
        G = len(filters[0]["winner"]["recipe"])
        names = names if names and len(names) == G else [str(i) for i in range(G)]
        width = 0.8 / len(filters)
        x = np.arange(G)
        for i, s in enumerate(filters):
            recipe = np.asarray(s["winner"]["recipe"], float)
            if G <= _MAX_BARS:
                ax.bar(x - 0.4 + width * (i + 0.5), recipe, width, color=colors[s["space"]], label=label(s))
            else:  # many groups: one line per space reads better than bars a pixel wide
                ax.plot(x, recipe, marker="o", markersize=2.5, linewidth=1.0, color=colors[s["space"]],
                        label=label(s))
        if uni:
            ax.axhline(uni["ratio"], color=_UNIFORM, linestyle="--", linewidth=1.6,
                       label=f"uniform ratio meeting the target ({uni['ratio']:.3f})")
        _group_ticks(ax, names)
        ax.set_xlim(-0.6, G - 0.4)
        ax.set_ylabel("pruning ratio r of the group")
    handles, labels = ax.get_legend_handles_labels()
    if weights:
        wax = ax.twiny() if filters else ax
        for s in weights:
            recipe = np.asarray(s["winner"]["recipe"], float)
            line, = wax.plot(np.arange(recipe.size), recipe, marker=".", markersize=3, linewidth=1.0,
                             linestyle="-" if not filters else ":", color=colors[s["space"]], label=label(s))
            handles.append(line)
            labels.append(label(s))
        wax.set_xlabel("prunable layer (weight spaces: the layer's sparsity)")
        if not filters:
            ax.set_ylabel("sparsity of the layer")
    ax.set_ylim(0, 1.3)  # room for the legend above the bars (ratios are at most R < 1)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_title("Winning recipe of each space")
    ax.legend(handles, labels, fontsize=8, loc="upper left", ncols=1 if len(spaces) < 3 else 2)
    ax.grid(alpha=0.3, axis="y")


def baseline_ratio(baseline: dict) -> float:
    recipe = baseline.get("recipe") or [math.nan]
    return float(recipe[0]) if recipe[0] is not None else math.nan


def band_text(summary: dict) -> str:
    lo, hi = summary["settings"]["band"]
    return f"{hi - lo:g} %"


def _fig_best_k(summary: dict, colors: dict, path: Path) -> None:
    """Paper Fig. 3: params of the best-k per c_flops regime, FLOPs of the best-k per c_params regime."""
    panels = [("c_flops", "c_params", "Parameters of the best subnetworks under a FLOPs target"),
              ("c_params", "c_flops", "FLOPs of the best subnetworks under a parameter target")]
    panels = [p for p in panels if any(r["target"] == p[0] and r["best_k"] for r in summary["regimes"])]
    fig = _figure(max(9.5, 7.5 * len(panels)), 6)
    fig.suptitle(f"Best {summary['settings']['k']} subnetworks of each regime over all spaces (coloured by space; "
                 "grey: the rest)", fontsize=12, fontweight="bold")
    rng = np.random.default_rng(0)
    for i, (target, shown, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        regs = [r for r in summary["regimes"] if r["target"] == target and r["best_k"]]
        seen = set()
        for j, r in enumerate(regs):
            rest = np.asarray(r["rest"][shown], float)
            ax.scatter(j + rng.uniform(-0.3, 0.3, rest.size), rest, s=8, color="0.75", edgecolors="none",
                       label="the other finished subnetworks" if j == 0 else None)
            b = r["best_k"]
            for space in sorted(set(b["space"])):
                v = np.asarray([val for sp, val in zip(b["space"], b[shown]) if sp == space], float)
                ax.scatter(j + rng.uniform(-0.18, 0.18, v.size), v, s=22, color=colors[space], edgecolors="black",
                           linewidths=0.3, label=space if space not in seen else None, zorder=3)
                seen.add(space)
            med = float(np.median(b[shown]))
            ax.hlines(med, j - 0.35, j + 0.35, color="black", linewidth=2, zorder=4,
                      label="median of the coloured ones" if j == 0 else None)
            if r.get("uniform"):
                ax.scatter([j + 0.42], [r["uniform"][shown]], marker="D", s=45, color=_UNIFORM, zorder=4,
                           edgecolors="black", linewidths=0.4, label="uniform recipe" if j == 0 else None)
        ax.set_xticks(range(len(regs)), [f"{r['value']:g}" for r in regs])
        values = [v for r in regs for v in r["rest"][shown] + r["best_k"][shown] if v is not None]
        if values and max(values) / max(min(values), 1e-12) > 4:
            from matplotlib.ticker import FuncFormatter

            ax.set_yscale("log")
            plain = FuncFormatter(lambda v, _: f"{v:g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
            ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_title(title)
        ax.set_xlabel(f"regime: the {target} target (more pruning to the right)")
        ax.set_ylabel(_LABELS[shown])
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)


def _fit_label(fit: dict) -> str:
    if fit["kind"] == "none":
        return "no fit: " + fit["note"]
    params = ", ".join(f"{k}={v:.4g}" for k, v in fit["params"].items())
    r2 = "n/a" if fit["r2"] is None else f"{fit['r2']:.3f}"
    return f"fit {fit['formula']}:\n{params}  (R²={r2}, RMSE={fit['rmse']:.3g}, n={fit['n']})"


def _fig_optimal_mcb(summary: dict, path: Path) -> None:
    """Paper Fig. 5 right: mCB of the best-k against FLOPs reduction, the fitted curve and the uniform recipe."""
    om = summary["optimal_mcb"]
    pts = om["points"]
    fig = _figure(9, 6)
    ax = fig.add_subplot()
    c = np.asarray(pts["c_flops"], float)
    m = np.asarray(pts["mcb"], float)
    targets = np.asarray(pts["target"])
    k = summary["settings"]["k"]
    best = f"best {k}" if all(r["n"] >= k for r in summary["regimes"] if r["n"]) else f"best ≤ {k}"
    for target, marker in (("c_flops", "o"), ("c_params", "^")):
        sel = targets == target
        if sel.any():
            ax.scatter(100 * (1 - c[sel]), m[sel], marker=marker, s=18, alpha=0.6, color="#1f77b4",
                       edgecolors="none", label=f"{best} subnetworks of each {target} regime")
    sel = ~np.isin(targets, ["c_flops", "c_params"])
    if sel.any():
        ax.scatter(100 * (1 - c[sel]), m[sel], s=18, alpha=0.6, color="0.4", label="best per other regime")
    lo, hi = float(c.min()), float(c.max())
    pad = max(0.01, 0.05 * (hi - lo))
    xs = np.linspace(max(lo - pad, 1e-3), min(hi + pad, 1.0), 300)
    fit = fit_from_dict(om["fit"])
    if fit.kind != "none":
        ax.plot(100 * (1 - xs), fit.predict(xs), color="#d62728", linestyle="--", linewidth=2,
                label=_fit_label(om["fit"]))
    curve = summary.get("uniform_curve")
    if curve:
        uc = np.asarray(curve["c_flops"], float)
        um = np.asarray(curve["mcb"], float)
        keep = (uc >= xs[0]) & (uc <= xs[-1])
        ax.plot(100 * (1 - uc[keep]), um[keep], color=_UNIFORM, linestyle="--", linewidth=2,
                label="uniform ratio in every group (continuous channel counts)")
        regs = [r["uniform"] for r in summary["regimes"] if r.get("uniform") and r["best_k"]]
        if regs:
            ax.scatter([100 * (1 - u["c_flops"]) for u in regs], [u["mcb"] for u in regs], marker="D", s=50,
                       color=_UNIFORM, edgecolors="black", linewidths=0.5, zorder=4,
                       label="uniform recipe meeting each regime's target (integer channels)")
    ax.axhline(1.0, color="0.4", linestyle=":", linewidth=1, label="base network (mCB = 1)")
    ax.set_title("Optimal mCB vs FLOPs reduction", fontsize=12, fontweight="bold")
    ax.set_xlabel("FLOPs reduction 1 − c_flops (%)")
    ax.set_ylabel(_LABELS["mcb"])
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)


def _fig_drop_vs_mcb(summary: dict, path: Path) -> None:
    """Paper Fig. 5 left (Conjecture 4): accuracy drop of each regime's winner against its mCB, with the fit."""
    dv = summary["drop_vs_mcb"]
    pts = dv["points"]
    fig = _figure(13, 6.5)
    ax = fig.add_subplot()
    from matplotlib import colormaps

    regs = [r for r in summary["regimes"] if r["best_k"]]
    cmap = colormaps["viridis"]
    shade = {r["key"]: cmap(0.85 * i / max(1, len(regs) - 1)) for i, r in enumerate(regs)}
    for r in regs:
        ax.scatter(r["best_k"]["mcb"], r["best_k"]["acc_drop"], s=9, color=shade[r["key"]], alpha=0.35,
                   edgecolors="none")
    x = np.asarray(pts["mcb"], float)
    y = np.asarray(pts["acc_drop"], float)
    for xi, yi, key, space in zip(x, y, pts["regime"], pts["space"]):
        ax.scatter([xi], [yi], s=80, color=shade.get(key, "#1f77b4"), edgecolors="black", linewidths=0.8,
                   zorder=4, label=f"winner at {key} ({space})")
        ax.annotate(key, (xi, yi), textcoords="offset points", xytext=(7, 4), fontsize=8)
    ax.scatter([], [], s=9, color="0.6", label=f"faint: best {summary['settings']['k']} of each regime "
                                                "(context, not fitted)")
    fit = fit_from_dict(dv["fit"])
    if fit.kind != "none" and x.size:
        pad = 0.08 * max(x.max() - x.min(), 0.05)
        xs = np.linspace(max(x.min() - pad, 1e-3), x.max() + pad, 300)
        ax.plot(xs, fit.predict(xs), color="#d62728", linestyle="--", linewidth=2, label=_fit_label(dv["fit"]))
    else:
        ax.plot([], [], " ", label=_fit_label(dv["fit"]))
    ax.set_title("Accuracy drop of the winners vs their mCB (Conjecture 4)", fontsize=12, fontweight="bold")
    ax.set_xlabel(_LABELS["mcb"])
    ax.set_ylabel(_DROP)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the plot: one entry per regime
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)


def _fig_spaces(summary: dict, colors: dict, path: Path) -> None:
    """Mean drop per space and regime with bootstrap intervals: the space comparison at a glance."""
    regs = [r for r in summary["regimes"] if r["n"]]
    names = sorted({s["space"] for r in regs for s in r["spaces"] if s["n"]})
    fig = _figure(max(8.0, 1.6 * len(regs) + 3), 5.5)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs, ys, lo, hi = [], [], [], []
        for j, r in enumerate(regs):
            s = next((s for s in r["spaces"] if s["space"] == name and s["n"]), None)
            if s:
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(s["drop"]["mean"])
                lo.append(s["drop"]["mean"] - s["drop"]["mean_ci"][0])
                hi.append(s["drop"]["mean_ci"][1] - s["drop"]["mean"])
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=4, color=colors[name], label=name, markersize=7)
    marked = [(j, r["baseline"]["acc_drop"]) for j, r in enumerate(regs) if (r.get("baseline") or {}).get("n")]
    if marked:
        ax.scatter([j for j, _ in marked], [d for _, d in marked], marker="_", s=900, linewidths=2.5,
                   color="black", zorder=4, label="uniform baseline (one trained subnetwork)")
    ax.set_xticks(range(len(regs)), [r["key"] for r in regs])
    ax.set_xlim(-0.6, len(regs) - 0.4)
    fig.suptitle("Mean accuracy drop per space", fontsize=12, fontweight="bold")
    ax.set_title(f"error bars: {band_text(summary)} bootstrap interval; lower is better", fontsize=10)
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
            name = f"regime_{_slug(reg['key'])}.png"
            _fig_regime(summary, reg, colors, out / name)
            figures[f"regime {reg['key']}"] = {
                "file": name, "caption": f"{reg['key']}: accuracy-drop EDFs with bootstrap bands, the "
                                         "distributions of std(r), c_flops, c_params and mCB, drop vs mCB, and the "
                                         "winning recipe of each space (paper Fig. 2 / Fig. 4)."}
    figures["spaces"] = {"file": "spaces.png", "caption": "Mean accuracy drop per space and regime with bootstrap "
                                                          "intervals."}
    _fig_spaces(summary, colors, out / "spaces.png")
    figures["best_k"] = {"file": "best_k.png", "caption": "The best-k subnetworks of each regime: their parameters "
                                                          "under FLOPs targets and their FLOPs under parameter "
                                                          "targets (paper Fig. 3)."}
    _fig_best_k(summary, colors, out / "best_k.png")
    figures["optimal_mcb"] = {"file": "optimal_mcb.png", "caption": "mCB of the best-k per regime against FLOPs "
                                                                    "reduction, the fitted curve and the uniform "
                                                                    "recipe (paper Fig. 5 right)."}
    _fig_optimal_mcb(summary, out / "optimal_mcb.png")
    figures["drop_vs_mcb"] = {"file": "drop_vs_mcb.png", "caption": "Accuracy drop of each regime's winner against "
                                                                    "its mCB with the fitted functional form "
                                                                    "(paper Fig. 5 left, Conjecture 4)."}
    _fig_drop_vs_mcb(summary, out / "drop_vs_mcb.png")
    return figures


