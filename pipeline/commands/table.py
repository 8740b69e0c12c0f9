"""`nps table`: a results file as one row per subnetwork, written as Parquet or CSV."""
from __future__ import annotations

import argparse

EPILOG = """\
Columns: space (key), space_name, target, value, regime, row, status, pruning (filters or weights), top1, top5,
drop, loss, c_flops, c_params, mcb, std, flops, params, seed, train_s, bn_top1, error, weights (kept beside the
file), the recipe and keep counts, and where nps latency measured a row, latency_<device>_b<batch>_ms,
latency_iqr_<device>_b<batch>_ms and speedup_<device>_b<batch>. Parquet keeps recipe and keep as one list per row
(--wide: one column per group); CSV always has one column per group (recipe.<group>, keep.<group>; a weight space's
per layer: recipe.w:<layer>, keep.w:<layer>, empty in the other kind's rows). Needs pandas and pyarrow:
pip install 'nps[pandas]'.
In Python: nps.pipeline.results.load(RESULTS.h5) gives the same table as a DataFrame.

examples:
  nps table runs/demo/results.h5 --out rows.parquet
  nps table runs/demo/results.h5 --out rows.csv
"""


def register(sub) -> None:
    p = sub.add_parser("table", help="one row per subnetwork of a results file, as Parquet or CSV",
                       description="Write every subnetwork of a results file (scores, complexity, recipe, keep "
                                   "counts, measured latency) as one table row, to a .parquet or .csv file.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", metavar="RESULTS.h5", help="results file written by nps run (or nps sample)")
    p.add_argument("--out", required=True, metavar="FILE", help="rows.parquet or rows.csv")
    p.add_argument("--wide", action="store_true", help="Parquet too: one column per group for recipe and keep")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    import os

    from nps.pipeline.errors import NpsError
    from nps.pipeline.results.table import write_table
    from nps.pipeline.views.console import make_console
    from nps.pipeline.words import plural

    if not os.path.exists(args.results):
        raise NpsError(f"{args.results}: no such file")
    if os.path.exists(args.out) and not args.force:
        raise NpsError(f"--out {args.out} exists; pass --force to overwrite it")
    rows, cols = write_table(args.results, args.out, wide=args.wide)
    make_console().print(f"wrote {args.out}: {plural(rows, 'row')} × {plural(cols, 'column')}")
    return 0
