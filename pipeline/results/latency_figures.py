"""The report's latency section: its numbers (:func:`latency_summary`, ``summary["latency"]`` in summary.json) and
its figure, drawn from those numbers alone (:func:`render_latency`).

One figure per measured device, one row of panels per batch size: the measured speed-up (base median / row median,
both from one session) against c_flops per space, with the ideal ``1 / c_flops`` that FLOPs promise; top-1 against
latency with the frontier (no other subnetwork is both faster and more accurate) and the base network; each space's
winner (lowest accuracy drop) with its latency, interquartile range and speed-up. Timings whose IQR / median exceeds
the noise limit (:data:`nps.pipeline.results.latency.NOISE_LIMIT`) are counted, and the figure's title says so.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

# --------------------------------------------------------------------------------------------------------------------
# The report's numbers.


def _frontier(points: list[dict]) -> list[dict]:
    """The points no other point beats on both latency (lower) and top-1 (higher), fastest first."""
    best, out = -math.inf, []
    for p in sorted(points, key=lambda p: (p["latency_ms"], -p["top1"])):
        if p["top1"] > best:
            out.append(p)
            best = p["top1"]
    return out


def latency_summary(pops, measured: dict, base_top1: float = math.nan) -> dict:
    """Per device measured: the settings, the base network's latency, per space its finished rows' c_flops, top-1,
    latency and speed-up per batch, each space's winner (lowest drop) with its latencies (median, IQR, noise = IQR /
    median, speed-up), per batch the top-1 vs latency frontier (the base included), and how many of the device's
    ``timings`` are ``noisy``: the noise its speed-up rests on (a paired row's ratio's, else the timing's) above
    ``noise_limit``. ``{}`` when the file has no measurements.
    ``measured``: :func:`~nps.pipeline.results.latency.read_latency` of the file."""
    from nps.pipeline.results.analysis import regime_key
    from nps.pipeline.results.latency import BASE

    out = {}
    for device, cols in measured.items():
        index = {(s, int(r), int(b)): i for i, (s, r, b) in enumerate(zip(cols["space"], cols["row"], cols["batch"]))}
        batches = sorted({int(b) for b in cols["batch"]})

        def entry(space, row, batch, index=index, cols=cols):
            i = index.get((space, int(row), batch))
            if i is None:
                return None
            return {"median_ms": 1e3 * float(cols["median_s"][i]), "iqr_ms": 1e3 * float(cols["iqr_s"][i]),
                    "noise": float(cols["noise"][i]), "speedup": float(cols["speedup"][i])}

        spaces, winners, points = [], [], {b: [] for b in batches}
        for b in batches:
            e = entry(BASE, -1, b)
            if e and math.isfinite(float(base_top1)):
                points[b].append({"group": BASE, "row": -1, "top1": float(base_top1), "latency_ms": e["median_ms"]})
        for pop in pops:
            measured = [j for j in range(len(pop.row)) if any((pop.group, int(pop.row[j]), b) in index
                                                              for b in batches)]
            if not measured:
                continue
            s = {"group": pop.group, "space": pop.space, "regime": regime_key(pop.target, pop.value),
                 "targeted": bool(math.isfinite(pop.value)),  # a regime (the uniform-ratio rows have none)
                 "rows": [int(pop.row[j]) for j in measured], "c_flops": [float(pop.c_flops[j]) for j in measured],
                 "top1": [float(pop.top1[j]) for j in measured], "latency_ms": {}, "iqr_ms": {}, "speedup": {}}
            for b in batches:
                es = [entry(pop.group, pop.row[j], b) for j in measured]
                s["latency_ms"][str(b)] = [e["median_ms"] if e else None for e in es]
                s["iqr_ms"][str(b)] = [e["iqr_ms"] if e else None for e in es]
                s["speedup"][str(b)] = [e["speedup"] if e else None for e in es]
                points[b] += [{"group": pop.group, "row": int(pop.row[j]), "top1": float(pop.top1[j]),
                               "latency_ms": e["median_ms"]} for j, e in zip(measured, es) if e]
            spaces.append(s)
            w = int(np.argmin(pop.acc_drop))
            winners.append({"group": pop.group, "space": pop.space, "regime": s["regime"],
                            "targeted": s["targeted"], "row": int(pop.row[w]),
                            "top1": float(pop.top1[w]), "acc_drop": float(pop.acc_drop[w]),
                            "c_flops": float(pop.c_flops[w]),
                            "latency": {str(b): entry(pop.group, pop.row[w], b) for b in batches}})
        attrs = cols["attrs"]
        limit = float(attrs["noise_limit"])
        out[device] = {
            "device_name": attrs.get("device_name", ""), "threads": attrs.get("threads"),
            "amp": attrs.get("amp"), "channels_last": attrs.get("channels_last"),
            "versions": attrs.get("versions", {}), "measured": attrs.get("measured", ""),
            "sessions": len(attrs.get("sessions", [])), "batches": batches,
            "base": {str(b): entry(BASE, -1, b) for b in batches}, "spaces": spaces, "winners": winners,
            "frontier": {str(b): _frontier(points[b]) for b in batches},
            "noise_limit": limit, "timings": int(cols["noise"].size), "noisy": int(np.sum(cols["speedup_noise"] > limit)),
        }
    return out


# --------------------------------------------------------------------------------------------------------------------
# The figure.

def _space_colors(info: dict) -> dict:
    from matplotlib import colormaps

    palette = [c for i, c in enumerate(colormaps["tab10"].colors) if i != 1]
    names = sorted({s["space"] for s in info["spaces"]})
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def _label(s: dict, several_regimes: bool) -> str:
    """A space's name, with its regime where the figure shows several; a population without a target (the
    uniform-ratio rows of ``nps sample --ratios``) has no regime to name."""
    return f"{s['space']} @ {s['regime']}" if several_regimes and s.get("targeted", True) else s["space"]


def _plain_ticks(axis) -> None:
    """Numbers, not powers of ten, on a log axis that spans less than a decade or two."""
    from matplotlib.ticker import LogLocator, ScalarFormatter

    axis.set_major_formatter(ScalarFormatter())
    axis.set_minor_locator(LogLocator(subs=(2, 3, 5)))
    axis.set_minor_formatter(ScalarFormatter())


def _panel_speedup(ax, info: dict, batch: str, colors: dict, several: bool) -> None:
    lo, hi = np.inf, 0.0
    for s in info["spaces"]:
        sp = np.array([np.nan if v is None else v for v in s["speedup"][batch]], dtype=float)
        c = np.asarray(s["c_flops"], dtype=float)
        ax.scatter(c, sp, s=16, alpha=0.75, color=colors[s["space"]], label=_label(s, several),
                   marker="o" if s["space"] != "baseline" else "D")
        lo, hi = min(lo, float(np.nanmin(c))), max(hi, float(np.nanmax(c)))
    if np.isfinite(lo):
        grid = np.linspace(lo * 0.9, min(1.0, hi * 1.1), 100)
        ax.plot(grid, 1.0 / grid, color="0.5", ls="--", lw=1, label="ideal: 1 / c_flops")
    ax.axhline(1.0, color="0.3", lw=0.8)
    ax.set_yscale("log")
    _plain_ticks(ax.yaxis)
    ax.set_xlabel("c_flops = FLOPs(sub) / FLOPs(base)")
    ax.set_ylabel("measured speed-up vs the base")
    ax.set_title(f"Speed-up vs c_flops, batch {batch}")
    ax.legend(fontsize=7)


def _panel_frontier(ax, info: dict, batch: str, colors: dict, several: bool) -> None:
    for s in info["spaces"]:
        lat = np.array([np.nan if v is None else v for v in s["latency_ms"][batch]], dtype=float)
        ax.scatter(lat, s["top1"], s=16, alpha=0.75, color=colors[s["space"]], label=_label(s, several))
    front = info["frontier"][batch]
    if front:
        ax.step([p["latency_ms"] for p in front], [p["top1"] for p in front], where="post", color="k", lw=1,
                label="frontier")
    base = info["base"][batch]
    base_pts = [p for p in front if p["group"] == "base"]
    if base and base_pts:
        ax.scatter([base["median_ms"]], [base_pts[0]["top1"]], marker="*", s=120, color="k", label="base network",
                   zorder=3)
    ax.set_xscale("log")
    _plain_ticks(ax.xaxis)
    ax.set_xlabel(f"latency per forward of batch {batch} (ms, median)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"Top-1 vs latency, batch {batch}")
    ax.legend(fontsize=7)


def _panel_winners(ax, info: dict, batch: str, colors: dict, several: bool) -> None:
    names, med, iqr, cols, text = [], [], [], [], []
    base = info["base"][batch]
    if base:
        names.append("base network")
        med.append(base["median_ms"])
        iqr.append(base["iqr_ms"])
        cols.append("0.4")
        text.append("1.00×")
    for w in info["winners"]:
        e = w["latency"][batch]
        if not e:
            continue
        names.append(f"{_label(w, several)} row {w['row']}\n(drop {w['acc_drop']:.2f} pp)")
        med.append(e["median_ms"])
        iqr.append(e["iqr_ms"])
        cols.append(colors.get(w["space"], "0.6"))
        text.append("–" if e.get("speedup") is None else f"{e['speedup']:.2f}×")
    y = np.arange(len(names))
    ax.barh(y, med, xerr=np.asarray(iqr) / 2, color=cols, alpha=0.85, capsize=2)
    for yi, m, q, t in zip(y, med, iqr, text):
        ax.text(m + q / 2, yi, f"  {m:.3g} ms, {t}", va="center", fontsize=7)
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, max(med or [1.0]) * 1.6)
    ax.set_xlabel(f"latency of batch {batch} (ms; bar: median, whisker: IQR)")
    ax.set_title(f"Winners' latency, batch {batch}")


def _noise_note(info: dict) -> str:
    """``; NOISY: 7 of 12 timings ...`` when some timings are noisy, else nothing."""
    if not info.get("noisy"):
        return ""
    verb = "has" if info["noisy"] == 1 else "have"
    return (f"; NOISY: {info['noisy']} of {info['timings']} timings {verb} IQR/median above "
            f"{100 * info['noise_limit']:g} %, speed-ups unreliable")


def render_latency(summary: dict, out_dir: str | os.PathLike) -> dict:
    """Draw ``latency_<device>.png`` for every device of ``summary["latency"]``; returns ``{name: {"file",
    "caption"}}`` (nothing when the file has no measurements or no measured finished row)."""
    from matplotlib.figure import Figure

    figures = {}
    for device, info in (summary.get("latency") or {}).items():
        if not info["spaces"]:
            continue
        batches = [str(b) for b in info["batches"]]
        several = len({s["regime"] for s in info["spaces"]}) > 1
        colors = _space_colors(info)
        fig = Figure(figsize=(18, 4.6 * len(batches)), layout="constrained")
        axes = fig.subplots(len(batches), 3, squeeze=False)
        for row, batch in zip(axes, batches):
            _panel_speedup(row[0], info, batch, colors, several)
            _panel_frontier(row[1], info, batch, colors, several)
            _panel_winners(row[2], info, batch, colors, several)
        threads = f"{info['threads']} thread{'' if info['threads'] == 1 else 's'}"
        fig.suptitle(f"Measured latency on {device}: {info['device_name']}, {threads}, "
                     f"amp {info['amp']}, channels_last {info['channels_last']}, torch "
                     f"{info['versions'].get('torch', '?')}{_noise_note(info)}")
        name = f"latency_{device}.png"
        fig.savefig(Path(out_dir) / name, dpi=110)
        figures[f"latency {device}"] = {
            "file": name, "caption": f"Measured on {device} ({info['device_name']}, {threads}): "
                                     "speed-up over the base network against c_flops per space (dashed: the ideal "
                                     "1/c_flops), top-1 against latency with the frontier, and each space's "
                                     "winner's latency and speed-up; latencies are medians over repeated timed runs, "
                                     "the base measured in the same session; a speed-up is a paired row's median "
                                     "ratio to the base, run by run, or unpaired the base median over the row's "
                                     f"(nps latency){_noise_note(info)}."}
    return figures
