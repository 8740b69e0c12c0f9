"""What `nps run` shows while it works, and what `nps status` shows from a file.

The run driver (:mod:`nps.pipeline.run`) keeps a :class:`RunState` up to date (its per-space counts read from the
row ledger) and tells a view about it; this module only renders. Two views:

- :class:`LiveView` (stdout is a terminal): a rich ``Live`` display redrawn a few times a second: the overall
  progress bar with its ETA, one line per worker, by node and device (what it trains, epoch, step, img/s), and the
  per-space table (done / failed / running / pending, best and median accuracy drop so far);
- :class:`PlainView` (a pipe or a log file): one line per finished subnetwork (space, row, top-1, accuracy drop,
  c_flops, training seconds) and one per phase, nothing redrawn.

:func:`file_states` reads the same per-space summary from a results file (SWMR: also while a run writes it), and
:func:`space_table` renders it for both.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rich.console import Console, Group
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from nps.pipeline.results.store import DONE, FAILED, PENDING, RUNNING


@dataclass
class SpaceState:
    """Counts and best results of one space (a group of results.h5)."""

    name: str
    total: int = 0
    pending: int = 0
    running: int = 0
    done: int = 0
    failed: int = 0
    epochs: int = 0
    best_drop: float = math.nan
    best_row: int = -1
    best_top1: float = math.nan
    median_drop: float = math.nan
    drops: list[float] = field(default_factory=list, repr=False)

    @classmethod
    def from_columns(cls, name: str, status: np.ndarray, acc_drop: np.ndarray, top1: np.ndarray,
                     epochs: int = 0) -> "SpaceState":
        state = cls(name, total=int(status.size), epochs=int(epochs),
                    pending=int(np.count_nonzero(status == PENDING)), running=int(np.count_nonzero(status == RUNNING)),
                    done=int(np.count_nonzero(status == DONE)), failed=int(np.count_nonzero(status == FAILED)))
        for row in np.flatnonzero(status == DONE):
            state.add_done(int(row), float(top1[row]), float(acc_drop[row]))
        return state

    def add_done(self, row: int, top1: float, drop: float) -> None:
        if math.isfinite(top1) and (not math.isfinite(self.best_top1) or top1 > self.best_top1):
            self.best_top1, self.best_drop, self.best_row = top1, drop, row
        if math.isfinite(drop):
            self.drops.append(drop)
            self.median_drop = float(np.median(self.drops))


@dataclass
class WorkerState:
    """One worker as the live view shows it."""

    device: str
    node: str = ""
    phase: str = "starting"
    space: str = ""
    rows: list[int] = field(default_factory=list)
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps: int = 0
    img_per_s: float = math.nan
    since: float = field(default_factory=time.monotonic)


@dataclass
class RunState:
    """Everything the views render; the driver mutates it."""

    name: str
    results_path: str
    base_top1: float = math.nan
    base_note: str = ""
    phase: str = "starting"
    spaces: dict[str, SpaceState] = field(default_factory=dict)
    workers: dict[int, WorkerState] = field(default_factory=dict)
    work_total: float = 0.0
    work_done: float = 0.0
    started: float = field(default_factory=time.monotonic)


# --------------------------------------------------------------------------------------------------------------------
# Rendering pieces shared by the live view and `nps status`.


def _fmt(x: float, spec: str = ".2f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) and math.isfinite(x) else "–"


def space_table(states, base_top1: float = math.nan, title: str | None = None) -> Table:
    """One row per space: counts, best top-1 and its accuracy drop, median drop of the finished rows."""
    t = Table(title=title, title_justify="left", expand=False)
    t.add_column("space")
    for name in ("n", "done", "failed", "running", "pending"):
        t.add_column(name, justify="right")
    t.add_column("best top-1", justify="right")
    t.add_column("best drop", justify="right")
    t.add_column("median drop", justify="right")
    for s in states:
        t.add_row(s.name, str(s.total), str(s.done), str(s.failed) if s.failed else "0", str(s.running),
                  str(s.pending), _fmt(s.best_top1), _fmt(s.best_drop), _fmt(s.median_drop))
    if math.isfinite(base_top1):
        t.caption = f"accuracy drop = base top-1 ({base_top1:.2f}) − subnetwork top-1, percentage points"
        t.caption_justify = "left"
    return t


def file_states(reader) -> list[SpaceState]:
    """Per-space states of an open results file (a :class:`~nps.pipeline.results.store.ResultsReader` or the store)."""
    out = []
    for name in reader.spaces():
        cols = reader.read(name, ["status", "acc_drop", "top1"])
        out.append(SpaceState.from_columns(name, cols["status"], cols["acc_drop"], cols["top1"], reader.epochs(name)))
    return out


def status_renderable(path: str):
    """What `nps status FILE` prints: header lines and the per-space table."""
    from nps.pipeline.results.store import open_readonly

    with open_readonly(path) as reader:
        attrs = reader.attrs
        states = file_states(reader)
        model, resolution = reader.model_info()
    base_top1 = float(attrs.get("base_top1", math.nan))
    name = _config_name(attrs.get("config", ""))
    from nps.pipeline.results.h5file import writer_pid

    pid = writer_pid(path)
    total = sum(s.total for s in states)
    done = sum(s.done for s in states)
    failed = sum(s.failed for s in states)
    running = sum(s.running for s in states)
    lines = [Text.assemble((f"{path}", "bold"), f"  experiment {name}, {model} at {resolution} px, "
                           f"created {attrs.get('created', '?')}"),
             Text(f"base network: top-1 {_fmt(base_top1)}, top-5 {_fmt(float(attrs.get('base_top5', math.nan)))}"
                  if math.isfinite(base_top1) else "base network: not evaluated yet")]
    if pid and not states:
        lines.append(Text(f"a run is writing this file (pid {pid}): it is preparing (sampling its spaces)"))
    elif pid:
        lines.append(Text(f"a run is writing this file (pid {pid}): {done + failed}/{total} subnetworks finished"))
    else:
        state = "complete" if done + failed == total and total else "not running"
        hint = "; `nps run` with the same arguments resumes it" if state != "complete" else ""
        if running and not pid:
            hint += f" ({running} rows left 'running' by a stopped run will be redone)"
        lines.append(Text(f"{state}: {done} done, {failed} failed of {total} subnetworks{hint}"))
    return Group(*lines, space_table(states, base_top1)), states


def _config_name(text: str) -> str:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return str(tomllib.loads(text).get("experiment", {}).get("name", "?"))
    except Exception:  # noqa: BLE001 - a file from `nps sample` has another config
        return "?"


# --------------------------------------------------------------------------------------------------------------------
# Views.


def _worker_line(wid: int, w: WorkerState, node_width: int = 0) -> Text:
    text = Text.assemble((f"{w.node:<{node_width}} " if node_width else "", "cyan"), (f"{w.device:>7} ", "bold cyan"))
    if w.phase == "cohort":
        rows = _rows_text(w.rows)
        text.append(f"{w.space} rows {rows} (k={len(w.rows)})")
    else:
        text.append(w.phase)
    if w.epochs and w.epoch == 0:
        text.append("  pruning, adaptive BN" if w.phase == "cohort" else "  starting")
    elif w.epochs:
        text.append(f"  epoch {w.epoch}/{w.epochs}")
        if w.steps:
            text.append(f" step {w.step}/{w.steps}")
    if math.isfinite(w.img_per_s):
        text.append(f"  {w.img_per_s:,.0f} img/s", style="green")
    return text


def _rows_text(rows: list[int]) -> str:
    if not rows:
        return "-"
    if rows == list(range(rows[0], rows[-1] + 1)) and len(rows) > 2:
        return f"{rows[0]}-{rows[-1]}"
    return ",".join(map(str, rows[:8])) + ("..." if len(rows) > 8 else "")


MAX_WORKER_LINES = 16  # beyond this many workers (a cluster), one line per node instead of one per worker
MAX_SPACE_LINES = 24  # beyond this many spaces, the finished ones fold into the table's caption


def _node_lines(workers: dict[int, WorkerState]) -> list[Text]:
    """One line per node: its workers by phase and their images per second together."""
    nodes: dict[str, list[WorkerState]] = {}
    for w in workers.values():
        nodes.setdefault(w.node, []).append(w)
    width = max(map(len, nodes), default=0)
    lines = []
    for node in sorted(nodes):
        ws = nodes[node]
        phases: dict[str, int] = {}
        for w in ws:
            phase = "training" if w.phase == "cohort" else w.phase
            phases[phase] = phases.get(phase, 0) + 1
        devices = sorted({w.device for w in ws})
        rate = sum(w.img_per_s for w in ws if math.isfinite(w.img_per_s))
        text = Text.assemble((f"{node:<{width}} ", "cyan"), (f"{len(ws)} × {'/'.join(devices)}  ", "bold cyan"),
                             ", ".join(f"{n} {p}" for p, n in sorted(phases.items(), key=lambda item: -item[1])))
        if rate:
            text.append(f"  {rate:,.0f} img/s", style="green")
        lines.append(text)
    return lines


def _shown_spaces(spaces: list[SpaceState]) -> tuple[list[SpaceState], str]:
    """The spaces the live table lists, and a note on those it folds (finished ones first go)."""
    if len(spaces) <= MAX_SPACE_LINES:
        return spaces, ""
    active = [s for s in spaces if s.pending or s.running]
    shown = active[:MAX_SPACE_LINES]
    finished = [s for s in spaces if not (s.pending or s.running)]
    hidden = len(spaces) - len(shown)
    done = sum(s.done for s in finished)
    return shown, (f"{hidden} more spaces not shown ({len(finished)} finished, {done} subnetworks done); "
                   "`nps status FILE` lists every space")


class LiveView:
    """The rich live display (a terminal). On a cluster (more than MAX_WORKER_LINES workers) it lists workers by
    node, one line each; beyond MAX_SPACE_LINES spaces it lists the ones still running or pending."""

    def __init__(self, console: Console | None = None, refresh_s: float = 0.25):
        self.console = console or Console()
        self.refresh_s = refresh_s
        self._last = 0.0
        self._live = None
        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                  TextColumn("{task.percentage:>5.1f}%"), TextColumn("elapsed"), TimeElapsedColumn(),
                                  TextColumn("ETA"), TimeRemainingColumn(), console=self.console)
        self._task = None

    def start(self, state: RunState) -> None:
        from rich.live import Live

        self._task = self._progress.add_task("overall", total=max(state.work_total, 1e-9), completed=state.work_done)
        # transient: the command prints the final table itself once the display is gone
        self._live = Live(self._render(state), console=self.console, auto_refresh=False, transient=True)
        self._live.start()

    def _render(self, state: RunState):
        head = Text.assemble((f"nps run {state.name}", "bold"), f" → {state.results_path}   ",
                             f"base top-1 {_fmt(state.base_top1)}" if math.isfinite(state.base_top1)
                             else state.base_note)
        phase = Text(state.phase, style="yellow")
        if len(state.workers) > MAX_WORKER_LINES:
            workers = _node_lines(state.workers)
        else:
            nodes = {w.node for w in state.workers.values()}
            width = max(map(len, nodes)) if len(nodes) > 1 else 0  # one machine: the device says it all
            workers = [_worker_line(wid, w, width) for wid, w in
                       sorted(state.workers.items(), key=lambda item: (item[1].node, item[1].device, item[0]))]
        spaces, folded = _shown_spaces(list(state.spaces.values()))
        table = space_table(spaces, state.base_top1)
        if folded:
            table.caption = f"{folded}; {table.caption}" if table.caption else folded
            table.caption_justify = "left"
        return Group(head, phase, self._progress, *workers, table)

    def update(self, state: RunState, force: bool = False) -> None:
        if self._live is None:
            return
        now = time.monotonic()
        if not force and now - self._last < self.refresh_s:
            return
        self._last = now
        self._progress.update(self._task, total=max(state.work_total, 1e-9), completed=state.work_done)
        self._live.update(self._render(state), refresh=True)

    def note(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)

    def epoch(self, state: RunState, wid: int, text: str) -> None:
        w = state.workers[wid]
        if w.phase != "cohort":  # base training: keep its epochs on screen
            self.console.print(f"{w.device}: {text}", markup=False, highlight=False)

    def row_finished(self, state: RunState, space: str, row: int, info: dict[str, Any]) -> None:
        if info.get("status") == "failed":
            self.console.print(f"[red]{escape(space)} row {row} failed:[/red] {escape(str(info.get('error', '')))}")

    def stop(self, state: RunState) -> None:
        if self._live is not None:
            self.update(state, force=True)
            self._live.stop()
            self._live = None


class PlainView:
    """One line per finished subnetwork and per phase (stdout is not a terminal)."""

    def __init__(self, stream=None):
        import sys

        self.stream = stream or sys.stdout
        self._phase = ""

    def _print(self, state: RunState, text: str) -> None:
        print(f"[{time.monotonic() - state.started:7.1f}s] {text}", file=self.stream, flush=True)

    def start(self, state: RunState) -> None:
        self._print(state, f"nps run {state.name} → {state.results_path}")

    def update(self, state: RunState, force: bool = False) -> None:
        if state.phase != self._phase:
            self._phase = state.phase
            self._print(state, state.phase)

    def note(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def epoch(self, state: RunState, wid: int, text: str) -> None:
        self._print(state, f"{state.workers[wid].device}: {text}")

    def row_finished(self, state: RunState, space: str, row: int, info: dict[str, Any]) -> None:
        s = state.spaces[space]
        counts = f"({s.done + s.failed}/{s.total} finished)"
        if info.get("status") == "failed":
            self._print(state, f"{space} row {row}: failed: {info.get('error', '')} {counts}")
            return
        self._print(state, f"{space} row {row}: top1 {_fmt(info['top1'])} acc_drop {_fmt(info['acc_drop'])} "
                           f"c_flops {_fmt(info['c_flops'], '.4f')} train_s {_fmt(info['train_s'], '.1f')} {counts}")

    def stop(self, state: RunState) -> None:
        pass
