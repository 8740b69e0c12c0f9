"""What `nps status FILE` shows: the per-space summary of a results file, also while a run writes it.

The same :class:`~nps.pipeline.run.state.SpaceState` as the live view, computed the same way
(:meth:`SpaceState.from_rows`), from the file's status and top-1 columns (SWMR: also while a run writes it).
"""
from __future__ import annotations

import math

from rich.console import Group
from rich.text import Text

from nps.pipeline.run.state import SpaceState
from nps.pipeline.views.terminal import fmt, space_table
from nps.pipeline.words import plural


def file_states(reader) -> list[SpaceState]:
    """Per-space states of an open results file (a :class:`~nps.pipeline.results.store.ResultsReader` or the store)."""
    base_top1 = float(reader.attrs.get("base_top1", math.nan))
    out = []
    for name in reader.spaces():
        cols = reader.read(name, ["status", "top1"])
        out.append(SpaceState.from_rows(name, cols["status"], cols["top1"], base_top1, reader.epochs(name)))
    return out


def results_table(path: str, title: str | None = None):
    """The per-space table of a results file, as `nps status` shows it: also the table `nps run` ends with. Both
    read the file, not the run's memory: the file keeps top-1 in float32, the run's ledger in float64, and a median
    drop on a rounding edge (61.075) showed as 61.08 from one and 61.07 from the other."""
    from nps.pipeline.results.reader import open_readonly

    with open_readonly(path) as reader:
        states = file_states(reader)
        base_top1 = float(reader.attrs.get("base_top1", math.nan))
    return space_table(states, base_top1, title)


def status_renderable(path: str):
    """What `nps status FILE` prints: header lines and the per-space table."""
    from nps.pipeline.results.reader import open_readonly

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
             Text(f"base network: top-1 {fmt(base_top1)}, top-5 {fmt(float(attrs.get('base_top5', math.nan)))}"
                  if math.isfinite(base_top1) else "base network: not evaluated yet")]
    if pid and not states:
        lines.append(Text(f"a run is writing this file (pid {pid}): it is preparing (sampling its spaces)"))
    elif pid:
        lines.append(Text(f"a run is writing this file (pid {pid}): {done + failed}/{plural(total, 'subnetwork')} "
                          "finished"))
    else:
        state = "complete" if done + failed == total and total else "not running"
        hint = "; `nps run` with the same arguments resumes it" if state != "complete" else ""
        if running and not pid:
            hint += f" ({plural(running, 'row')} left 'running' by a stopped run will be redone)"
        lines.append(Text(f"{state}: {done} done, {failed} failed of {plural(total, 'subnetwork')}{hint}"))
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
