"""``nps report``: figures, ``index.html`` and ``summary.json`` from a results file (paper §3, Figures 2–5).

:func:`build_summary` reads results.h5 (read-only, SWMR: a file a run is still writing works) and returns the
analysis of :func:`nps.pipeline.results.analysis.summarize` plus what the file says about its model; :func:`render` draws
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
import shutil
from pathlib import Path

import numpy as np

from nps.kernels.spaces import parse_space_key
from nps.pipeline import __version__ as NPS_VERSION
from nps.pipeline.results.analysis import (
    BASELINE, DEFAULT_BAND, DEFAULT_BOOTSTRAP, DEFAULT_EDF_POINTS, Population, regime_key, summarize,
)
from nps.pipeline.results.figures import band_text, baseline_ratio, percent, render
from nps.pipeline.results.retraining_study import RATIOS
from nps.pipeline.errors import NpsError, environment_error
from nps.pipeline.results.store import DONE, FAILED, PENDING, RUNNING, open_readonly

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
    overrides = _text(g.attrs.get("overrides", ""))
    if overrides and space not in (RATIOS, BASELINE):  # one space in several settings: tell them apart
        space = f"{space} ({overrides})"
    method = _text(g.attrs.get("method", ""))
    if "retrain_spec" in g.attrs:  # the space's own retraining recipe (nps.pipeline.training.spec.SpaceSpec)
        method = json.loads(_text(g.attrs["retrain_spec"])).get("method", method)
    return Population(group=group, space=space, target=target, value=value, counts=counts,
                      row=np.flatnonzero(ok), delta=delta, criterion=_text(g.attrs.get("criterion", "")),
                      method=method, epochs=int(g.attrs.get("epochs", 0)), **pick)


def _layer_table(reader):
    from nps.pipeline.network.layer_table import LayerTable

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
    units = np.asarray(table.units, dtype=np.float64)  # the forms are written over units (channels / granularity)
    r_max = 1.0 - 0.5 / float(np.min(units))
    ratios = np.linspace(0.0, min(DEFAULT_R, r_max), 400)
    keep = (1.0 - ratios[:, None]) * units[None, :]
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
                 "base_params": int(table.base_params), "granularity": [int(g) for g in table.granularity],
                 "members": [list(m) for m in table.members], "flops_convention": table.flops_convention,
                 "channel_multiple": int(table.channel_multiple)}
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
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    try:  # before the analysis: an --out that cannot be written is said at once, naming it
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as exc:
        raise NpsError(environment_error(exc, str(out)) or f"--out {out}: {exc}") from None
    try:
        summary = build_summary(results, k=k, n_boot=n_boot, seed=seed, edf_points=edf_points)
        summary["figures"] = render(summary, tmp)
        with open(tmp / "summary.json", "w") as fh:
            json.dump(summary, fh, indent=1, allow_nan=False)
            fh.write("\n")
        (tmp / "index.html").write_text(render_html(summary))
        _check_out(out, force)  # again: someone may have written there meanwhile
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    except OSError as exc:
        message = environment_error(exc, str(out))
        if message is None:
            raise
        raise NpsError(message) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return summary


# --------------------------------------------------------------------------------------------------------------------
# index.html

_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1400px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}img{max-width:100%;border:1px solid #ddd;margin:0.3em 0}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:0.4em 0.8em;margin:0.3em 0}
figure{margin:1.5em 0}figcaption{color:#555}code{background:#f3f3f3;padding:0 3px}"""


def _convention_text(model: dict) -> str:
    """How the file counts FLOPs (summaries written before conventions existed counted MACs)."""
    if model.get("flops_convention", "macs") == "paper":
        return "the paper's convention: ptflops' count, conv/linear MACs plus bias, BN, ReLU and pooling"
    return "multiply-accumulates of conv and linear layers"


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
                      f"<td>{_fmt(comp['prob_best'][s['space']], '.2f') if comp else '–'}</td>",
                      f"<td>{_beats_text(s.get('beats_baseline'))}</td>"]
        else:
            cells += ["<td>–</td>"] * 6
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return rows


def _ratio_study_html(study: dict | None) -> list[str]:
    """The §2 studies' points: mean drop per criterion, method, epochs and uniform ratio."""
    if not study:
        return []
    rows = "".join(f"<tr><td class=l>{html.escape(p['criterion'])}</td><td class=l>{html.escape(p['method'])}</td>"
                   f"<td>{p['epochs']}</td><td>{p['ratio']:g}</td><td>{p['n']}</td><td>{p['drop_mean']:.3f}</td>"
                   f"<td>{p['drop_std']:.3f}</td></tr>" for p in study["points"])
    return ["<h2>Uniform ratios (paper §2, Fig. 1)</h2><p>Rows of the ratio spaces: every group pruned at one ratio, "
            "by the criterion and retrained by the method for the epochs of its space.</p><table><tr>"
            "<th class=l>criterion</th><th class=l>method</th><th>epochs</th><th>ratio</th><th>rows</th>"
            "<th>mean drop</th><th>std</th></tr>" + rows + "</table>"]


