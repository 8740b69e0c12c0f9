"""`nps status FILE`: the per-space summary of a results file, also while a run is writing it."""
from __future__ import annotations

import argparse
import os


def register(sub) -> None:
    p = sub.add_parser("status", help="summarise a results file (also while a run writes it)",
                       description="Per space: subnetworks done, failed, running and pending, the best top-1 and "
                                   "accuracy drop so far. Reads the file read-only (HDF5 SWMR), so it works while "
                                   "`nps run` is writing it.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", metavar="FILE", help="results.h5, or the run's output directory")
    p.set_defaults(func=run)


def run(args) -> int:
    from nps.pipeline.views.console import make_console
    from nps.pipeline.views.status import status_renderable

    path = args.file
    if os.path.isdir(path):
        path = os.path.join(path, "results.h5")
    renderable, _ = status_renderable(path)
    make_console().print(renderable)
    return 0
