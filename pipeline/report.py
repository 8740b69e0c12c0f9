"""``nps report``: figures, ``index.html`` and ``summary.json`` from a results file (paper §3, Figures 2–5).

:func:`build_summary` reads results.h5 (read-only, SWMR: a file a run is still writing works) and returns the
analysis of :func:`nps.pipeline.analysis.summarize` plus what the file says about its model; :func:`render` draws
every figure from that summary alone, so ``summary.json`` holds every number a figure shows. :func:`write_report`
does both into a temporary directory and renames it into place: a report directory is never half written.

Rows that count: ``status == done`` with a finite top-1 and accuracy drop ("finished"). Pending and running rows are
counted and reported, failed rows are counted and excluded, done rows with a NaN score are counted (``nan``) and
excluded. A file with no finished row still gets ``summary.json`` (the counts) and an ``index.html`` that says so,
but no figures.
"""
from __future__ import annotations

import datetime
import html
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np

from nps.kernels.spaces import parse_space_key
from nps.pipeline import __version__ as NPS_VERSION
from nps.pipeline.analysis import (
    DEFAULT_BAND, DEFAULT_BOOTSTRAP, DEFAULT_EDF_POINTS, Population, fit_from_dict, regime_key, summarize,
)
from nps.pipeline.errors import NpsError
from nps.pipeline.store import DONE, FAILED, PENDING, RUNNING, open_readonly

log = logging.getLogger(__name__)

FORMAT = "nps-report-1"
_FIELDS = ("status", "top1", "acc_drop", "c_flops", "c_params", "mcb", "std", "flops", "params", "recipe", "keep")


# --------------------------------------------------------------------------------------------------------------------
# Reading.


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def space_regime(group: str, attrs) -> tuple[str, str, float]:
    """(space, target, value) of a space group: from its attributes, else parsed from its space key."""
    key = parse_space_key(group)
    space = _text(attrs["space"]) if "space" in attrs else (key.label if key else group)
    if "target" in attrs and "value" in attrs:
        return space, _text(attrs["target"]), float(attrs["value"])
    if key:
        return space, key.target, key.value
    return space, "unspecified", math.nan


def read_population(reader, group: str) -> Population:
    """The finished rows of one space and the counts of all its rows."""
    g = reader.file["spaces"][group]
    space, target, value = space_regime(group, g.attrs)
    cols = reader.read(group, _FIELDS)  # status first: a row done in this snapshot has its values on disk
    # A run may append rows between two column reads: look only at the rows every column already has.
    n = min(len(c) for c in cols.values())
    status = cols["status"][:n]
    appended = len(cols["status"]) - n
    cols = {name: c[:n] for name, c in cols.items()}
    done = status == DONE
    finite = np.isfinite(cols["top1"].astype(np.float64)) & np.isfinite(cols["acc_drop"].astype(np.float64))
    ok = done & finite
    counts = {"total": int(n + appended), "pending": int(np.count_nonzero(status == PENDING) + appended),
              "running": int(np.count_nonzero(status == RUNNING)), "done": int(np.count_nonzero(done)),
              "failed": int(np.count_nonzero(status == FAILED)), "nan": int(np.count_nonzero(done & ~finite))}
    pick = {name: cols[name][ok] for name in _FIELDS if name != "status"}
    delta = float(g.attrs["delta"]) if "delta" in g.attrs else math.nan
    return Population(group=group, space=space, target=target, value=value, counts=counts,
                      row=np.flatnonzero(ok), delta=delta, **pick)


def _layer_table(reader):
    from nps.pipeline.graph import LayerTable

    try:
        return LayerTable.from_hdf5(reader.layers)
    except Exception as error:  # a file without a full layer table (older or hand-made): report without it
        log.info("no usable layer table in %s: %s", reader.path, error)
        return None


