"""The live view at fleet and population scale: workers by node beyond 16 workers, finished spaces folded beyond 24
spaces, and a redraw whose size does not grow with the fleet (tools/bench_live.py measures its seconds)."""
from __future__ import annotations

import numpy as np
from rich.console import Console

from nps.pipeline.run.state import RunState, SpaceState, WorkerState
from nps.pipeline.views.terminal import MAX_SPACE_LINES, LiveView


def state(workers: int, nodes: int, spaces: int, rows: int) -> RunState:
    s = RunState("scale", "runs/scale/results.h5", base_top1=93.0)
    for wid in range(workers):
        node = wid * nodes // workers
        w = WorkerState("cuda", node=f"10.0.0.{node}/n{node}")
        if wid % 4:
            w.phase, w.space, w.rows, w.epoch, w.epochs = "cohort", "std-0.05@c_flops=0.1", [wid], 2, 50
            w.img_per_s = 1000.0
        else:
            w.phase = "idle"
        s.workers[wid] = w
    rng = np.random.default_rng(0)
    for i in range(spaces):
        finished = i < spaces // 2
        done = rows if finished else rows // 2
        status = np.array([2] * done + [0] * (rows - done))
        top1 = np.concatenate([93.0 - rng.gamma(2.0, 1.0, done), np.full(rows - done, np.nan)])
        sp = SpaceState.from_rows(f"std-0.05@c_flops={0.01 * (i + 1):g}", status, top1, 93.0)
        s.spaces[sp.name] = sp
    return s


def render(st: RunState) -> str:
    """The text a fresh live view shows for ``st`` (its public ``render``, printed on a recording console)."""
    view = LiveView(Console(record=True, width=160, file=open("/dev/null", "w")))
    view.console.print(view.render(st))
    return view.console.export_text()


def test_a_machine_lists_every_worker():
    text = render(state(workers=2, nodes=1, spaces=3, rows=10))
    assert text.count("std-0.05@c_flops=0.1 rows") == 1 and "idle" in text
    assert "more spaces not shown" not in text


def test_a_fleet_is_listed_by_node_and_finished_spaces_fold():
    text = render(state(workers=256, nodes=8, spaces=60, rows=100))  # 6,000 rows, 3,000 done
    lines = text.splitlines()
    node_lines = [line for line in lines if "32 × cuda" in line]
    assert len(node_lines) == 8 and all("24 training, 8 idle" in line and "24,000 img/s" in line
                                        for line in node_lines)
    assert "rows" not in text.split("overall")[1].split("space")[0]  # no per-worker lines
    assert "36 more spaces not shown (30 finished, 3000 subnetworks done)" in text
    assert sum(1 for line in lines if "std-0.05@c_flops=" in line) == MAX_SPACE_LINES
    assert len(lines) < 50  # fits a terminal


def test_a_redraw_does_not_grow_with_the_fleet():
    """Redrawn 4 times a second by the driver, the display must cost the same for 16 times the workers, spaces and
    rows: one line per node and at most MAX_SPACE_LINES spaces, whatever the fleet (the work rich does is the lines
    it lays out)."""
    small = render(state(workers=256, nodes=8, spaces=60, rows=100)).splitlines()
    large = render(state(workers=4096, nodes=8, spaces=960, rows=1600)).splitlines()
    assert len(large) == len(small)
    assert sum(1 for line in large if "512 × cuda" in line) == 8
    assert sum(1 for line in large if "std-0.05@c_flops=" in line) == MAX_SPACE_LINES
