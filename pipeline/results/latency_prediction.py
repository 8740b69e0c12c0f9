"""Predicted against measured latency: is the latency model right on the population it chose?

A results file with a latency model (``/latency_model`` and the form in ``/layers``, format 4) predicts every row's
latency from its keep vector; ``nps latency`` measures the rows at the model's device and batch. For every row
measured there at that batch, :func:`prediction_summary` sets the two side by side:

- ``r2``: 1 − Σ(measured − predicted)² / Σ(measured − mean)² over the rows, in seconds (the prediction itself, not
  a line fitted to it: a model off by a constant factor scores below 1, and so does a machine that runs everything
  a few per cent slower in the timing session than when the model was measured);
- ``r2_relative``: the same over each row's latency relative to the base network's, measured (``c_measured``: the
  reciprocal of its stored speed-up: its paired ratio to the base, or unpaired over the base timed in the same
  session) against predicted (``c_predicted``: the row's c_latency), what a c_latency regime fixes: a machine's
  speed that differs between the model's session and the timing session cancels;
- ``error``: the relative error (predicted − measured) / measured per row, its median and the RMS;
- per c_latency regime, ``within``: how many of its rows, *measured*, lie within the regime's band (their measured
  latency over the base network's, from the same session, within value ± delta) - the band every row meets by
  prediction;
- every measurement's noise (IQR / median): the worst, and how many exceed 5 %; for rows timed paired with the base
  (``paired``), the same of their ratio's (``paired_noise_max``, ``paired_noisy``): what ``c_measured`` rests on.

:func:`render_prediction` draws ``latency_prediction.png`` (measured against predicted, the y = x line, one colour per
regime).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

FILE = "latency_prediction.png"
QUIET = 0.05  # IQR / median above which a timing counts as noisy here (nps latency takes such a timing again)


def prediction_summary(reader, table, pops, measured: dict) -> dict | None:
    """The comparison (see the module docstring), or None when the file has no latency model or no row was measured
    at its device and batch. ``measured``: :func:`~nps.pipeline.results.latency.read_latency` of the file."""
    from nps.pipeline.network.pruning_kind import kind_of
    from nps.pipeline.network.table import LATENCY_UNIT
    from nps.pipeline.results.analysis import regime_key
    from nps.pipeline.results.latency import BASE

    if table is None or table.latency is None:
        return None
    model = reader.latency_model()
    if model is None:
        return None
    measured = measured.get(model.device)
    if measured is None:
        return None
    at = {(str(s), int(r)): i for i, (s, r, b) in enumerate(zip(measured["space"], measured["row"], measured["batch"]))
          if int(b) == model.batch}
    base_i = at.get((BASE, -1))
    if base_i is None:
        return None
    base_measured = float(measured["median_s"][base_i])
    points: dict[str, list] = {k: [] for k in ("group", "space", "regime", "row", "predicted_ms", "measured_ms",
                                               "noise", "c_measured", "c_predicted", "paired_noise")}
    base_predicted = table.base_latency * LATENCY_UNIT
    regimes = []
    for pop in pops:
        rows = [(j, at[(pop.group, int(r))]) for j, r in enumerate(pop.row) if (pop.group, int(r)) in at]
        if not rows or not kind_of(pop.group).timed:  # a weight-pruned row runs at the dense speed
            continue
        predicted = table.latency_of(np.asarray(pop.keep, dtype=np.int64)[[j for j, _ in rows]])
        median = np.asarray([float(measured["median_s"][i]) for _, i in rows])
        c_measured = 1.0 / np.asarray([float(measured["speedup"][i]) for _, i in rows])  # paired, or own session's
        key = regime_key(pop.target, pop.value) if math.isfinite(pop.value) else pop.space  # ratios: no target
        points["group"] += [pop.group] * len(rows)
        points["space"] += [pop.space] * len(rows)
        points["regime"] += [key] * len(rows)
        points["row"] += [int(pop.row[j]) for j, _ in rows]
        points["predicted_ms"] += (1e3 * predicted).tolist()
        points["measured_ms"] += (1e3 * median).tolist()
        points["noise"] += [float(measured["noise"][i]) for _, i in rows]
        points["paired_noise"] += [float(measured["paired_noise"][i]) for _, i in rows]
        points["c_measured"] += c_measured.tolist()
        points["c_predicted"] += (predicted / base_predicted).tolist()
        if pop.target == "c_latency" and math.isfinite(pop.delta):
            inside = int(np.count_nonzero(np.abs(c_measured - pop.value) <= pop.delta))
            regimes.append({"group": pop.group, "space": pop.space, "regime": key, "value": pop.value,
                            "delta": pop.delta, "n": len(rows), "within": inside,
                            "c_measured": [float(np.min(c_measured)), float(np.max(c_measured))]})
    if not points["row"]:
        return None
    pred, meas = np.asarray(points["predicted_ms"]), np.asarray(points["measured_ms"])
    err = (pred - meas) / meas
    noise = np.asarray(points["noise"] + [float(measured["noise"][base_i])])
    paired = np.asarray(points["paired_noise"], dtype=np.float64)
    paired = paired[np.isfinite(paired)]
    return {"device": model.device, "device_name": model.device_name, "batch": int(model.batch),
            "threads": int(model.threads), "precision": model.precision, "n": int(pred.size),
            "r2": r_squared(pred, meas), "r2_relative": r_squared(points["c_predicted"], points["c_measured"]),
            "error_median": float(np.median(err)), "error_rms": float(np.sqrt(np.mean(err ** 2))),
            "base": {"predicted_ms": 1e3 * base_predicted, "measured_ms": 1e3 * base_measured},
            "noise_max": float(np.max(noise)), "noisy": int(np.count_nonzero(noise > QUIET)), "quiet_limit": QUIET,
            "paired": int(paired.size), "paired_noise_max": float(np.max(paired)) if paired.size else None,
            "paired_noisy": int(np.count_nonzero(paired > QUIET)),
            "regimes": regimes, "points": points}


def r_squared(predicted, measured) -> float | None:
    """1 − Σ(measured − predicted)² / Σ(measured − mean)²; None when the measurements do not vary."""
    predicted, measured = np.asarray(predicted, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    total = float(np.sum((measured - measured.mean()) ** 2))
    return 1.0 - float(np.sum((measured - predicted) ** 2)) / total if total > 0 else None


def render_prediction(summary: dict, out_dir: str | Path) -> dict:
    """Draw ``latency_prediction.png`` when the summary has a prediction; returns ``{name: {"file", "caption"}}``."""
    from nps.pipeline.results.figures import _figure

    p = summary.get("latency_prediction")
    if not p:
        return {}
    fig = _figure(13.0, 6.0)
    ax, rel = fig.subplots(1, 2)
    pts = p["points"]
    base = p["base"]
    for i, regime in enumerate(dict.fromkeys(pts["regime"])):
        sel = [j for j, r in enumerate(pts["regime"]) if r == regime]
        ax.scatter([pts["predicted_ms"][j] for j in sel], [pts["measured_ms"][j] for j in sel], s=18, color=f"C{i}",
                   label=f"{regime} ({len(sel)} rows)")
        rel.scatter([pts["c_predicted"][j] for j in sel], [pts["c_measured"][j] for j in sel], s=18, color=f"C{i}",
                    label=f"{regime} ({len(sel)} rows)")
    ax.plot([base["predicted_ms"]], [base["measured_ms"]], marker="D", color="0.2", linestyle="none",
            label="the base network")
    rel.plot([1.0], [1.0], marker="D", color="0.2", linestyle="none", label="the base network")
    lo = min(min(pts["predicted_ms"]), min(pts["measured_ms"]))
    hi = max(max(pts["predicted_ms"]), max(pts["measured_ms"]), base["predicted_ms"], base["measured_ms"])
    ax.plot([lo, hi], [lo, hi], color="0.4", linestyle="--", linewidth=1, label="measured = predicted")
    lo = min(min(pts["c_predicted"]), min(pts["c_measured"]))
    rel.plot([lo, 1.0], [lo, 1.0], color="0.4", linestyle="--", linewidth=1, label="measured = predicted")
    r2 = "n/a" if p["r2"] is None else f"{p['r2']:.3f}"
    r2_rel = "n/a" if p.get("r2_relative") is None else f"{p['r2_relative']:.3f}"
    fig.suptitle(f"Latency on {p['device']} at batch {p['batch']}, {p['threads']} thread(s): R² {r2} in ms, "
                 f"{r2_rel} relative to the base; RMS error {100 * p['error_rms']:.1f} %", fontsize=10)
    ax.set_title("in ms: each network's least median of its passes", fontsize=9)
    ax.set_xlabel("predicted by the latency model (ms)")
    ax.set_ylabel("measured by nps latency, median (ms)")
    paired = "paired with the base, run by run" if p.get("paired") else "over the base timed in the same session"
    rel.set_title(f"relative to the base network: measured {paired}", fontsize=9)
    rel.set_xlabel("predicted c_latency (latency / base latency)")
    rel.set_ylabel("measured latency / base latency")
    for a in (ax, rel):
        a.legend(fontsize=7, loc="upper left")
        a.grid(alpha=0.3)
    path = Path(out_dir) / FILE
    fig.savefig(path, dpi=110)
    bands = "; ".join(f"{r['regime']} {r['space']}: {r['within']} of {r['n']} within ±{r['delta']:g} measured"
                      for r in p["regimes"])
    return {"latency_prediction": {"file": path.name, "caption": (
        f"Measured against predicted latency of {p['n']} subnetworks, in ms (left) and relative to the base network "
        f"(right; R² {r2} in ms, {r2_rel} relative, measured {paired}; median error "
        f"{100 * p['error_median']:+.1f} %; noise IQR/median at most {100 * p['noise_max']:.1f} %, "
        f"{p['noisy']} timing(s) above {100 * p['quiet_limit']:.0f} %{_paired_words(p)})"
        + (f". {bands}" if bands else "") + ".")}}


def _paired_words(p: dict) -> str:
    """The caption's words on the paired rows' ratio noise (nothing when no row was timed paired)."""
    if not p.get("paired"):
        return ""
    return (f"; {p['paired']} row(s) timed paired with the base, their ratio's IQR/median at most "
            f"{100 * p['paired_noise_max']:.1f} %, {p['paired_noisy']} above {100 * p['quiet_limit']:.0f} %")
