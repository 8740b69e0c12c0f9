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
import time

import numpy as np
from rich.console import Console

from nps.pipeline.run.state import RunState, SpaceState, WorkerState
from nps.pipeline.views.terminal import LiveView

# (workers, nodes, spaces, rows per space): one machine, the fleet tests/test_live.py draws, 16 times that
FLEETS = [(2, 1, 3, 10), (256, 8, 60, 100), (4096, 8, 960, 1600)]


def fleet_state(workers: int, nodes: int, spaces: int, rows: int) -> RunState:
    """A run's state: three of four workers training, half of the spaces finished, the others half done."""
    state = RunState("bench", "runs/bench/results.h5", base_top1=93.0)
    for wid in range(workers):
        node = wid * nodes // workers
        worker = WorkerState("cuda", node=f"10.0.0.{node}/n{node}")
        if wid % 4:
            worker.phase, worker.space, worker.rows = "cohort", "std-0.05@c_flops=0.1", [wid]
            worker.epoch, worker.epochs, worker.img_per_s = 2, 50, 1000.0
        else:
            worker.phase = "idle"
        state.workers[wid] = worker
    rng = np.random.default_rng(0)
    for i in range(spaces):
        done = rows if i < spaces // 2 else rows // 2
        status = np.array([2] * done + [0] * (rows - done))
        top1 = np.concatenate([93.0 - rng.gamma(2.0, 1.0, done), np.full(rows - done, np.nan)])
        space = SpaceState.from_rows(f"std-0.05@c_flops={0.01 * (i + 1):g}", status, top1, 93.0)
        state.spaces[space.name] = space
    return state


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
