"""Population scale in seconds: wall time of `nps status` and `nps report` on a 5,000-row results file in 12 regimes
(tools/make_synthetic_results.py), each the median of --repeats fresh processes, one JSON line per command::

    {"bench": "scale", "command", "checkout", "rows", "median_s", "exit", "repeats", "target_s": 30,
     "baseline": "the same command of the checkout given with --pythonpath"}

The baseline is the same commands of another checkout of nps, given with --pythonpath (a directory holding an `nps`
package whose pipeline/kernels/datasets link to that checkout): run this once for each, on the same file
(--results), and compare the lines. The target (issue 11): each command within 30 s on 2 CPU cores.
tests/test_scale.py checks the counted side (each column read once, each figure drawn once); this measures seconds.

usage: python tools/bench_scale.py [--pythonpath DIR] [--label NAME] [--repeats 3] [--results FILE.h5] > scale.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import h5py
from bench_cli import wall  # median wall seconds of fresh processes, measured one way

TARGET_S = 30.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pythonpath", default="", help="import nps from here instead of the installed one")
    ap.add_argument("--label", default="this checkout")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", type=int, default=5000, help="rows of the synthetic file (when --results is not given)")
    ap.add_argument("--results", help="a results file (default: made with make_synthetic_results.py)")
    args = ap.parse_args()
    env = {**os.environ, "COLUMNS": "120"}
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath
    work = tempfile.mkdtemp(prefix="nps-bench-scale-")
    results = args.results
    if results is None:
        results = os.path.join(work, "synthetic.h5")
        subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "make_synthetic_results.py"),
                        results, "--rows", str(args.rows)], check=True, stdout=subprocess.DEVNULL)
    with h5py.File(results, "r") as f:
        rows = sum(len(space["status"]) for space in f["spaces"].values())
    nps = [sys.executable, "-m", "nps.pipeline.cli"]
    cases = [("nps status", ["status", results]), ("nps report", ["report", results, "--out", f"{work}/report"])]
    for name, argv in cases:
        seconds, code = wall(nps + argv, env, args.repeats)
        print(json.dumps({"bench": "scale", "command": name, "checkout": args.label, "rows": rows,
                          "median_s": round(seconds, 2), "exit": code, "repeats": args.repeats,
                          "target_s": TARGET_S,
                          "baseline": "the same command of the checkout given with --pythonpath"}), flush=True)


if __name__ == "__main__":
    main()
