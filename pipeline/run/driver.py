"""The driver: one experiment to completion or interruption, over any worker pool.

It owns the results file (through the :class:`~nps.pipeline.run.ledger.RowLedger`), the files beside it (base.pt,
weights/, log.jsonl) and the terminal; the pool only moves tasks and events. Its loop: poll the pool's events and
apply them (results to the ledger, kept weights to disk, progress to the view), hand every idle worker the next
task (the base network first, then cohorts of pending rows), and stop when the ledger has nothing left.

Ctrl-C (SIGINT, or SIGTERM): the first asks the workers to stop after their current step, results that arrive
meanwhile are still written, then every row in flight goes back to pending and the run returns ``interrupted``; a
second one (or STOP_GRACE_S) ends the workers at once. SIGKILL needs nothing: rows left running are redone by the
next run. ``out/log.jsonl`` gets one JSON line per event (start, base, dispatch, done, failed, requeue,
worker_lost, two_stage, end): which row was trained when and where.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from nps.pipeline.errors import environment_error
from nps.pipeline.experiment.plan import Plan
from nps.pipeline.views.terminal import RunState, SpaceState, WorkerState
from nps.pipeline.run import outputs, resume
from nps.pipeline.run.ledger import RowLedger, row_cost
from nps.pipeline.run.pools import WorkerPool
from nps.pipeline.run.protocol import (
    BaseResult, BaseTask, CohortTask, Note, Progress, Ready, RowResult, TaskEnd, WorkerFailed, WorkerLost,
    WorkerStarted,
)

STOP_GRACE_S = 60.0  # after Ctrl-C, how long workers get to finish their step before they are ended
AUTO_COHORT = {"cpu": 8, "cuda": 32}  # rows handed to a worker at once with cohort_size = "auto"
MAX_BASE_ATTEMPTS = 2  # the base network's task is given again when its worker is lost, this often
REFRESH_S = 0.25


@dataclass
class Outcome:
    """How a run ended."""

    status: str  # "complete" or "interrupted"
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


@dataclass
class _Slot:
    """A worker as the driver tracks it."""

    node: str
    device: str
    ready: bool = False
    task: int | None = None
    stopped: bool = False
    base: bool = False


@dataclass
class _Base:
    todo: bool | None = None  # None: metrics stored; else whether to train (True) or evaluate (False)
    in_flight: bool = False
    attempts: int = 0
    units: float = 0.0
    fraction: float = 0.0
    weights: object = None  # the pool's BaseWeights, once the base network exists


@dataclass
class Driver:
    plan: Plan
    pool: WorkerPool
    view: object
    retry_failed: bool = False
    state: RunState = field(init=False)

    def __post_init__(self):
        self.cfg = self.plan.config
        self.state = RunState(self.cfg.experiment.name, self.plan.results_path)
        self.store = self.ledger = self.weights = self.log_file = None
        self.slots: dict[int, _Slot] = {}
        self.task_lease: dict[int, int] = {}
        self.base = _Base()
        self.next_task = 0
        self.stopping, self.interrupts, self.stop_started = False, 0, 0.0
        self.fatal: WorkerFailed | None = None
        self.failure: str | None = None
        self._last_refresh = 0.0
        self._sampled = {p.key for p in self.plan.spaces if p.kind == "sampled"}  # the spaces two-stage may extend

    # -- bookkeeping -------------------------------------------------------------------------------------------------

    def _log(self, event: str, **fields) -> None:
        if self.log_file is None:
            return
        try:
            self.log_file.write(json.dumps({"t": round(time.time(), 3), "event": event, **fields}, default=float)
                                + "\n")
            self.log_file.flush()
        except OSError as exc:  # a full disk: the run stops (the loop sees the failure); the log stays as it was
            self.failure = self.failure or environment_error(exc, self.log_file.name) or f"log.jsonl: {exc}"
            self.log_file = None

    def _phase(self, text: str) -> None:
        self.state.phase = text
        self._refresh(force=True)

    def _refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_refresh < REFRESH_S:
            return
        self._last_refresh = now
        if self.ledger is not None:
            self.state.spaces = {s.name: s for s in self.ledger.states()}
            done, total = self.ledger.work()
            expected = sum(self.cfg.two_stage.top_k * row_cost(self.cfg.two_stage.full_epochs,
                                                                p.value if p.target == "c_flops" else 0.5)
                           for p in self.plan.spaces if p.kind == "sampled" and self._owes_top(p.key))
            base_done = self.base.units * (1.0 if self.base.todo is None else self.base.fraction)
            self.state.work_total = total + expected + self.base.units
            self.state.work_done = done + base_done
        self.view.update(self.state, force=force)

    def _owes_top(self, key: str) -> bool:
        from nps.kernels.spaces import TOP_SUFFIX

        return self.cfg.two_stage.enabled and key + TOP_SUFFIX not in self.ledger.spaces

    # -- setup -------------------------------------------------------------------------------------------------------

    def prepare(self) -> bool:
        """Open or create results.h5, sample missing spaces, reset running rows; True when resumed."""
        plan = self.plan
        self.state.phase = "opening results"
        self.store, resumed = resume.open_results(plan)
        sampled = resume.sample_missing_spaces(self.store, plan, progress=self._phase)
        redone, retried = resume.reset_rows(self.store, retry_failed=self.retry_failed)
        for name, count in retried.items():
            self.view.note(f"{name}: {count} failed rows will be retried")
        base_top1, self.base.todo = resume.base_state(self.store, plan)
        self.ledger = RowLedger(self.store, base_top1=base_top1)
        self.weights = outputs.WeightsKeeper(plan.results_path, self.cfg.output.keep_weights, self.cfg.output.top_k)
        default = resume.default_spec(plan)
        for name in resume.space_order(self.store.spaces(), plan):
            s = self.ledger.load(name, default)
            self.weights.start_space(name, s.status, s.top1)
        os.makedirs(self.cfg.experiment.out, exist_ok=True)
        self.log_file = open(os.path.join(self.cfg.experiment.out, "log.jsonl"), "a", encoding="utf-8")
        done = sum(s.done for s in self.ledger.states())
        self._log("start", pid=os.getpid(), resumed=resumed, done=done, redo=redone, sampled=sampled,
                  transport=self.pool.kind)
        if resumed:
            self.view.note(f"resuming {plan.results_path}: {done} subnetworks done are kept"
                           + (f", {redone} left running by the last run are redone" if redone else ""))
        self.state.base_top1 = base_top1
        if self.base.todo is None:
            self.base.weights = self.pool.base_weights(self.cfg.model.checkpoint or plan.base_path)
        else:
            self.base.units = float(self.cfg.base.epochs) if self.base.todo else 0.2
            self.state.base_note = "training the base network" if self.base.todo else "evaluating the base network"
        return resumed

    # -- events ------------------------------------------------------------------------------------------------------

    def handle(self, events) -> None:
        """Apply a batch of events: its row results first, stored as one group per space, then the other events in
        order. A worker sends a task's results before its TaskEnd and nothing after its loss, so results first
        keeps every result ahead of the events that close its lease; a result that arrived together with its
        worker's loss is kept instead of being trained again."""
        self._store_results([e for e in events if isinstance(e, RowResult)])
        for event in events:
            if not isinstance(event, RowResult):
                getattr(self, f"_on_{type(event).__name__}")(event)

    def _store_results(self, results: list[RowResult]) -> None:
        if not results:
            return

        def keep_weights(accepted: list[RowResult]) -> None:  # before the status says done
            for r in accepted:
                if r.status == "done" and not self.weights.add(r.space, r.row, r.top1, r.weights):
                    self.view.note(f"{r.space} row {r.row}: its weights were lost with its worker's node before "
                                   "the driver fetched them; the row's results are kept, without weights")
                    self._log("weights_lost", space=r.space, row=r.row, worker=r.worker)

        accepted = self.ledger.finish(results, self.task_lease, before_commit=keep_weights)
        taken = {id(r) for r in accepted}
        for r in results:  # refused (a late duplicate): its staged weights go
            if id(r) not in taken and r.weights is not None:
                outputs.release_weights(r.weights)
        for r in accepted:
            c_flops = float(self.ledger.spaces[r.space].c_flops[r.row])
            slot = self.slots.get(r.worker)
            where = {"worker": r.worker, "node": slot.node if slot else "", "device": slot.device if slot else ""}
            if r.status == "done":
                info = {"status": "done", "top1": r.top1, "top5": r.top5, "bn_top1": r.bn_top1,
                        "acc_drop": self.ledger.base_top1 - r.top1, "c_flops": c_flops, "train_s": r.train_s}
            else:
                info = {"status": "failed", "error": r.error, "c_flops": c_flops}
            self._row_finished(r.space, r.row, {**info, **where})
        for space in {r.space for r in accepted}:
            self._maybe_complete(space)

    def _row_finished(self, space: str, row: int, info: dict) -> None:
        self._log(info["status"], space=space, row=row, **{k: v for k, v in info.items() if k != "status"})
        self.state.spaces[space] = self.ledger.state(space)
        self.view.row_finished(self.state, space, row, info)

    def _rows_failed(self, space: str, rows: list[int], reason: str) -> None:
        for row in rows:
            c_flops = float(self.ledger.spaces[space].c_flops[row])
            self._row_finished(space, row, {"status": "failed", "error": reason, "c_flops": c_flops})
        self._maybe_complete(space)

    def _maybe_complete(self, space: str) -> None:
        if not self.ledger.spaces[space].open:
            self._space_complete(space)

    def _on_WorkerStarted(self, e: WorkerStarted) -> None:
        self.slots[e.worker] = _Slot(e.node, e.device)
        self.state.workers[e.worker] = WorkerState(e.device, node=e.node)

    def _on_Ready(self, e: Ready) -> None:
        slot = self.slots.get(e.worker)
        if slot is not None:
            slot.ready, slot.node, slot.device = True, e.node, e.device
            ws = self.state.workers[e.worker]
            ws.phase, ws.node, ws.device = "idle", e.node, e.device
            self._log("ready", worker=e.worker, node=e.node, device=e.device, threads=e.threads)

    def _on_Progress(self, e: Progress) -> None:
        ws = self.state.workers.get(e.worker)
        if ws is None:
            return
        ws.epoch, ws.epochs, ws.step, ws.steps, ws.img_per_s = e.epoch, e.epochs, e.step, e.steps, e.img_per_s
        fraction = min(1.0, max(0.0, ((e.epoch - 1) + (e.step / e.steps if e.steps else 0)) / max(e.epochs, 1)))
        lease = self.ledger.leases.get(self.task_lease.get(e.task_id, -1))
        if lease is not None:
            lease.fraction = fraction
        elif self.slots[e.worker].base:
            self.base.fraction = fraction
            if e.epoch_end:
                self.view.epoch(self.state, e.worker, f"base epoch {e.epoch}/{e.epochs}: train loss "
                                                      f"{e.train_loss:.3f}, val top-1 {e.val_top1:.2f} "
                                                      f"({e.img_per_s:,.0f} img/s)")

    def _on_BaseResult(self, e: BaseResult) -> None:
        path = self.cfg.model.checkpoint or self.plan.base_path
        if e.checkpoint is not None:
            outputs.write_atomic(self.plan.base_path, e.checkpoint)
        self.store.set_attrs(base_top1=e.top1, base_top5=e.top5, base_loss=e.loss, base_trained=e.trained,
                             base_checkpoint=path)
        self.ledger.set_base_top1(e.top1)
        self.state.base_top1 = e.top1
        self.base.todo, self.base.in_flight = None, False
        self.base.weights = self.pool.base_weights(path)
        what = "trained" if e.trained else "evaluated"
        self.view.note(f"base network {what} in {e.seconds:.0f}s: top-1 {e.top1:.2f}, top-5 {e.top5:.2f}")
        self._log("base_done", worker=e.worker, top1=e.top1, top5=e.top5, loss=e.loss, trained=e.trained,
                  seconds=e.seconds)

    def _on_TaskEnd(self, e: TaskEnd) -> None:
        slot = self.slots.get(e.worker)
        lease_id = self.task_lease.pop(e.task_id, None)
        lease = self.ledger.leases.get(lease_id) if lease_id is not None else None
        if e.environment:
            self.failure = self.failure or e.error
            self._log("task_environment", worker=e.worker, error=e.error)
        if lease is not None:
            if e.stopped or e.environment:
                self.ledger.release(lease.id)
            elif e.error:
                self.view.note(f"[{slot.node if slot else '?'} {slot.device if slot else '?'}] a cohort failed: "
                               f"{e.error}")
                self._log("task_error", worker=e.worker, error=e.error, detail=e.detail)
                self._rows_failed(lease.space, self.ledger.fail(lease.id, e.error), e.error)
            else:
                reason = "the worker returned no result for this row"
                self._rows_failed(lease.space, self.ledger.requeue(lease.id, reason), reason)
        if slot is not None:
            if slot.base and self.base.todo is not None:
                self.base.in_flight = False
            slot.task, slot.base, slot.stopped = None, False, e.stopped
            ws = self.state.workers[e.worker]
            ws.phase = "stopped" if e.stopped else "idle"
            ws.space, ws.rows, ws.epochs, ws.img_per_s = "", [], 0, math.nan

    def _on_WorkerFailed(self, e: WorkerFailed) -> None:
        self.fatal = self.fatal or e

    def _on_WorkerLost(self, e: WorkerLost) -> None:
        slot = self.slots.pop(e.worker, None)
        self.state.workers.pop(e.worker, None)
        if slot is None:
            return
        self._log("worker_lost", worker=e.worker, node=slot.node, device=slot.device, reason=e.reason)
        if slot.task is None or self.stopping:
            if slot.task is not None:
                lease_id = self.task_lease.pop(slot.task, None)
                if lease_id is not None:
                    self.ledger.release(lease_id)
            return
        self.view.note(f"{e.reason}; its rows are queued again")
        lease_id = self.task_lease.pop(slot.task, None)
        if lease_id is not None:
            lease = self.ledger.leases.get(lease_id)
            space = lease.space if lease else ""
            failed = self.ledger.requeue(lease_id, e.reason)
            self._log("requeue", worker=e.worker, space=space, failed=failed)
            if failed:
                self._rows_failed(space, failed, e.reason)
        if slot.base and self.base.todo is not None:
            self.base.in_flight = False
            self.base.attempts += 1
            if self.base.attempts >= MAX_BASE_ATTEMPTS:
                self.failure = f"{e.reason} while working on the base network; the same command resumes"

    def _on_Note(self, e: Note) -> None:
        self.view.note(e.text)

    # -- dispatch ----------------------------------------------------------------------------------------------------

    def _cohort_k(self, slot: _Slot, idle_workers: int) -> int:
        k = self.cfg.retrain.cohort_size
        if k == "auto":
            k = AUTO_COHORT["cuda" if slot.device.startswith("cuda") else "cpu"]
        return max(1, min(int(k), -(-self.ledger.pending() // max(1, idle_workers))))

    def dispatch(self) -> None:
        """The next task for every idle worker; the rows handed out are flushed as running once, at the end."""
        if self.stopping or self.fatal or self.failure:
            return
        if self._hand_out():
            self.ledger.flush()

    def _hand_out(self) -> int:
        leases = 0
        idle = [(wid, s) for wid, s in self.slots.items() if s.ready and s.task is None and not s.stopped]
        working = sum(1 for s in self.slots.values() if s.ready and not s.stopped)
        for wid, slot in idle:
            if self.base.todo is not None:
                if self.base.in_flight:
                    return leases  # cohorts wait for the base network
                weights = None if self.base.todo else self.pool.base_weights(self.cfg.model.checkpoint)
                self.next_task += 1
                self.pool.submit(wid, BaseTask(self.next_task, self.base.todo), weights)
                slot.task, slot.base, self.base.in_flight = self.next_task, True, True
                self.state.workers[wid].phase = "base network"
                self._log("base", worker=wid, node=slot.node, device=slot.device)
                continue
            lease = self.ledger.take(self._cohort_k(slot, working), wid, flush=False)
            if lease is None:
                return leases
            leases += 1
            s = self.ledger.spaces[lease.space]
            rows = np.asarray(lease.rows)
            k_arg = None if self.cfg.retrain.cohort_size == "auto" else len(rows)
            self.next_task += 1
            task = CohortTask(self.next_task, lease.space, lease.rows, s.keep[rows],
                              tuple(int(x) for x in s.seed[rows]), s.spec, k_arg, self.weights.wanted,
                              self.weights.threshold(lease.space))
            self.task_lease[task.task_id] = lease.id
            slot.task = task.task_id
            self.pool.submit(wid, task, self.base.weights)
            ws = self.state.workers[wid]
            ws.phase, ws.space, ws.rows = "cohort", lease.space, list(lease.rows)
            ws.epoch, ws.epochs, ws.step, ws.steps, ws.img_per_s = 0, s.epochs, 0, 0, math.nan
            self._log("dispatch", space=lease.space, rows=list(lease.rows), worker=wid, node=slot.node,
                      device=slot.device)
        return leases

    # -- two-stage and weights ---------------------------------------------------------------------------------------

    def _space_complete(self, space: str) -> None:
        from nps.kernels.spaces import TOP_SUFFIX

        s = self.ledger.spaces[space]
        self.weights.finish_space(space, s.status, s.top1)
        t = self.cfg.two_stage
        if not t.enabled or space.endswith(TOP_SUFFIX) or space + TOP_SUFFIX in self.ledger.spaces \
                or space not in self._sampled:  # baselines and ratio spaces have no top-k
            return
        chosen, rows = outputs.top_space_rows(self.store, space, t.top_k)
        if chosen.size == 0:
            self.view.note(f"{space}: no subnetwork finished; no two-stage retraining")
            return
        top = space + TOP_SUFFIX
        attrs = outputs.top_space_attrs(self.store, space, chosen, t.top_k)
        added = self.ledger.add_space(top, rows, outputs.top_space_spec(s.spec, t.full_epochs), attrs)
        self.weights.start_space(top, added.status, added.top1)
        self._log("two_stage", space=space, top=top, parent_rows=chosen.tolist())
        self.view.note(f"{space}: rows {', '.join(map(str, chosen))} go on to {t.full_epochs} epochs in {top}")
