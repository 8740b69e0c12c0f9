"""The run's state as plain data: what the ledger and the driver keep up to date and every view reads.

- :class:`SpaceState`: one space's counts and best/median accuracy drop, computed in one place
  (:meth:`SpaceState.from_rows`) from a status and a top-1 column: by the ledger for a running run, and by
  `nps status` from a results file;
- :class:`WorkerState`: one worker: where it runs, what the driver gave it, where its task is;
- :class:`RowFinished`: one row's outcome, as the views print it and ``log.jsonl`` records it;
- :class:`RunState`: all of it, for one run;
- :class:`RunView`: what a view does with them (the rich live view, the plain log lines, a test's recorder).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from nps.pipeline.row_status import RowStatus


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

    @classmethod
    def from_rows(cls, name: str, status: np.ndarray, top1: np.ndarray, base_top1: float,
                  epochs: int = 0) -> "SpaceState":
        """The state of a space whose rows have ``status`` and ``top1``: counts, the best finished row (the lowest
        row among equal top-1s) and the median accuracy drop (base top-1 − top-1) of the finished rows."""
        counts = np.bincount(np.asarray(status, dtype=np.int64), minlength=4)
        state = cls(name, total=int(len(status)), epochs=int(epochs), pending=int(counts[RowStatus.PENDING]),
                    running=int(counts[RowStatus.RUNNING]), done=int(counts[RowStatus.DONE]),
                    failed=int(counts[RowStatus.FAILED]))
        done = np.flatnonzero(status == RowStatus.DONE)
        scores = np.asarray(top1, dtype=np.float64)[done]
        finite = np.isfinite(scores)
        if finite.any():
            best = int(done[finite][np.argmax(scores[finite])])
            state.best_row, state.best_top1 = best, float(top1[best])
            state.best_drop = float(base_top1) - state.best_top1
            state.median_drop = float(np.median(float(base_top1) - scores[finite]))
        return state

    @property
    def finished(self) -> int:
        return self.done + self.failed


@dataclass
class WorkerState:
    """One worker, as the driver tracks it and the views show it."""

    device: str
    node: str = ""
    phase: str = "starting"  # starting, idle, base network, cohort, stopped
    space: str = ""
    rows: list[int] = field(default_factory=list)
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps: int = 0
    img_per_s: float = math.nan
    since: float = field(default_factory=time.monotonic)
    ready: bool = False  # set up (dataset checked, loaders built)
    task: int | None = None  # the task it works on
    base: bool = False  # the task is the base network's
    stopped: bool = False  # it ended its task on a stop request and takes no more

    def idle(self) -> None:
        """Between tasks."""
        self.phase = "stopped" if self.stopped else "idle"
        self.task, self.base, self.space, self.rows, self.epochs, self.img_per_s = None, False, "", [], 0, math.nan


@dataclass(frozen=True)
class RowFinished:
    """One row's outcome: what the views print and ``log.jsonl`` records (``"event": "done" | "failed"``)."""

    space: str
    row: int
    status: RowStatus
    c_flops: float
    top1: float = math.nan
    top5: float = math.nan
    bn_top1: float = math.nan
    acc_drop: float = math.nan
    train_s: float = math.nan
    error: str = ""
    worker: int = -1
    node: str = ""
    device: str = ""


@dataclass
class RunState:
    """Everything the views render; the driver keeps it up to date (the spaces from the ledger)."""

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


@dataclass
class Outcome:
    """How a run ended."""

    status: Literal["complete", "interrupted"]
    results_path: str
    spaces: list[SpaceState]
    base_top1: float
    elapsed_s: float
    resumed: bool = False

    @property
    def done(self) -> int:
        return sum(s.done for s in self.spaces)

    @property
    def failed(self) -> int:
        return sum(s.failed for s in self.spaces)

    @property
    def pending(self) -> int:
        return sum(s.pending + s.running for s in self.spaces)


class RunView(Protocol):
    """What the driver tells a view. A view only renders: it changes no state."""

    def start(self, state: RunState) -> None: ...

    def update(self, state: RunState, force: bool = False) -> None: ...

    def note(self, text: str) -> None: ...

    def epoch(self, state: RunState, wid: int, text: str) -> None: ...

    def row_finished(self, state: RunState, row: RowFinished) -> None: ...

    def stop(self, state: RunState) -> None: ...
