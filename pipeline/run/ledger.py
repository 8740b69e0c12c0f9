"""The row ledger: the one owner of every row's state while a run goes on.

A row is pending, running, done or failed (the store's codes). The ledger holds that state in memory and writes
every change through to results.h5 before it returns, so the file and the ledger never disagree; the driver asks
the ledger (never the file, never its own counters) what to hand out and what is left, and the live view's counts
are read from it. Rows are handed out in **leases**: the rows of one space given to one worker as one cohort.

- :meth:`RowLedger.take` — up to k pending rows of the first space that has some → a :class:`Lease` (rows running;
  with ``flush=False`` the caller flushes once after several takes, :meth:`flush`);
- :meth:`RowLedger.finish` — the results of leased rows (done or failed), written in one group per space;
- :meth:`RowLedger.requeue` — a lease's rows without a result go back to pending (the worker died, or returned
  without them); a row requeued ``max_attempts`` times fails instead;
- :meth:`RowLedger.fail` — a lease whose cohort raised: its open rows fail with that error;
- :meth:`RowLedger.release` / :meth:`release_in_flight` — stop: open rows back to pending, no attempt counted.

A result for a row that is not open in the lease it names (a late message from a worker already given up) is
refused: nothing finished is written twice. A space carries its own :class:`~nps.pipeline.training.spec.SpaceSpec` (from
its attributes), and a lease holds rows of one space only, so a cohort never mixes rows of different specs.
"""
from __future__ import annotations

import collections
import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import numpy as np

from nps.pipeline.results.store import ResultsStore
from nps.pipeline.row_status import Result, RowStatus
from nps.pipeline.run.forming import POOL
from nps.pipeline.run.protocol import RowResult
from nps.pipeline.run.state import SpaceState
from nps.pipeline.training.spec import SpaceSpec

PENDING, RUNNING, DONE, FAILED = RowStatus

MAX_ATTEMPTS = 2  # a row whose worker died this often while training it is marked failed


def row_cost(epochs: int, c_flops: float) -> float:
    """Estimated work of retraining one row, in base-network epochs (a fixed part plus a part ∝ FLOPs)."""
    return epochs * (0.2 + 0.8 * float(c_flops))


@dataclass
class SpaceRows:
    """The ledger's copy of one space: the file's status column and what dispatch and the view need."""

    name: str
    spec: SpaceSpec
    status: np.ndarray
    top1: np.ndarray
    keep: np.ndarray
    seed: np.ndarray
    c_flops: np.ndarray
    units: np.ndarray
    pending: collections.deque = field(default_factory=collections.deque)
    counts: np.ndarray = field(default_factory=lambda: np.zeros(4, dtype=np.int64))
    attempts: collections.Counter = field(default_factory=collections.Counter)

    @property
    def epochs(self) -> int:
        return int(self.spec.retrain.epochs)

    @property
    def open(self) -> bool:
        """Rows pending or running remain."""
        return bool(self.counts[PENDING] or self.counts[RUNNING])


@dataclass
class Lease:
    """Rows of one space handed to one worker; ``open`` are those without a result yet."""

    id: int
    space: str
    rows: tuple[int, ...]
    worker: int
    open: set[int]
    fraction: float = 0.0  # of the lease's training done, from the worker's progress


