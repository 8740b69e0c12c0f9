"""How long one redraw of `nps run`'s live view takes at fleet and population scale.

The driver redraws the live view every ``LiveView.refresh_s`` (0.25 s): that period is the baseline every line
names, and a redraw must stay far below it. For each fleet (workers on nodes, spaces of rows, half of the spaces
finished and the rest half done) this builds the run's state once, then renders it ``--repeats`` times on a fresh
recording console, as the live display lays it out (``LiveView.render``, 160 columns); the median and the slowest
go out as one JSON line::

    {"bench": "live", "workers", "nodes", "spaces", "rows", "lines", "median_s", "max_s", "repeats",
     "baseline": "the driver's redraw period", "baseline_s": 0.25}

tests/test_live.py checks the counted side (the display keeps its size whatever the fleet); this measures seconds.

usage: python tools/bench_live.py [--repeats 20] > live.jsonl
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console

from nps.pipeline.run.state import RunState
from nps.pipeline.views.terminal import LiveView

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_live import state as fleet_state  # noqa: E402 - the fleets the test draws, built one way

# (workers, nodes, spaces, rows per space): one machine, the fleet tests/test_live.py draws, 16 times that
FLEETS = [(2, 1, 3, 10), (256, 8, 60, 100), (4096, 8, 960, 1600)]


def redraw(view: LiveView, state: RunState) -> tuple[float, int]:
    """Seconds of one render laid out on the view's console, and the lines it made."""
    started = time.perf_counter()
    view.console.print(view.render(state))
    seconds = time.perf_counter() - started
    return seconds, len(view.console.export_text(clear=True).splitlines())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    for workers, nodes, spaces, rows in FLEETS:
        state = fleet_state(workers, nodes, spaces, rows)
        with open("/dev/null", "w") as sink:
            view = LiveView(Console(record=True, width=160, file=sink))
            redraw(view, state)  # the first draw builds rich's caches
            times, lines = [], 0
            for _ in range(args.repeats):
                seconds, lines = redraw(view, state)
                times.append(seconds)
        print(json.dumps({"bench": "live", "workers": workers, "nodes": nodes, "spaces": spaces, "rows": rows,
                          "lines": lines, "median_s": round(statistics.median(times), 4),
                          "max_s": round(max(times), 4), "repeats": args.repeats,
                          "baseline": "the driver's redraw period", "baseline_s": view.refresh_s}), flush=True)


if __name__ == "__main__":
    main()
