"""`nps report`: EDFs, distributions, mCB fits and winners of a results file as PNGs, index.html and summary.json."""
from __future__ import annotations

import argparse
import contextlib

from nps.pipeline.catalog import DEFAULT_BOOTSTRAP, DEFAULT_EDF_POINTS

EPILOG = """\
what it writes (DIR is assembled under a temporary name and renamed into place):
  DIR/index.html                 the summary table, space comparisons, fits and every figure
  DIR/summary.json               every number the figures show
  DIR/regime_<target>_<value>.png  per regime: accuracy-drop EDFs with bootstrap bands, distributions of std(r),
                                 c_flops, c_params and mCB, drop vs mCB, the winning recipe of each space
  DIR/spaces.png                 mean drop per space and regime with bootstrap intervals
  DIR/best_k.png                 params (FLOPs) of the best k per c_flops (c_params) regime
  DIR/optimal_mcb.png            mCB of the best k vs FLOPs reduction, fitted curve, uniform recipe
  DIR/drop_vs_mcb.png            accuracy drop of each regime's winner vs its mCB, fitted form

Works on a file a run is still writing: finished rows are analysed, pending/running ones counted.

example:
  nps report runs/demo/results.h5 --out runs/demo/report
"""


def register(sub) -> None:
    p = sub.add_parser("report", help="figures, index.html and summary.json from a results file",
                       description="Analyse the finished subnetworks of a results file (paper section 3): "
                                   "accuracy-drop EDFs per space with bootstrap bands, distributions, the best-k "
                                   "subnetworks, the optimal mCB and the drop-vs-mCB fit.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", metavar="RESULTS.h5", help="results file written by nps run (or nps sample)")
    p.add_argument("--out", required=True, metavar="DIR", help="report directory to write")
    p.add_argument("--k", type=int, default=40, help="best subnetworks per regime (default 40, as the paper)")
    p.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP,
                   help=f"bootstrap resamples for EDF bands and comparisons (default {DEFAULT_BOOTSTRAP})")
    p.add_argument("--edf-points", type=int, default=DEFAULT_EDF_POINTS,
                   help=f"points of each regime's accuracy-drop grid (default {DEFAULT_EDF_POINTS})")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists and is not empty")
    p.set_defaults(func=run)


def run(args) -> int:
    from nps.pipeline.errors import NpsError
    from nps.pipeline.results.report import write_report
    from nps.pipeline.views.console import make_console
    from nps.pipeline.words import plural

    if args.edf_points < 2:
        raise NpsError(f"--edf-points {args.edf_points}: use at least 2")
    console = make_console()
    with console.status("analysing and drawing", spinner="dots") if console.is_terminal else contextlib.nullcontext():
        summary = write_report(args.results, args.out, k=args.k, n_boot=args.bootstrap, seed=args.seed,
                               edf_points=args.edf_points, force=args.force)
    console.print(summary_table(summary))
    for note in summary["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}")
    for pruning, fits in summary.get("fits", {}).items():
        for key, label in (("optimal_mcb", "optimal mCB"), ("drop_vs_mcb", "drop vs mCB")):
            fit = fits[key]["fit"]
            if fit["kind"] != "none":  # only the fits the figures draw are given as laws; the others are notes
                params = ", ".join(f"{k}={v:.4g}" for k, v in fit["params"].items())
                r2 = "n/a" if fit["r2"] is None else f"{fit['r2']:.3f}"
                drawn = "" if fit.get("drawn", True) else f"; {fit.get('not_drawn') or 'not drawn'}"
                console.print(f"{label} ({pruning.removesuffix('s')} spaces): {fit['formula']} with {params} "
                              f"(R²={r2}, n={fit['n']}{drawn})")
    figures = plural(len(summary.get("figures", {})), "figure")
    console.print(f"wrote {args.out}/index.html ({figures}) and summary.json")
    return 0



def summary_table(summary: dict):
    """One line per space and regime (its cells never wrap: a narrow terminal cuts them, a log keeps them whole)."""
    from rich.table import Table

    from nps.pipeline.words import plural

    c = summary["counts"]
    band = summary["settings"]["band"]
    t = Table(title=f"{c['finished']} finished of {plural(c['total'], 'row')} ({c['pending']} pending, "
                    f"{c['running']} running, {c['failed']} failed)")
    for name, justify in (("regime", "left"), ("space", "left"), ("done", "right"), ("best", "right"),
                          (f"mean drop [{band[1] - band[0]:g}% CI]", "right"), ("P(top)", "right")):
        t.add_column(name, justify=justify, no_wrap=True)
    for reg in summary["regimes"]:
        comp = reg.get("comparison")
        for s in reg["spaces"]:
            if s["n"]:
                d = s["drop"]
                ci = d["mean_ci"]
                mean = f"{d['mean']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{d['mean']:.2f} (n < 10)"
                t.add_row(reg.get("id", reg["key"]), s["space"], f"{s['n']}/{s['counts']['total']}",
                          f"{s['winner']['acc_drop']:.2f}", mean,
                          f"{comp['prob_best'][s['space']]:.2f}" if comp and s["space"] in comp["prob_best"] else "–")
            else:
                t.add_row(reg.get("id", reg["key"]), s["space"], f"0/{s['counts']['total']}", "–", "–", "–")
    t.caption = ("drops in percentage points; P(top): bootstrap probability that the space's EDF is the highest, among "
                 "the spaces with at least 10 rows (–: fewer)")
    return t
