"""How fast the `nps` command answers: wall seconds of `nps --help`, every `nps COMMAND --help`, `nps presets` and
`nps status` on a 5,000-row results file, each the median of --repeats fresh processes, one JSON line per command.

The baseline is the same commands of another checkout of nps, given with --pythonpath (a directory holding an `nps`
package whose pipeline/kernels/datasets link to that checkout): run it once for each and compare the lines. The
targets (issue 19): --help 0.3 s, presets 0.5 s, status on 5,000 rows 1 s.

    python tools/bench_cli.py [--pythonpath DIR] [--label NAME] [--repeats 5] [--status-file FILE.h5]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

COMMANDS = ["convert", "sample", "run", "status", "report", "export", "presets"]


def wall(argv, env, repeats: int) -> tuple[float, int]:
    times, code = [], 0
    for _ in range(repeats):
        started = time.perf_counter()
        code = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
        times.append(time.perf_counter() - started)
    return statistics.median(times), code


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pythonpath", default="", help="import nps from here instead of the installed one")
    ap.add_argument("--label", default="this checkout")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--status-file", help="a 5,000-row results file (default: made with make_synthetic_results)")
    args = ap.parse_args()
    env = {**os.environ, "COLUMNS": "120"}
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath
    nps = [sys.executable, "-m", "nps.pipeline.cli"]
    status_file = args.status_file
    if status_file is None:
        status_file = os.path.join(tempfile.mkdtemp(prefix="nps-bench-cli-"), "synthetic.h5")
        subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "make_synthetic_results.py"),
                        status_file, "--rows", "5000"], check=True, stdout=subprocess.DEVNULL)
    cases = [("nps --help", ["--help"])] + [(f"nps {c} --help", [c, "--help"]) for c in COMMANDS]
    cases += [("nps presets", ["presets"]), ("nps status (5,000 rows)", ["status", status_file])]
    for name, argv in cases:
        seconds, code = wall(nps + argv, env, args.repeats)
        print(json.dumps({"command": name, "checkout": args.label, "median_s": round(seconds, 3), "exit": code,
                          "repeats": args.repeats}), flush=True)


if __name__ == "__main__":
    main()