class RowLedger:
    """Row state of every space of a results file, written through to ``store``."""

    def __init__(self, store: ResultsStore, *, base_top1: float = math.nan, max_attempts: int = MAX_ATTEMPTS):
        self.store = store
        self.base_top1 = float(base_top1)
        self.max_attempts = int(max_attempts)
        self.spaces: dict[str, SpaceRows] = {}
        self.leases: dict[int, Lease] = {}
        self._next_lease = 0

    # -- spaces ------------------------------------------------------------------------------------------------------

    def load(self, name: str, default: SpaceSpec) -> SpaceRows:
        """Take over a space of the file (rows left running by a dead run must have been reset to pending)."""
        cols = self.store.read(name, ["status", "top1", "c_flops", "keep", "seed"])
        spec = SpaceSpec.from_attrs(self.store.file["spaces"][name].attrs, default)
        status = cols["status"].astype(np.uint8)
        if np.any(status == RUNNING):
            raise RuntimeError(f"{name}: rows left running must be reset before the ledger takes the space")
        rows = SpaceRows(name, spec, status, cols["top1"].astype(np.float64), cols["keep"], cols["seed"],
                         cols["c_flops"], np.array([row_cost(spec.retrain.epochs, c) for c in cols["c_flops"]]))
        rows.counts = np.bincount(status, minlength=4)[:4].astype(np.int64)
        rows.pending.extend(int(r) for r in np.flatnonzero(status == PENDING))
        self.spaces[name] = rows
        return rows

    def add_space(self, name: str, rows: Mapping[str, np.ndarray], spec: SpaceSpec, attrs: Mapping) -> SpaceRows:
        """A new space (all rows pending), in the file and here; its spec goes into its attributes."""
        self.store.add_space(name, rows, epochs=spec.retrain.epochs, attrs={**attrs, **spec.attrs()})
        return self.load(name, spec)

    def set_base_top1(self, top1: float) -> None:
        self.base_top1 = float(top1)

    # -- state changes -----------------------------------------------------------------------------------------------

    def _move(self, s: SpaceRows, rows: np.ndarray, code: int) -> None:
        """The only place a row's status changes in memory (after the file has it)."""
        old = s.status[rows]
        np.subtract.at(s.counts, old, 1)
        s.counts[code] += rows.size
        s.status[rows] = code

    def flush(self) -> None:
        """Make the running marks of ``take(..., flush=False)`` visible to readers."""
        self.store.flush()

    def take(self, k: int, worker: int, *, flush: bool = True, choose=None) -> Lease | None:
        """Up to ``k`` pending rows of the first space with any, marked running; None when nothing is pending.
        ``choose(space, keeps, k)`` (a fused cohort's forming, :mod:`nps.pipeline.run.forming`) picks them by position
        among the first pending rows (their keep vectors given), else they are the first ``k`` in line."""
        s = next((s for s in self.spaces.values() if s.pending), None)
        if s is None:
            return None
        if choose is None:
            rows = [s.pending.popleft() for _ in range(min(int(k), len(s.pending)))]
        else:
            pool = list(itertools.islice(s.pending, POOL))
            rows = [pool[i] for i in choose(s.name, s.keep[np.asarray(pool)], int(k))]
            for row in rows:
                s.pending.remove(row)
        idx = np.asarray(rows, dtype=np.int64)
        if np.any(s.status[idx] != PENDING):
            raise RuntimeError(f"{s.name}: rows {rows} were queued but are not all pending")
        self.store.mark_running(s.name, idx, flush=flush)
        self._move(s, idx, RUNNING)
        self._next_lease += 1
        lease = Lease(self._next_lease, s.name, tuple(rows), worker, set(rows))
        self.leases[lease.id] = lease
        return lease

    def finish(self, results: Iterable[RowResult], lease_of: Mapping[int, int],
               before_commit: Callable[[list[RowResult]], None] | None = None) -> list[RowResult]:
        """Store the results of leased rows (``lease_of`` maps a result's task id to its lease id); returns the ones
        accepted. A result whose row is not open in its lease is refused. ``before_commit`` sees the accepted ones
        before the file marks them finished (the driver writes kept weights there, so a done row has its file)."""
        accepted: dict[str, list[RowResult]] = collections.defaultdict(list)
        for result in results:
            lease = self.leases.get(lease_of.get(result.task_id, -1))
            if lease is None or lease.space != result.space or result.row not in lease.open:
                continue
            lease.open.discard(result.row)
            accepted[result.space].append(result)
        if before_commit is not None and accepted:
            before_commit([r for group in accepted.values() for r in group])
        for space, group in accepted.items():
            s = self.spaces[space]
            self.store.record(space, [r.row for r in group], [r.result for r in group])
            for r in group:
                self._move(s, np.array([r.row]), DONE if r.result.ok else FAILED)
                if r.result.ok:
                    s.top1[r.row] = np.float32(r.result.top1)  # as the file holds it: views agree with nps status
        self._close_empty()
        return [r for group in accepted.values() for r in group]

    def _fail_rows(self, s: SpaceRows, rows: list[int], reason: str) -> None:
        self.store.record(s.name, rows, [Result.failed((s.name, row), reason, train_s=math.nan) for row in rows])
        self._move(s, np.asarray(rows, dtype=np.int64), FAILED)

    def requeue(self, lease_id: int, reason: str) -> list[int]:
        """The lease's open rows back to pending, first in line; those out of attempts fail with ``reason``.
        Returns the rows that failed."""
        lease = self.leases.pop(lease_id, None)
        if lease is None or not lease.open:
            return []
        s = self.spaces[lease.space]
        failed, again = [], []
        for row in sorted(lease.open):
            s.attempts[row] += 1
            (failed if s.attempts[row] >= self.max_attempts else again).append(row)
        if again:
            self.store.mark_pending(s.name, again)
            self._move(s, np.asarray(again, dtype=np.int64), PENDING)
            s.pending.extendleft(reversed(again))
        if failed:
            self._fail_rows(s, failed, reason)
        return failed

    def fail(self, lease_id: int, error: str) -> list[int]:
        """Every open row of the lease fails with ``error`` (its cohort raised); returns them."""
        lease = self.leases.pop(lease_id, None)
        if lease is None or not lease.open:
            return []
        rows = sorted(lease.open)
        self._fail_rows(self.spaces[lease.space], rows, error)
        return rows

    def release(self, lease_id: int) -> list[int]:
        """The lease's open rows back to pending without counting an attempt (a stop request)."""
        lease = self.leases.pop(lease_id, None)
        if lease is None or not lease.open:
            return []
        s = self.spaces[lease.space]
        rows = sorted(lease.open)
        self.store.mark_pending(s.name, rows)
        self._move(s, np.asarray(rows, dtype=np.int64), PENDING)
        s.pending.extendleft(reversed(rows))
        return rows

    def release_in_flight(self) -> int:
        """Every open lease back to pending (the run stops), in their original order; returns the number of rows."""
        return sum(len(self.release(lease_id)) for lease_id in sorted(self.leases, reverse=True))

    def _close_empty(self) -> None:
        for lease_id in [i for i, lease in self.leases.items() if not lease.open]:
            del self.leases[lease_id]

    # -- what is left ------------------------------------------------------------------------------------------------

    def finished(self) -> bool:
        return not any(s.open for s in self.spaces.values())

    def pending(self) -> int:
        return int(sum(len(s.pending) for s in self.spaces.values()))

    def work(self) -> tuple[float, float]:
        """(done, total) in base-network epochs: finished rows, plus the trained part of rows in flight."""
        done = total = 0.0
        for s in self.spaces.values():
            total += float(s.units.sum())
            done += float(s.units[(s.status == DONE) | (s.status == FAILED)].sum())
        for lease in self.leases.values():
            units = self.spaces[lease.space].units
            done += lease.fraction * float(sum(units[r] for r in lease.open))
        return done, total

    def state(self, name: str) -> SpaceState:
        """The live view's summary of a space, read from the ledger."""
        s = self.spaces[name]
        return SpaceState.from_rows(name, s.status, s.top1, self.base_top1, s.epochs)

    def states(self) -> list[SpaceState]:
        return [self.state(name) for name in self.spaces]