def _beats_text(beats: dict | None) -> str:
    if not beats:
        return "–"
    return f"{percent(beats['fraction'])} [{percent(beats['ci'][0])}, {percent(beats['ci'][1])}]"


def _baseline_rows(summary: dict) -> list[str]:
    """One line per regime with a trained baseline row."""
    rows = []
    for reg in summary["regimes"]:
        b = reg.get("baseline")
        if not b:
            continue
        if b.get("n"):
            rows.append(f"<tr><td class=l>{html.escape(reg['key'])}</td><td>{baseline_ratio(b):.4f}</td>"
                        f"<td>{b['c_flops']:.4f}</td><td>{b['c_params']:.4f}</td><td>{b['mcb']:.3f}</td>"
                        f"<td>{b['top1']:.2f}</td><td>{b['acc_drop']:.3f}</td></tr>")
        else:
            rows.append(f"<tr><td class=l>{html.escape(reg['key'])}</td><td colspan=6>not trained yet "
                        f"({b['counts']['pending'] + b['counts']['running']} pending, {b['counts']['failed']} "
                        "failed)</td></tr>")
    return rows


def render_html(summary: dict) -> str:
    """The report page: counts and notes, the summary table, space comparisons, fits and the figures."""
    e = html.escape
    m = summary.get("model") or {}
    base = summary["base"]
    c = summary["counts"]
    band = band_text(summary)
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>nps report</title><style>{_CSS}</style>"
             "</head><body>", "<h1>Network pruning spaces: report</h1>",
             f"<p><code>{e(summary['results'])}</code> · written {e(summary['created'])} by nps "
             f"{e(summary['nps_version'])}</p>"]
    if m:
        parts.append(f"<p>Base network <b>{e(m['name'])}</b> ({e(m['mode'])} mode, {m['resolution']} px, "
                     f"{m['num_classes']} classes, {len(m['groups'])} prunable groups): "
                     f"{m['base_flops'] / 1e6:,.1f} M FLOPs ({e(_convention_text(m))}), "
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
                 f"<th>mean drop [{band} CI]</th><th>EDF area</th><th>P(highest EDF)</th>"
                 f"<th>beats the baseline [{band} CI]</th></tr>")
    for reg in summary["regimes"]:
        parts += _regime_rows(reg)
    parts.append("</table>")
    baselines = _baseline_rows(summary)
    if baselines:
        parts.append("<h2>Uniform baselines</h2><p>Per regime, the subnetwork with one uniform pruning ratio whose "
                     "integer channel counts come closest to the target, trained like every other row (paper "
                     "§3.1's reference). <i>Beats the baseline</i>: the fraction of a space's finished subnetworks "
                     f"with a lower accuracy drop, with a {band} bootstrap interval over the space's rows.</p>"
                     "<table><tr><th class=l>regime</th><th>ratio</th><th>c_flops</th><th>c_params</th><th>mCB</th>"
                     "<th>top-1</th><th>drop</th></tr>" + "".join(baselines) + "</table>")
    parts += _ratio_study_html(summary.get("ratio_study"))
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
    if m.get("groups"):
        parts += _layer_table_html(summary)
    parts.append("<p>Every number shown here and in the figures is in <a href=summary.json>summary.json</a>.</p>"
                 "</body></html>\n")
    return "\n".join(parts)


def _layer_table_html(summary: dict) -> list[str]:
    """The prunable groups and each regime's winning recipe, per group (folded away when there are many)."""
    e = html.escape
    m = summary["model"]
    groups, channels = m["groups"], m["channels"]
    granularity = m.get("granularity") or [1] * len(groups)
    members = m.get("members") or [[] for _ in groups]
    winners = [(reg["key"], s["space"], s["winner"]) for reg in summary["regimes"] for s in reg["spaces"]
               if s.get("winner") and len(s["winner"].get("keep") or []) == len(groups)]
    head = "".join(f"<th>{e(space)}<br>{e(key)}</th>" for key, space, _ in winners)
    rows = []
    for i, (name, c, g, mem) in enumerate(zip(groups, channels, granularity, members)):
        writers = ", ".join(mem[:3]) + (f" (+{len(mem) - 3})" if len(mem) > 3 else "")
        kept = "".join(f"<td>{w['keep'][i]}</td>" for _, _, w in winners)
        rows.append(f"<tr><td>{i}</td><td class=l>{e(name)}</td><td>{c}</td><td>{g}</td>"
                    f"<td class=l>{e(writers)}</td>{kept}</tr>")
    table = ("<table><tr><th>#</th><th class=l>group</th><th>channels</th><th>multiple</th>"
             f"<th class=l>written by</th>{head}</tr>" + "".join(rows) + "</table>")
    intro = (f"<p>{len(groups)} groups in network order; <i>multiple</i>: every count is a multiple of it (grouped "
             "convs, channel_multiple); the last columns: channels each regime's winning subnetwork keeps.</p>")
    if len(groups) > 40:
        return ["<h2>Layer table</h2>", intro, f"<details><summary>show all {len(groups)} groups</summary>{table}"
                "</details>"]
    return ["<h2>Layer table</h2>", intro, table]
