"""What `nps run` shows while it works: the views of :class:`~nps.pipeline.run.state.RunView`.

The run driver (:mod:`nps.pipeline.run`) keeps a :class:`~nps.pipeline.run.state.RunState` up to date (its per-space
counts read from the row ledger) and tells a view about it; this module only renders. Two views:

- :class:`LiveView` (stdout is a terminal): a rich ``Live`` display redrawn a few times a second: the overall
  progress bar with its ETA, one line per worker, by node and device (what it trains, epoch, step, img/s), and the
  per-space table (done / failed / running / pending, best and median accuracy drop so far);
- :class:`PlainView` (a pipe or a log file): one line per finished subnetwork (space, row, top-1, accuracy drop,
  c_flops, training seconds) and one per phase, nothing redrawn.

:func:`space_table` renders the per-space summary for both, and for `nps status` (:mod:`nps.pipeline.views.status`).
"""
from __future__ import annotations

import math
import time

from rich.console import Console, Group
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from nps.pipeline.row_status import RowStatus
from nps.pipeline.run.state import RowFinished, RunState, SpaceState, WorkerState
from nps.pipeline.views.console import make_console
from nps.pipeline.words import plural

# --------------------------------------------------------------------------------------------------------------------
# Rendering pieces shared by the live view and `nps status`.


def fmt(x: float, spec: str = ".2f") -> str:
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
                  str(s.pending), fmt(s.best_top1), fmt(s.best_drop), fmt(s.median_drop))
    if math.isfinite(base_top1):
        t.caption = f"accuracy drop = base top-1 ({base_top1:.2f}) − subnetwork top-1, percentage points"
        t.caption_justify = "left"
    return t


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
    return shown, (f"{hidden} more spaces not shown ({len(finished)} finished, {plural(done, 'subnetwork')} done); "
                   "`nps status FILE` lists every space")


class LiveView:
    """The rich live display (a terminal). On a cluster (more than MAX_WORKER_LINES workers) it lists workers by
    node, one line each; beyond MAX_SPACE_LINES spaces it lists the ones still running or pending."""

    def __init__(self, console: Console | None = None, refresh_s: float = 0.25):
        self.console = console or make_console()
        self.refresh_s = refresh_s
        self._last = 0.0
        self._live = None
        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                  TextColumn("{task.percentage:>5.1f}%"), TextColumn("elapsed"), TimeElapsedColumn(),
                                  TextColumn("ETA"), TimeRemainingColumn(), console=self.console)
        self._task = None

    def start(self, state: RunState) -> None:
        from rich.live import Live

        # transient: the command prints the final table itself once the display is gone
        self._live = Live(self.render(state), console=self.console, auto_refresh=False, transient=True)
        self._live.start()

    def render(self, state: RunState):
        """What the display shows for ``state`` (a rich renderable): the overall progress bar at the state's work
        done, the workers (by node on a cluster), the spaces (the finished ones folded beyond MAX_SPACE_LINES)."""
        if self._task is None:
            self._task = self._progress.add_task("overall", total=max(state.work_total, 1e-9),
                                                 completed=state.work_done)
        else:
            self._progress.update(self._task, total=max(state.work_total, 1e-9), completed=state.work_done)
        return self._render(state)

    def _render(self, state: RunState):
        head = Text.assemble((f"nps run {state.name}", "bold"), f" → {state.results_path}   ",
                             f"base top-1 {fmt(state.base_top1)}" if math.isfinite(state.base_top1)
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
        self._live.update(self.render(state), refresh=True)

    def note(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)

    def epoch(self, state: RunState, wid: int, text: str) -> None:
        w = state.workers[wid]
        if w.phase != "cohort":  # base training: keep its epochs on screen
            self.console.print(f"{w.device}: {text}", markup=False, highlight=False)

    def row_finished(self, state: RunState, row: RowFinished) -> None:
        if row.status == RowStatus.FAILED:
            self.console.print(f"[red]{escape(row.space)} row {row.row} failed:[/red] {escape(row.error)}")

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

    def row_finished(self, state: RunState, row: RowFinished) -> None:
        s = state.spaces[row.space]
        counts = f"({s.finished}/{s.total} finished)"
        if row.status == RowStatus.FAILED:
            self._print(state, f"{row.space} row {row.row}: failed: {row.error} {counts}")
            return
        self._print(state, f"{row.space} row {row.row}: top1 {fmt(row.top1)} acc_drop {fmt(row.acc_drop)} "
                           f"c_flops {fmt(row.c_flops, '.4f')} train_s {fmt(row.train_s, '.1f')} {counts}")

    def stop(self, state: RunState) -> None:
        pass