def _uniform(table, pops, notes) -> tuple[dict, dict | None]:
    """The uniform recipe meeting each regime's target, and the uniform recipes' curve over all ratios."""
    from nps.kernels.spaces import DEFAULT_R, uniform_ratio

    if table is None:
        notes.append("the file has no usable layer table (/layers): uniform-recipe references are not shown")
        return {}, None
    out = {}
    G = len(table.channels)
    for p in pops:
        key = regime_key(p.target, p.value)
        if key in out or p.target not in ("c_flops", "c_params") or not math.isfinite(p.value):
            continue
        u = uniform_ratio(table, p.target, p.value)
        keep = table.keep(np.full(G, min(max(u, 0.0), 1.0)))
        out[key] = {"ratio": float(u), "keep": [int(v) for v in keep], "c_flops": float(table.c_flops(keep)),
                    "c_params": float(table.c_params(keep)), "mcb": float(table.mcb(keep))}
    # The curve uses continuous channel counts (1 − u)·c: at integer counts a small network's uniform recipes
    # zig-zag by rounding, which hides the trend; the per-regime points above are the real (integer) recipes.
    r_max = 1.0 - 0.5 / float(np.min(table.channels))
    ratios = np.linspace(0.0, min(DEFAULT_R, r_max), 400)
    keep = (1.0 - ratios[:, None]) * np.asarray(table.channels, dtype=np.float64)[None, :]
    c_flops = _continuous(table.flops, keep) / table.base_flops
    c_params = _continuous(table.params, keep) / table.base_params
    curve = {"ratio": ratios.tolist(), "c_flops": c_flops.tolist(), "c_params": c_params.tolist(),
             "mcb": (c_flops / c_params).tolist(), "channels": "continuous"}
    return out, curve


def _continuous(form, keep: np.ndarray) -> np.ndarray:
    """A complexity form at real-valued keep counts, one row per recipe (no rounding)."""
    pairs = keep[:, form.pair_a] * keep[:, form.pair_b] * form.pair_w.astype(np.float64)
    return form.const + keep @ form.linear.astype(np.float64) + pairs.sum(axis=1)


