"""``index.html`` of a report: the summary table, the space comparisons, the fits and every figure, from the
summary that :mod:`nps.pipeline.results.report` builds (the same numbers as ``summary.json``)."""
from __future__ import annotations

import html

from nps.pipeline.results.figures import band_text, baseline_ratio, beats_text

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
        cells = [f"<td class=l>{html.escape(reg.get('id', reg['key']))}</td>",
                 f"<td class=l>{html.escape(s['space'])}</td>"]
        cells += [f"<td>{c[n]}</td>" for n in ("total", "done", "pending", "running", "failed", "nan")]
        if s["n"]:
            d, w = s["drop"], s["winner"]
            cells += [f"<td>{w['acc_drop']:.3f} (row {w['row']})</td>", f"<td>{d['median']:.3f}</td>",
                      f"<td>{d['mean']:.3f} {_interval(d['mean_ci'], s['n'])}</td>",
                      f"<td>{_fmt(s['edf']['area'])}</td>",
                      f"<td>{_fmt(comp['prob_best'].get(s['space']), '.2f') if comp else '–'}</td>",
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
    return beats_text(beats) or "–"


def _interval(ci, n: int) -> str:
    """``[lo, hi]``, or where n is too small for an interval, the count that says so."""
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else f"(n = {n}: no interval)"


def _baseline_rows(summary: dict) -> list[str]:
    """One line per regime with a trained baseline row."""
    rows = []
    for reg in summary["regimes"]:
        b = reg.get("baseline")
        if not b:
            continue
        if b.get("n"):
            rows.append(f"<tr><td class=l>{html.escape(reg.get('id', reg['key']))}</td>"
                        f"<td class=l>{html.escape(b.get('space', ''))}</td><td>{baseline_ratio(b):.4f}</td>"
                        f"<td>{b['c_flops']:.4f}</td><td>{b['c_params']:.4f}</td><td>{b['mcb']:.3f}</td>"
                        f"<td>{b['top1']:.2f}</td><td>{b['acc_drop']:.3f}</td></tr>")
        else:
            rows.append(f"<tr><td class=l>{html.escape(reg.get('id', reg['key']))}</td><td colspan=7>not trained yet "
                        f"({b['counts']['pending'] + b['counts']['running']} pending, {b['counts']['failed']} "
                        "failed)</td></tr>")
    return rows


def _comparisons_html(summary: dict) -> list[str]:
    """Per regime, P(row space's EDF area > column space's)."""
    e = html.escape
    parts: list[str] = []
    comps = [r for r in summary["regimes"] if r.get("comparison")]
    if comps:
        parts.append("<h2>Which space's EDF is higher</h2><p>P(row space's EDF area &gt; column space's), from "
                     "paired bootstrap draws; the EDF area is the mean of F over the regime's e-grid, so a higher "
                     "area means a lower mean drop. Only spaces with at least 10 finished rows are compared.</p>")
        for reg in comps:
            names = list(reg["comparison"]["prob_best"])
            head = "".join(f"<th>{e(n)}</th>" for n in names)
            parts.append(f"<h3>{e(reg.get('id', reg['key']))}</h3><table><tr><th class=l></th>{head}</tr>")
            for a in names:
                cells = "".join("<td>–</td>" if a == b else f"<td>{reg['comparison']['prob_higher'][a][b]:.3f}</td>"
                                for b in names)
                parts.append(f"<tr><th class=l>{e(a)}</th>{cells}</tr>")
            parts.append("</table>")
    return parts


def _fits_html(summary: dict) -> list[str]:
    """The fits of each kind of pruning, whether each is drawn and why not."""
    e = html.escape
    parts: list[str] = []
    parts.append("<h2>Fits</h2><p>Per kind of pruning (filter and weight regimes are never fitted together). A fit "
                 "is drawn in its figure only when it leaves at least 2 degrees of freedom and R² ≥ 0.5; "
                 "otherwise the figure shows the points alone and says why.</p><table><tr><th class=l>pruning</th>"
                 "<th class=l>what</th><th class=l>form</th><th class=l>parameters</th>"
                 "<th>n</th><th>R²</th><th>RMSE</th><th class=l>drawn</th><th class=l>note</th>"
                 "<th class=l>why this form</th></tr>")
    for pruning, fits in (summary.get("fits") or {}).items():
        for label, key in (("optimal mCB vs remaining FLOPs (best-k points)", "optimal_mcb"),
                           ("accuracy drop vs mCB (each regime's best network)", "drop_vs_mcb")):
            f = fits[key]["fit"]
            params = ", ".join(f"{k} = {v:.4g}" for k, v in f["params"].items()) or "–"
            drawn = "yes" if f.get("drawn") else (f.get("not_drawn") or "no")
            parts.append(f"<tr><td class=l>{e(pruning)}</td><td class=l>{label}</td><td class=l>{e(f['formula'])}"
                         f"</td><td class=l>{e(params)}</td><td>{f['n']}</td><td>{_fmt(f['r2'])}</td>"
                         f"<td>{_fmt(f['rmse'], '.3g')}</td><td class=l>{e(drawn)}</td><td class=l>{e(f['note'])}</td>"
                         f"<td class=l>{e(fits[key].get('why', ''))}</td></tr>")
    parts.append("</table>")
    return parts


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
        parts.append("<h2>Uniform baselines</h2><p>Per regime and kind of pruning, its own uniform baseline, trained "
                     "like every other row: for filter spaces <code>baseline</code>, the one uniform pruning ratio "
                     "whose integer channel counts come closest to the target (paper §3.1's reference); for weight "
                     "spaces <code>weights:uniform</code>, the same sparsity in every layer. A space is only ever "
                     "compared with the baseline of its own kind. <i>Beats the baseline</i>: the fraction of a "
                     f"space's finished subnetworks with a lower accuracy drop, with its {band} Wilson score "
                     f"interval from {s['min_interval_n'] if 'min_interval_n' in s else 10} rows on (below, the "
                     "count).</p>"
                     "<table><tr><th class=l>regime</th><th class=l>baseline</th><th>ratio</th><th>c_flops</th>"
                     "<th>c_params</th><th>mCB</th>"
                     "<th>top-1</th><th>drop</th></tr>" + "".join(baselines) + "</table>")
    parts += _ratio_study_html(summary.get("ratio_study"))
    parts += _references_html(summary, band)
    parts += _comparisons_html(summary)
    parts += _fits_html(summary)
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


def _references_html(summary: dict, band: str) -> list[str]:
    """Each reference network against the spaces of the regime nearest its FLOPs: the gain of a space's mean top-1
    over the reference's mean over its seeds, with its interval (subnetworks and seeds resampled)."""
    e = html.escape
    refs = [r for r in summary.get("references") or [] if r.get("spaces")]
    if not refs:
        return []
    rows = []
    for r in refs:
        values = ", ".join(f"{v:.2f}" for v in r.get("top1_values") or [])
        head = (f"{e(r['model'])} (c_flops {_fmt(r.get('c_flops'))}; top-1 {_fmt(r.get('top1'), '.2f')}"
                + (f" = mean of {r['seeds']} seeds: {values}" if r.get("seeds", 1) > 1 else "") + ")")
        for space, sp in r["spaces"].items():
            ci = sp.get("gain_ci")
            gain = _fmt(sp["gain"], "+.2f") + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else " (n &lt; 10: no interval)")
            rows.append(f"<tr><td class=l>{head}</td><td class=l>{e(space)}</td><td>{sp['n']}</td>"
                        f"<td>{gain}</td><td>{_fmt(sp['best_gain'], '+.2f')}</td>"
                        f"<td>{_beats_text(sp['beats'])}</td></tr>")
            head = ""
    return ["<h2>Reference networks</h2><p>Each reference (trained like the base network) against every space of "
            "the regime nearest its FLOPs. <i>Gain</i>: the space's mean top-1 minus the reference's (its mean over "
            f"seeds), in percentage points, with a {band} bootstrap interval that resamples the subnetworks and the "
            "reference's seeds independently; <i>best</i>: the space's best subnetwork minus the reference; "
            "<i>beats</i>: the fraction of subnetworks above the reference.</p>"
            "<table><tr><th class=l>reference</th><th class=l>space</th><th>n</th><th>gain (pp)</th>"
            "<th>best (pp)</th><th>beats</th></tr>" + "".join(rows) + "</table>"]


def _layer_table_html(summary: dict) -> list[str]:
    """The prunable groups and each regime's winning recipe, per group (folded away when there are many)."""
    e = html.escape
    m = summary["model"]
    groups, channels = m["groups"], m["channels"]
    granularity = m.get("granularity") or [1] * len(groups)
    members = m.get("members") or [[] for _ in groups]
    winners = [(reg.get("id", reg["key"]), s["space"], s["winner"]) for reg in summary["regimes"] for s in reg["spaces"]
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
