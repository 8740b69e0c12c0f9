"""`nps status FILE`: the per-space summary from a results file, also while its writer has it open (SWMR)."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import StandInTable  # noqa: E402
from helpers import rows_for_store as rows

from nps.pipeline.experiment.config import Config
from nps.pipeline.experiment.toml_text import dump
from nps.pipeline.results.h5file import writer_pid
from nps.pipeline.results.store import ResultsStore, open_readonly
from nps.pipeline.row_status import Result
from nps.pipeline.run.state import SpaceState
from nps.pipeline.views.status import file_states, status_renderable


@pytest.fixture
def results(tmp_path):
    """A file mid-run: space a: 2 done (top-1 80, 85), 1 failed, 1 running, 1 pending; space b: all pending."""
    cfg = Config()
    cfg.experiment.name = "status-test"
    path = tmp_path / "results.h5"
    store = ResultsStore.create(path, StandInTable(), dump(cfg), {"base_top1": 90.0, "base_top5": 99.0})
    store.add_space("std-0.05@c_flops=0.25", rows(5), epochs=2)
    store.add_space("std-0.01@c_flops=0.25", rows(3), epochs=2)
    store.record("std-0.05@c_flops=0.25", [0], [Result.done(top1=80.0, top5=97.0, loss=0.5)])
    store.record("std-0.05@c_flops=0.25", [3], [Result.done(top1=85.0, top5=98.0, loss=0.4)])
    store.record("std-0.05@c_flops=0.25", [1], [Result.failed(error="loss became nan/inf at epoch 1 step 3")])
    store.mark_running("std-0.05@c_flops=0.25", [2])
    yield path, store
    store.close()


def test_file_states_count_every_status_and_the_best_drop(results):
    path, store = results
    store.close()  # (one process cannot hold an HDF5 file open twice; the CLI test reads it while it is open)
    with open_readonly(path) as reader:
        states = {s.name: s for s in file_states(reader)}
    a = states["std-0.05@c_flops=0.25"]
    assert (a.total, a.done, a.failed, a.running, a.pending, a.epochs) == (5, 2, 1, 1, 1, 2)
    assert (a.best_top1, a.best_drop, a.best_row) == (85.0, 5.0, 3)
    assert a.median_drop == pytest.approx(7.5)
    b = states["std-0.01@c_flops=0.25"]
    assert (b.total, b.pending, b.done) == (3, 3, 0) and math.isnan(b.best_drop)


def test_renderable_says_who_writes_the_file(results):
    path, store = results
    assert writer_pid(str(path)) == os.getpid()
    store.close()
    assert writer_pid(str(path)) is None
    renderable, states = status_renderable(str(path))
    assert sum(s.done for s in states) == 2
    from rich.console import Console

    console = Console(width=160, record=True, file=open(os.devnull, "w"))
    console.print(renderable)
    text = console.export_text()
    assert "not running: 2 done, 1 failed of 8 subnetworks" in text
    assert "1 row left 'running' by a stopped run will be redone" in text


def test_space_state_tracks_the_best_row():
    status = np.array([2, 2, 2, 0])
    s = SpaceState.from_rows("x", status, np.array([70.0, 75.0, np.nan, 99.0]), 90.0)
    assert (s.best_row, s.best_drop, s.median_drop) == (1, 15.0, 17.5)
    assert (s.total, s.done, s.pending) == (4, 3, 1)  # a pending row's top-1 (NaN in a file) never counts


@pytest.mark.e2e
def test_cli_while_a_writer_has_the_file_open(results):
    path, _ = results
    out = subprocess.run([sys.executable, "-m", "nps.pipeline.cli", "status", str(path.parent)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "experiment status-test" in text and f"a run is writing this file (pid {os.getpid()})" in text
    assert "3/8 subnetworks finished" in text
    assert "std-0.05@c_flops=0.25" in text and "std-0.01@c_flops=0.25" in text
    line = next(line for line in text.splitlines() if "std-0.05@c_flops=0.25" in line)
    assert [c.strip() for c in line.strip("│ ").split("│")] == \
        ["std-0.05@c_flops=0.25", "5", "2", "1", "1", "1", "85.00", "5.00", "7.50"]


@pytest.mark.e2e
def test_cli_on_a_missing_file(tmp_path):
    out = subprocess.run([sys.executable, "-m", "nps.pipeline.cli", "status", str(tmp_path / "none.h5")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no such results file" in out.stderr