def _json_ready(x):
    """Recursively: numpy to Python, non-finite floats to None (JSON has no NaN)."""
    if isinstance(x, dict):
        return {str(k): _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    if isinstance(x, np.ndarray):
        return _json_ready(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def build_summary(results: str | os.PathLike, *, k: int = 40, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                  edf_points: int = DEFAULT_EDF_POINTS, band=DEFAULT_BAND) -> dict:
    """The whole analysis of a results file as a JSON-ready dict (see the module docstring)."""
    if k < 1:
        raise NpsError(f"--k {k}: the number of best subnetworks must be at least 1")
    if n_boot < 1:
        raise NpsError(f"--bootstrap {n_boot}: use at least 1 resample (1000 is the default)")
    with open_readonly(results) as reader:
        attrs = reader.attrs
        groups = reader.spaces()
        pops = [read_population(reader, g) for g in groups]
        table = _layer_table(reader)
    notes = []
    uniform, curve = _uniform(table, pops, notes)
    summary = summarize(pops, k=k, n_boot=n_boot, seed=seed, edf_points=edf_points, band=band, uniform=uniform)
    counts = summary["counts"]
    base_top1 = attrs.get("base_top1", math.nan)
    if not groups:
        notes.append("the file has no spaces yet")
    if counts["pending"] or counts["running"]:
        notes.append(f"{counts['pending']} rows pending and {counts['running']} running: this report covers the "
                     f"{counts['finished']} finished rows")
    if counts["failed"]:
        notes.append(f"{counts['failed']} failed rows are excluded (their errors are in the file's 'error' column)")
    if counts["nan"]:
        notes.append(f"{counts['nan']} done rows have no finite top-1 or accuracy drop and are excluded"
                     + (" (the file has no base_top1)" if not _finite(base_top1) else ""))
    if counts["finished"] == 0:
        notes.append("no finished rows yet: no figures")
    for fit_name, label in (("optimal_mcb", "optimal-mCB fit"), ("drop_vs_mcb", "drop-vs-mCB fit")):
        if summary[fit_name]["fit"]["note"] and counts["finished"]:
            notes.append(f"{label}: {summary[fit_name]['fit']['note']}")
    model = None
    if table is not None:
        model = {"name": table.model, "mode": table.mode, "resolution": table.resolution,
                 "num_classes": table.num_classes, "in_channels": table.in_channels, "groups": list(table.names),
                 "channels": [int(c) for c in table.channels], "base_flops": int(table.base_flops),
                 "base_params": int(table.base_params)}
    summary.update({
        "format": FORMAT, "nps_version": NPS_VERSION, "results": os.path.abspath(os.fspath(results)),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": model, "uniform_curve": curve, "notes": notes,
        "base": {name: attrs.get(f"base_{name}") for name in ("top1", "top5", "flops", "params")},
    })
    return _json_ready(summary)


def _finite(x) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------------------------
# Writing.


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NpsError(f"--out {out}: exists and is not a directory; choose a directory name")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise NpsError(f"--out {out}: directory exists and is not empty; pass --force to replace it")


def write_report(results: str | os.PathLike, out_dir: str | os.PathLike, *, k: int = 40,
                 n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0, edf_points: int = DEFAULT_EDF_POINTS,
                 force: bool = False) -> dict:
    """Write ``out_dir/index.html``, ``out_dir/summary.json`` and the PNG figures; returns the summary.

    The directory is assembled under a temporary name beside it and renamed into place; an existing non-empty
    ``out_dir`` is replaced only with ``force=True``.
    """
    out = Path(out_dir)
    _check_out(out, force)
    summary = build_summary(results, k=k, n_boot=n_boot, seed=seed, edf_points=edf_points)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        summary["figures"] = render(summary, tmp)
        with open(tmp / "summary.json", "w") as fh:
            json.dump(summary, fh, indent=1, allow_nan=False)
            fh.write("\n")
        (tmp / "index.html").write_text(render_html(summary))
        _check_out(out, force)  # again: someone may have written there meanwhile
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return summary


# --------------------------------------------------------------------------------------------------------------------
# Figures (drawn from the summary only, with matplotlib's object API: no pyplot state, no display needed).

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


def _pct(x: float) -> str:
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


def _fig_regime(summary: dict, reg: dict, colors: dict, path: Path) -> None:
    fig = _figure(14, 17)
    gs = fig.add_gridspec(4, 2, height_ratios=[1.25, 1, 1, 1.15])
    fig.suptitle(_regime_title(summary, reg), fontsize=13, fontweight="bold")
    spaces = [s for s in reg["spaces"] if s["n"]]
    uni = reg.get("uniform")
    comp = reg.get("comparison")

    ax = fig.add_subplot(gs[0, 0])
    grid = np.asarray(reg["edf_grid"], dtype=float)
    for s in spaces:
        e = s["edf"]
        label = f"{s['space']}: n={s['n']}, mean drop {s['drop']['mean']:.2f} pp"
        if comp:
            label += f", P(highest EDF)={comp['prob_best'][s['space']]:.2f}"
        if s["n"] >= MIN_BAND_N:
            ax.fill_between(grid, np.asarray(e["lo"], float), np.asarray(e["hi"], float), color=colors[s["space"]],
                            alpha=0.18, linewidth=0, step="post")
        else:
            label += f" (no band: n < {MIN_BAND_N})"
        ax.step(grid, np.asarray(e["F"], float), where="post", color=colors[s["space"]], linewidth=2, label=label)
    if grid.size and grid[0] < 0 < grid[-1]:
        ax.axvline(0, color="0.5", linewidth=0.8, linestyle=":")
    banded = any(s["n"] >= MIN_BAND_N for s in spaces)
    ax.set_title(f"Accuracy-drop EDF (shaded: {_band(summary)} bootstrap band)" if banded else "Accuracy-drop EDF")
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
    names = (summary.get("model") or {}).get("groups")
    G = len(spaces[0]["winner"]["recipe"])
    names = names if names and len(names) == G else [str(i) for i in range(G)]
    width = 0.8 / len(spaces)
    x = np.arange(G)
    for i, s in enumerate(spaces):
        w = s["winner"]
        ax.bar(x - 0.4 + width * (i + 0.5), np.asarray(w["recipe"], float), width, color=colors[s["space"]],
               label=f"{s['space']}: row {w['row']}, drop {w['acc_drop']:.2f}, std(r) {w['std']:.3f}, "
                     f"mCB {w['mcb']:.3f}")
    if uni:
        ax.axhline(uni["ratio"], color=_UNIFORM, linestyle="--", linewidth=1.6,
                   label=f"uniform ratio meeting the target ({uni['ratio']:.3f})")
    ax.set_xticks(x, names, rotation=90, fontsize=8 if G <= 40 else 6)
    ax.set_xlim(-0.6, G - 0.4)
    ax.set_ylim(0, 1.3)  # room for the legend above the bars (ratios are at most R < 1)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_title("Winning recipe of each space")
    ax.set_ylabel("pruning ratio r of the group")
    ax.set_xlabel("prunable channel group (network order)")
    ax.legend(fontsize=8, loc="upper left", ncols=1 if len(spaces) < 3 else 2)
    ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=100)


def _band(summary: dict) -> str:
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
        ax.set_xticks(range(len(regs)), [f"{target}={r['value']:g}" for r in regs])
        values = [v for r in regs for v in r["rest"][shown] + r["best_k"][shown] if v is not None]
        if values and max(values) / max(min(values), 1e-12) > 4:
            from matplotlib.ticker import FuncFormatter

            ax.set_yscale("log")
            plain = FuncFormatter(lambda v, _: f"{v:g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
            ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_title(title)
        ax.set_xlabel(f"regime ({target} target, more pruning to the right)")
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
    ax.set_xticks(range(len(regs)), [r["key"] for r in regs])
    ax.set_xlim(-0.6, len(regs) - 0.4)
    fig.suptitle("Mean accuracy drop per space", fontsize=12, fontweight="bold")
    ax.set_title(f"error bars: {_band(summary)} bootstrap interval; lower is better", fontsize=10)
    ax.set_xlabel("regime")
    ax.set_ylabel(f"mean {_DROP_SHORT}")
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)


def render(summary: dict, out_dir: str | os.PathLike) -> dict:
    """Draw every figure of ``summary`` into ``out_dir``; returns ``{name: {"file", "caption"}}``."""
    out = Path(out_dir)
    figures = {}
    if summary["counts"]["finished"] == 0:
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


# --------------------------------------------------------------------------------------------------------------------
# index.html

_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1400px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}img{max-width:100%;border:1px solid #ddd;margin:0.3em 0}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:0.4em 0.8em;margin:0.3em 0}
figure{margin:1.5em 0}figcaption{color:#555}code{background:#f3f3f3;padding:0 3px}"""


def _fmt(x, spec: str = ".3f") -> str:
    return "–" if x is None else format(x, spec)


def _regime_rows(reg: dict) -> list[str]:
    rows = []
    comp = reg.get("comparison")
    for s in reg["spaces"]:
        c = s["counts"]
        cells = [f"<td class=l>{html.escape(reg['key'])}</td>", f"<td class=l>{html.escape(s['space'])}</td>"]
        cells += [f"<td>{c[n]}</td>" for n in ("total", "done", "pending", "running", "failed", "nan")]
        if s["n"]:
            d, w = s["drop"], s["winner"]
            cells += [f"<td>{w['acc_drop']:.3f} (row {w['row']})</td>", f"<td>{d['median']:.3f}</td>",
                      f"<td>{d['mean']:.3f} [{_fmt(d['mean_ci'][0])}, {_fmt(d['mean_ci'][1])}]</td>",
                      f"<td>{_fmt(s['edf']['area'])}</td>",
                      f"<td>{_fmt(comp['prob_best'][s['space']], '.2f') if comp else '–'}</td>"]
        else:
            cells += ["<td>–</td>"] * 5
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return rows


def render_html(summary: dict) -> str:
    """The report page: counts and notes, the summary table, space comparisons, fits and the figures."""
    e = html.escape
    m = summary.get("model") or {}
    base = summary["base"]
    c = summary["counts"]
    band = _band(summary)
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>nps report</title><style>{_CSS}</style>"
             "</head><body>", "<h1>Network pruning spaces: report</h1>",
             f"<p><code>{e(summary['results'])}</code> · written {e(summary['created'])} by nps "
             f"{e(summary['nps_version'])}</p>"]
    if m:
        parts.append(f"<p>Base network <b>{e(m['name'])}</b> ({e(m['mode'])} mode, {m['resolution']} px, "
                     f"{m['num_classes']} classes, {len(m['groups'])} prunable groups): "
                     f"{m['base_flops'] / 1e6:,.1f} M FLOPs (multiply-accumulates), "
                     f"{m['base_params'] / 1e6:,.3f} M params, top-1 {_fmt(base.get('top1'), '.2f')} %.</p>")
    parts.append(f"<p>Rows: {c['total']} total, <b>{c['finished']} finished</b> (analysed), {c['pending']} pending, "
                 f"{c['running']} running, {c['failed']} failed, {c['nan']} done without a finite score.</p>")
    parts += [f"<div class=note>{e(n)}</div>" for n in summary["notes"]]
    s = summary["settings"]
    parts.append(f"<p>Accuracy drop = base top-1 − top-1 in percentage points; EDF F(e) = fraction with drop &lt; e "
                 f"(Eq. 1). Intervals: {band} bootstrap ({s['bootstrap']} resamples, seed {s['seed']}); "
                 f"best-k with k = {s['k']}.</p>")
    parts.append("<h2>Spaces</h2><table><tr><th class=l>regime</th><th class=l>space</th><th>rows</th><th>done</th>"
                 "<th>pending</th><th>running</th><th>failed</th><th>NaN</th><th>best drop</th><th>median drop</th>"
                 f"<th>mean drop [{band} CI]</th><th>EDF area</th><th>P(highest EDF)</th></tr>")
    for reg in summary["regimes"]:
        parts += _regime_rows(reg)
    parts.append("</table>")
    comps = [r for r in summary["regimes"] if r.get("comparison")]
    if comps:
        parts.append("<h2>Which space's EDF is higher</h2><p>P(row space's EDF area &gt; column space's), from "
                     "paired bootstrap draws; the EDF area is the mean of F over the regime's e-grid, so a higher "
                     "area means a lower mean drop.</p>")
        for reg in comps:
            names = list(reg["comparison"]["prob_best"])
            head = "".join(f"<th>{e(n)}</th>" for n in names)
            parts.append(f"<h3>{e(reg['key'])}</h3><table><tr><th class=l></th>{head}</tr>")
            for a in names:
                cells = "".join("<td>–</td>" if a == b else f"<td>{reg['comparison']['prob_higher'][a][b]:.3f}</td>"
                                for b in names)
                parts.append(f"<tr><th class=l>{e(a)}</th>{cells}</tr>")
            parts.append("</table>")
    parts.append("<h2>Fits</h2><table><tr><th class=l>what</th><th class=l>form</th><th class=l>parameters</th>"
                 "<th>n</th><th>R²</th><th>RMSE</th><th class=l>note</th><th class=l>why this form</th></tr>")
    for label, key in (("optimal mCB vs remaining FLOPs (best-k points)", "optimal_mcb"),
                       ("accuracy drop vs mCB (each regime's winner)", "drop_vs_mcb")):
        f = summary[key]["fit"]
        params = ", ".join(f"{k} = {v:.4g}" for k, v in f["params"].items()) or "–"
        parts.append(f"<tr><td class=l>{label}</td><td class=l>{e(f['formula'])}</td><td class=l>{e(params)}</td>"
                     f"<td>{f['n']}</td><td>{_fmt(f['r2'])}</td><td>{_fmt(f['rmse'], '.3g')}</td>"
                     f"<td class=l>{e(f['note'])}</td><td class=l>{e(summary[key].get('why', ''))}</td></tr>")
    parts.append("</table>")
    if summary.get("figures"):
        parts.append("<h2>Figures</h2>")
        for fig in summary["figures"].values():
            parts.append(f"<figure><img src=\"{e(fig['file'])}\" alt=\"{e(fig['caption'])}\">"
                         f"<figcaption>{e(fig['caption'])}</figcaption></figure>")
    parts.append("<p>Every number shown here and in the figures is in <a href=summary.json>summary.json</a>.</p>"
                 "</body></html>\n")
    return "\n".join(parts)
