"""The driver: one experiment to completion or interruption, over any worker pool.

It owns the results file (through the :class:`~nps.pipeline.run.ledger.RowLedger`), the files beside it (base.pt,
weights/, log.jsonl, the training checkpoints) and the terminal (through its view); the pool only moves tasks, events
and weights. The base network's and each reference's training send a checkpoint after every epoch; the driver keeps
the latest as ``training-base.ckpt`` / ``training-reference-<model>.ckpt`` beside results.h5, hands it back with the
task when that training starts again (a killed run, a lost worker), and removes it once the training's result is
stored.
:meth:`Driver.open` prepares a run (results.h5 created or reopened, missing spaces sampled, rows left running reset)
and returns a complete driver; :meth:`Driver.run` owns the loop: poll the pool's events and apply them (results to
the ledger, kept weights to disk, progress to the view), hand every idle worker the next task (the base network
first, then cohorts of pending rows), and stop when the ledger has nothing left, then always end the same way:
workers closed, rows still in flight back to pending, the file closed.

Ctrl-C (SIGINT, or SIGTERM): the first asks the workers to stop after their current step, results that arrive
meanwhile are still written, then every row in flight goes back to pending and the run returns ``interrupted``; a
second one (or STOP_GRACE_S) ends the workers at once. SIGKILL needs nothing: rows left running are redone by the
next run. A failure of the machine (a full disk) stops the run the same way, then raises its one line.
"""
from __future__ import annotations

import logging
import math
import os
import re
import signal
import time
from pathlib import Path

import numpy as np

from nps.pipeline.errors import NpsError, environment_error
from nps.pipeline.network.pruning_kind import kind_of
from nps.pipeline.experiment.plan import Plan
from nps.pipeline.experiment.config import reference_trainings
from nps.pipeline.row_status import RowStatus
from nps.pipeline.run import forming, outputs, resume
from nps.pipeline.run.ledger import RowLedger, row_cost
from nps.pipeline.run.log import RunLog
from nps.pipeline.run.pools import WorkerPool
from nps.pipeline.run.protocol import (
    BaseResult,
    BaseTask,
    CohortTask,
    Note,
    Progress,
    Ready,
    ReferenceResult,
    ReferenceTask,
    RowResult,
    TaskEnd,
    TrainingCheckpoint,
    WorkerFailed,
    WorkerLost,
    WorkerSpec,
    WorkerStarted,
)
from nps.pipeline.run.state import Outcome, RowFinished, RunState, RunView, WorkerState
from nps.pipeline.training.events import EpochEnded
from nps.pipeline.training.plateau import describe_ending
from nps.pipeline.training.spec import AUTO_COHORT, resolve_fuse

STOP_GRACE_S = 60.0  # after Ctrl-C, how long workers get to finish their step before they are ended
MAX_BASE_ATTEMPTS = 2  # the base network's task is given again when its worker is lost, this often
REFRESH_S = 0.25
BATCH_S = 0.02  # after a row result, how long the driver collects more before it writes them
CHECKPOINT_PREFIX = "training-"  # beside results.h5: training-base.ckpt, training-reference-<model>.ckpt


def training_checkpoint(results_path: str, reference: str | None = None) -> str:
    """Where the driver keeps the checkpoint of the base network's training (``reference`` None) or of a
    reference's, beside results.h5, until that training's result is stored."""
    what = "base" if reference is None else "reference-" + re.sub(r"[^A-Za-z0-9._-]", "_", reference)
    return os.path.join(os.path.dirname(os.path.abspath(results_path)), f"{CHECKPOINT_PREFIX}{what}.ckpt")


def remove_file(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class _Base:
    """The base network: what is left to do, and its weights once they exist."""

    def __init__(self, todo: bool | None, units: float):
        self.todo = todo  # None: metrics stored; else whether to train (True) or evaluate (False)
        self.in_flight = False
        self.attempts = 0
        self.units = units
        self.fraction = 0.0
        self.weights = None  # the pool's BaseWeights, once the base network exists
        self.task_id: int | None = None  # the task training it now (its checkpoints are the ones kept)


class Driver:
    """One run of a validated experiment over a pool; make one with :meth:`open`, then :meth:`run` it."""

    def __init__(self, plan: Plan, pool: WorkerPool, view: RunView, state: RunState, prepared: resume.Prepared,
                 base: _Base):
        self.plan, self.cfg, self.pool, self.view, self.state = plan, plan.config, pool, view, state
        # what resume.prepare opened: the results file, its ledger, the kept weights and the run's log
        self.store, self.ledger, self.weights = prepared.store, prepared.ledger, prepared.weights
        self.log, self.resumed, self.base = prepared.log, prepared.resumed, base
        store = self.store
        self.task_lease: dict[int, int] = {}
        self.next_task = 0
        self.stopping, self.interrupts, self.stop_started = False, 0, 0.0
        self.fatal: WorkerFailed | None = None
        self.failure: str | None = None
        self._last_refresh = 0.0
        self._sampled = {p.key for p in plan.spaces if p.kind == "sampled"}  # the spaces two-stage may extend
        trained = store.references()
        self.references = {t.name: t for t in reference_trainings(plan.config) if t.name not in trained}  # to train
        self.reference_tasks: dict[int, str] = {}  # task id -> the name of the reference training it runs

    # -- opening -----------------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, plan: Plan, pool: WorkerPool, view: RunView, *, retry_failed: bool = False) -> "Driver":
        """Open or create results.h5, sample missing spaces, reset rows left running
        (:func:`nps.pipeline.run.resume.prepare`); the view starts first, so it shows the sampling."""
        cfg = plan.config
        state = RunState(cfg.experiment.name, plan.results_path, phase="opening results")
        view.start(state)

        def phase(text: str) -> None:
            state.phase = text
            view.update(state, force=True)

        try:
            p = resume.prepare(plan, pool, phase=phase, note=view.note, retry_failed=retry_failed)
        except BaseException:
            view.stop(state)
            raise
        state.base_top1 = p.base_top1
        _remove_finished_checkpoints(plan, p)
        base = _Base(p.base_todo, 0.0 if p.base_todo is None else float(cfg.base.epochs) if p.base_todo else 0.2)
        if p.base_todo is None:
            base.weights = pool.base_weights(cfg.model.checkpoint or plan.base_path)
        else:
            state.base_note = "training the base network" if p.base_todo else "evaluating the base network"
        return cls(plan, pool, view, state, p, base)

    # -- training checkpoints (base network, references) -------------------------------------------------------------

    def _checkpoint_of(self, task_id: int) -> str | None:
        """Where the checkpoints of task ``task_id`` go: the base network's training, a reference's, or None (a
        task no longer current: a lost worker's)."""
        if task_id == self.base.task_id and self.base.todo:
            return training_checkpoint(self.plan.results_path)
        if task_id in self.reference_tasks:
            return training_checkpoint(self.plan.results_path, self.reference_tasks[task_id])
        return None

    def _resume_from(self, path: str):
        """The checkpoint at ``path`` as the pool's workers receive it, or None when there is none."""
        return self.pool.base_weights(path) if os.path.isfile(path) else None

    def _on_training_checkpoint(self, e: TrainingCheckpoint) -> None:
        """Write the checkpoint beside results.h5 (moved into place or written atomically: a kill leaves the last
        one whole); a full disk stops the run, whose next start resumes from the checkpoint before."""
        path = self._checkpoint_of(e.task_id)
        if path is None:
            self.pool.release_weights(e.data)
            return
        try:
            kept = self.pool.commit_weights(e.data, Path(path))
        except OSError as exc:
            self.failure = self.failure or environment_error(exc, path) or f"{path}: {exc}"
            return
        if kept:
            self.log.write("checkpoint", worker=e.worker, path=os.path.basename(path), epoch=e.epoch)

    @staticmethod
    def _curve_parts(curve):
        """A :class:`~nps.pipeline.training.plateau.TrainingCurve` as the store takes it: (series, attributes)."""
        return None if curve is None else ({name: getattr(curve, name) for name in curve.SERIES}, curve.attrs())

    # -- the run -----------------------------------------------------------------------------------------------------

    def run(self) -> Outcome:
        """Serve the workers until every row has finished ("complete") or a stop request ("interrupted"); always
        close the pool and the file and put rows in flight back to pending."""
        t0 = time.monotonic()
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        status = "failed"
        try:
            for sig in previous:
                signal.signal(sig, self._on_signal)
            status = self._loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._close(status, t0)
        return Outcome(status, self.plan.results_path, self.ledger.states(), self.state.base_top1,
                       time.monotonic() - t0, self.resumed)

    def _on_signal(self, signum, frame) -> None:
        self.interrupts += 1
        if self.interrupts == 1:
            self._stop()
        else:
            self.pool.terminate()

    def _stop(self) -> None:
        self.stopping, self.stop_started = True, time.monotonic()
        self.pool.request_stop()

    def _spec(self) -> WorkerSpec:
        p = self.plan
        return WorkerSpec(p.config, p.table, p.resolution, p.in_channels, p.num_classes, p.meta["fingerprint"],
                          logging.getLogger().level or logging.WARNING, weight_table=p.weight_table)

    def _loop(self) -> str:
        for name in list(self.ledger.spaces):  # spaces finished by an earlier run may still owe their two-stage space
            if not self.ledger.spaces[name].open:
                self._space_complete(name)
        if self._finished():
            return "complete"  # nothing to do: no worker needed
        self.pool.start(self._spec(), os.path.dirname(os.path.abspath(self.plan.results_path)))
        self._phase("starting workers (loading the dataset)")
        while True:
            self.handle(self._events())
            if self.fatal is not None:
                self._raise_failure()
            self.failure = self.failure or self.log.failure
            if self.failure and not self.stopping:  # e.g. a full disk: stop as Ctrl-C does, then say why
                self._stop()
            if self.stopping:
                if not any(w.task is not None for w in self.state.workers.values()):
                    self._raise_failure()
                    return "interrupted"
                if time.monotonic() - self.stop_started > STOP_GRACE_S:
                    self.pool.terminate()
                self._phase("stopping: waiting for the workers to finish their step")
                continue
            if self._finished():
                return "complete"
            if self.pool.exhausted():
                raise NpsError("every worker is gone (see the lines above); the same command resumes")
            self.dispatch()
            workers = self.state.workers.values()
            self.state.phase = (("training the base network" if self.base.todo else "evaluating the base network from "
                                 f"{self.cfg.model.checkpoint or self.plan.base_path}") if any(w.base for w in workers)
                                else "training reference networks" if self.reference_tasks and not any(
                                    w.task in self.task_lease for w in workers)
                                else "retraining subnetworks" if any(w.task is not None for w in workers)
                                else "starting workers (loading the dataset)" if not any(w.ready for w in workers)
                                else "waiting for workers")
            self._refresh()

    def _events(self) -> list:
        """The events that arrived; once a row result is among them, those of the next BATCH_S too: results come in
        bursts (a cohort ends all its rows at once, a fleet ends many cohorts a second) and the ledger writes each
        batch as one group per space, two flushes for all (tools/bench_dispatch.py)."""
        events = self.pool.poll(0.1)
        if any(isinstance(e, RowResult) for e in events):
            deadline = time.monotonic() + BATCH_S
            while (left := deadline - time.monotonic()) > 0:
                more = self.pool.poll(left)
                if not more:
                    break
                events += more
        return events

    def _finished(self) -> bool:
        return (self.base.todo is None and self.ledger.finished() and not self.references
                and not self.reference_tasks)

    def _raise_failure(self) -> None:
        if self.fatal is not None:
            if self.fatal.user_error:
                raise NpsError(self.fatal.error)
            raise RuntimeError(f"a worker failed: {self.fatal.error}\n--- the worker's traceback ---\n"
                               f"{self.fatal.detail}")
        if self.failure:
            raise NpsError(self.failure)

    def _close(self, status: str, t0: float) -> None:
        try:
            # interrupted: every worker ended its step and exits; a run stopped by a failure ends the workers at
            # once only when one is still working (a full disk stops the run between tasks: they all exit cleanly)
            busy = any(w.task is not None for w in self.state.workers.values())
            clean = status in ("complete", "interrupted") or not busy
            if not clean:
                self.pool.terminate()
            self.pool.close(timeout=10.0 if clean else 2.0)
        finally:
            try:
                self.ledger.release_in_flight()  # rows in flight go back to pending
            finally:
                self.store.close()
            self.log.write("end", status=status, elapsed_s=round(time.monotonic() - t0, 2))
            self.log.close()
            self.state.spaces = {s.name: s for s in self.ledger.states()}
            self.view.stop(self.state)

    # -- the view ----------------------------------------------------------------------------------------------------

    def _phase(self, text: str) -> None:
        self.state.phase = text
        self._refresh(force=True)

    def _refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_refresh < REFRESH_S:
            return
        self._last_refresh = now
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

    # -- events ------------------------------------------------------------------------------------------------------

    def handle(self, events) -> None:
        """Apply a batch of events: its row results first, stored as one group per space, then the other events in
        order. A worker sends a task's results before its TaskEnd and nothing after its loss, so results first
        keeps every result ahead of the events that close its lease; a result that arrived together with its
        worker's loss is kept instead of being trained again."""
        self._store_results([e for e in events if isinstance(e, RowResult)])
        for event in events:
            match event:  # a renamed event type fails here loudly, never silently
                case RowResult():
                    pass
                case WorkerStarted():
                    self._on_worker_started(event)
                case Ready():
                    self._on_ready(event)
                case Progress():
                    self._on_progress(event)
                case TrainingCheckpoint():
                    self._on_training_checkpoint(event)
                case BaseResult():
                    self._on_base_result(event)
                case ReferenceResult():
                    self._on_reference_result(event)
                case Note():
                    self._on_note(event)
                case TaskEnd():
                    self._on_task_end(event)
                case WorkerLost():
                    self._on_worker_lost(event)
                case WorkerFailed():
                    self._on_worker_failed(event)
                case _:
                    raise TypeError(f"not an event: {event!r}")

    def _store_results(self, results: list[RowResult]) -> None:
        if not results:
            return

        def keep_weights(accepted: list[RowResult]) -> None:  # before the status says done
            for r in accepted:
                if r.result.ok and not self.weights.add(r.space, r.row, r.result.top1, r.weights):
                    self.view.note(f"{r.space} row {r.row}: its weights were lost with its worker's node before "
                                   "the driver fetched them; the row's results are kept, without weights")
                    self.log.write("weights_lost", space=r.space, row=r.row, worker=r.worker)

        accepted = self.ledger.finish(results, self.task_lease, before_commit=keep_weights)
        taken = {id(r) for r in accepted}
        for r in results:  # refused (a late duplicate): its staged weights go
            if id(r) not in taken and r.weights is not None:
                self.pool.release_weights(r.weights)
        for r in accepted:
            w = self.state.workers.get(r.worker)
            res = r.result
            self._row_finished(RowFinished(
                r.space, r.row, res.status, float(self.ledger.spaces[r.space].c_flops[r.row]), top1=res.top1,
                top5=res.top5, bn_top1=res.bn_top1, acc_drop=self.ledger.base_top1 - res.top1, train_s=res.train_s,
                error=res.error, worker=r.worker, node=w.node if w else "", device=w.device if w else ""))
        for space in {r.space for r in accepted}:
            self._maybe_complete(space)

    def _row_finished(self, row: RowFinished) -> None:
        self.log.row(row)
        self.state.spaces[row.space] = self.ledger.state(row.space)
        self.view.row_finished(self.state, row)

    def _rows_failed(self, space: str, rows: list[int], reason: str) -> None:
        for row in rows:
            self._row_finished(RowFinished(space, row, RowStatus.FAILED,
                                           float(self.ledger.spaces[space].c_flops[row]), error=reason))
        self._maybe_complete(space)

    def _maybe_complete(self, space: str) -> None:
        if not self.ledger.spaces[space].open:
            self._space_complete(space)

    def _on_worker_started(self, e: WorkerStarted) -> None:
        self.state.workers[e.worker] = WorkerState(e.device, node=e.node)

    def _on_ready(self, e: Ready) -> None:
        w = self.state.workers.get(e.worker)
        if w is not None:
            w.ready, w.phase, w.node, w.device = True, "idle", e.node, e.device
            self.log.write("ready", worker=e.worker, node=e.node, device=e.device, threads=e.threads)

    def _on_progress(self, e: Progress) -> None:
        w = self.state.workers.get(e.worker)
        if w is None:
            return
        p = e.event
        done_steps = p.steps if isinstance(p, EpochEnded) else p.step
        w.epoch, w.epochs, w.step, w.steps, w.img_per_s = p.epoch, p.epochs, done_steps, p.steps, p.img_per_s
        fraction = min(1.0, max(0.0, ((p.epoch - 1) + (done_steps / p.steps if p.steps else 0)) / max(p.epochs, 1)))
        lease = self.ledger.leases.get(self.task_lease.get(e.task_id, -1))
        if lease is not None:
            lease.fraction = fraction
        elif w.base or e.task_id in self.reference_tasks:
            if w.base:
                self.base.fraction = fraction
            what = "base" if w.base else self.reference_tasks[e.task_id]
            if isinstance(p, EpochEnded):
                losses, tops = list(p.train_loss.values()), list(p.val_top1.values())
                loss = float(np.mean(losses)) if losses else math.nan
                top1 = float(np.max(tops)) if tops else math.nan
                held = list(p.holdout_top1.values())
                holdout = f", holdout top-1 {held[0]:.2f}" if held else ""
                self.view.epoch(self.state, e.worker, f"{what} epoch {p.epoch}/{p.epochs}: train loss {loss:.3f}, "
                                                      f"val top-1 {top1:.2f}{holdout} ({p.img_per_s:,.0f} img/s)")

    def _on_base_result(self, e: BaseResult) -> None:
        path = self.cfg.model.checkpoint or self.plan.base_path
        if e.curve is not None:  # first: a kill before base.pt is written trains the last epoch again, no more
            self.store.set_curve(*self._curve_parts(e.curve))
        if e.checkpoint is not None:
            outputs.write_atomic(self.plan.base_path, e.checkpoint)
        self.store.set_attrs(base_top1=e.top1, base_top5=e.top5, base_loss=e.loss, base_trained=e.trained,
                             base_checkpoint=path)
        self.ledger.set_base_top1(e.top1)
        self.state.base_top1 = e.top1
        self.base.todo, self.base.in_flight = None, False
        self.base.weights = self.pool.base_weights(path)
        remove_file(training_checkpoint(self.plan.results_path))  # its metrics and weights are stored
        what = "trained" if e.trained else "evaluated"
        self.view.note(f"base network {what} in {e.seconds:.0f}s: top-1 {e.top1:.2f}, top-5 {e.top5:.2f}"
                       + (f"; {describe_ending(e.curve.attrs())}" if e.curve is not None else ""))
        self.log.write("base_done", worker=e.worker, top1=e.top1, top5=e.top5, loss=e.loss, trained=e.trained,
                       seconds=e.seconds)
        if e.trained:
            self.store.set_attrs(base_train_s=e.seconds)
        self._add_weight_determined_spaces()

    def _add_weight_determined_spaces(self) -> None:
        """Spaces whose recipe depends on the trained base (``weights:global``): made once the base exists."""
        if not any(resume.needs_base_weights(p) for p in self.plan.spaces):
            return
        self._phase("finding the global magnitude thresholds")
        added = resume.sample_missing_spaces(self.store, self.plan, progress=self._phase,
                                             base_model=resume.load_base_model(self.plan))
        default = resume.default_spec(self.plan)
        for name in added:
            s = self.ledger.load(name, default)
            self.weights.start_space(name, s.status, s.top1)
            self._sampled.add(name)
        if added:
            self.log.write("sampled", spaces=added)
            self._phase("fine-tuning")

    def _on_reference_result(self, e: ReferenceResult) -> None:
        from nps.pipeline.network.layer_table import build_layer_table
        from nps.pipeline.network.pretrained import resolution_of

        m = self.cfg.model
        self.reference_tasks.pop(e.task_id, None)
        self.references.pop(e.name, None)
        resolution = resolution_of(self.cfg, e.model, self.plan.resolution)  # its FLOPs at the size it ran at
        ref = build_layer_table(e.model, "all", resolution, self.plan.num_classes,
                                self.plan.in_channels, flops=m.flops)
        base_flops, base_params = self.plan.table.base_flops, self.plan.table.base_params
        self.store.set_reference(e.name, curve=self._curve_parts(e.curve), model=e.model, name=e.name,
                                 seed=self.cfg.experiment.seed + e.replica, top1=e.top1,
                                 top5=e.top5, loss=e.loss,
                                 flops=ref.base_flops, params=ref.base_params, c_flops=ref.base_flops / base_flops,
                                 c_params=ref.base_params / base_params, train_s=e.seconds, resolution=resolution,
                                 acc_drop=self.state.base_top1 - e.top1)
        remove_file(training_checkpoint(self.plan.results_path, e.name))  # its result and curve are stored
        self.view.note(f"reference {e.name} trained in {e.seconds:.0f}s: top-1 {e.top1:.2f} at c_flops "
                       f"{ref.base_flops / base_flops:.3f}"
                       + (f"; {describe_ending(e.curve.attrs())}" if e.curve is not None else ""))
        self.log.write("reference_done", worker=e.worker, model=e.model, name=e.name, top1=e.top1, top5=e.top5,
                       seconds=e.seconds)

    def _on_task_end(self, e: TaskEnd) -> None:
        w = self.state.workers.get(e.worker)
        lease_id = self.task_lease.pop(e.task_id, None)
        lease = self.ledger.leases.get(lease_id) if lease_id is not None else None
        reference = self.reference_tasks.pop(e.task_id, None)
        if reference is not None and e.error and not (e.stopped or e.environment):
            failed = self.references.pop(reference, None)  # not retried: the error says why
            model = failed.model if failed is not None else reference
            self.store.set_reference(reference, model=model, name=reference, error=e.error[:500])
            remove_file(training_checkpoint(self.plan.results_path, reference))
            self.view.note(f"reference {reference} failed: {e.error}")
            self.log.write("reference_error", worker=e.worker, model=reference, error=e.error)
        if e.environment:
            self.failure = self.failure or e.error
            self.log.write("task_environment", worker=e.worker, error=e.error)
        if lease is not None:
            if e.stopped or e.environment:
                self.ledger.release(lease.id)
            elif e.error:
                self.view.note(f"[{w.node if w else '?'} {w.device if w else '?'}] a cohort failed: {e.error}")
                self.log.write("task_error", worker=e.worker, error=e.error, detail=e.detail)
                self._rows_failed(lease.space, self.ledger.fail(lease.id, e.error), e.error)
            else:
                reason = "the worker returned no result for this row"
                self._rows_failed(lease.space, self.ledger.requeue(lease.id, reason), reason)
        if w is not None:
            if w.base and self.base.todo is not None:
                self.base.in_flight = False
            w.stopped = e.stopped
            w.idle()

    def _on_worker_failed(self, e: WorkerFailed) -> None:
        self.fatal = self.fatal or e

    def _on_worker_lost(self, e: WorkerLost) -> None:
        w = self.state.workers.pop(e.worker, None)
        if w is None:
            return
        self.log.write("worker_lost", worker=e.worker, node=w.node, device=w.device, reason=e.reason)
        lease_id = self.task_lease.pop(w.task, None) if w.task is not None else None
        self.reference_tasks.pop(w.task, None)  # queued again (it stays in self.references)
        if w.task is None or self.stopping:
            if lease_id is not None:
                self.ledger.release(lease_id)
            return
        self.view.note(f"{e.reason}; its rows are queued again")
        if lease_id is not None:
            lease = self.ledger.leases.get(lease_id)
            space = lease.space if lease else ""
            failed = self.ledger.requeue(lease_id, e.reason)
            self.log.write("requeue", worker=e.worker, space=space, failed=failed)
            if failed:
                self._rows_failed(space, failed, e.reason)
        if w.base and self.base.todo is not None:
            self.base.in_flight = False
            self.base.attempts += 1
            if self.base.attempts >= MAX_BASE_ATTEMPTS:
                self.failure = f"{e.reason} while working on the base network; the same command resumes"

    def _on_note(self, e: Note) -> None:
        self.view.note(e.text)

    # -- dispatch ----------------------------------------------------------------------------------------------------

    def _similar_rows(self, space: str, keeps, k: int) -> list[int]:
        return forming.cohort_rows(kind_of(space), self.plan.table, keeps, k, self.cfg.retrain.fuse_max_waste)

    def _cohort_k(self, w: WorkerState, idle_workers: int) -> int:
        k = self.cfg.retrain.cohort_size
        if k == "auto":
            k = AUTO_COHORT["cuda" if w.device.startswith("cuda") else "cpu"]
        return max(1, min(int(k), -(-self.ledger.pending() // max(1, idle_workers))))

    def dispatch(self) -> None:
        """The next task for every idle worker; the rows handed out are flushed as running once, at the end."""
        if self.stopping or self.fatal or self.failure:
            return
        if self._hand_out():
            self.ledger.flush()

    def _hand_out(self) -> int:
        leases = 0
        workers = self.state.workers
        idle = [(wid, w) for wid, w in workers.items() if w.ready and w.task is None and not w.stopped]
        working = sum(1 for w in workers.values() if w.ready and not w.stopped)
        for wid, w in idle:
            if self.base.todo is not None:
                if self.base.in_flight:
                    return leases  # cohorts wait for the base network
                weights = None if self.base.todo else self.pool.base_weights(self.cfg.model.checkpoint)
                resume = self._resume_from(training_checkpoint(self.plan.results_path)) if self.base.todo else None
                self.next_task += 1
                self.pool.submit(wid, BaseTask(self.next_task, self.base.todo, resume), weights)
                w.task, w.base, w.phase, self.base.in_flight = self.next_task, True, "base network", True
                self.base.task_id = self.next_task
                self.log.write("base", worker=wid, node=w.node, device=w.device, resumed=resume is not None)
                continue
            waiting = [m for m in self.references if m not in self.reference_tasks.values()]
            if waiting:  # a reference trains like the base, on one worker, before the populations
                ref = self.references[waiting[0]]
                resume = self._resume_from(training_checkpoint(self.plan.results_path, ref.name))
                self.next_task += 1
                self.pool.submit(wid, ReferenceTask(self.next_task, ref.model, ref.config.epochs or self.cfg.base.epochs,
                                                    resume, ref.name, ref.replica), None)
                self.reference_tasks[self.next_task] = ref.name
                w.task, w.phase = self.next_task, f"reference {ref.name}"
                self.log.write("reference", worker=wid, model=ref.model, name=ref.name, node=w.node, device=w.device,
                               resumed=resume is not None)
                continue
            fusing = resolve_fuse(self.cfg.retrain.fuse, w.device)
            choose = self._similar_rows if fusing else None
            lease = self.ledger.take(self._cohort_k(w, working), wid, flush=False, choose=choose)
            if lease is None:
                return leases
            leases += 1
            fused = fusing and kind_of(lease.space).fusable  # decided here; the task carries it
            s = self.ledger.spaces[lease.space]
            rows = np.asarray(lease.rows)
            k_arg = None if self.cfg.retrain.cohort_size == "auto" else len(rows)
            self.next_task += 1
            task = CohortTask(self.next_task, lease.space, lease.rows, s.keep[rows],
                              tuple(int(x) for x in s.seed[rows]), s.spec, k_arg, self.weights.wanted,
                              self.weights.threshold(lease.space), fused)
            self.task_lease[task.task_id] = lease.id
            self.pool.submit(wid, task, self.base.weights)
            w.task, w.phase, w.space, w.rows = task.task_id, "cohort", lease.space, list(lease.rows)
            w.epoch, w.epochs, w.step, w.steps, w.img_per_s = 0, s.epochs, 0, 0, math.nan
            extra = ({"fused_waste": round(forming.waste(self.plan.table, s.keep[rows]), 4)}
                     if fused else {})
            self.log.write("dispatch", space=lease.space, rows=list(lease.rows), worker=wid, node=w.node,
                           device=w.device, **extra)
        return leases

    # -- two-stage ---------------------------------------------------------------------------------------------------

    def _space_complete(self, space: str) -> None:
        s = self.ledger.spaces[space]
        self.weights.finish_space(space, s.status, s.top1)
        if space not in self._sampled:  # baselines, ratio spaces and #top spaces have no top-k
            return
        started = outputs.start_top_space(self.ledger, self.store, self.weights, space, self.cfg.two_stage)
        if started is None:
            return
        top, chosen = started
        if not chosen.size:
            self.view.note(f"{space}: no subnetwork finished; no two-stage retraining")
            return
        self.log.write("two_stage", space=space, top=top, parent_rows=chosen.tolist())
        self.view.note(f"{space}: rows {', '.join(map(str, chosen))} go on to {self.cfg.two_stage.full_epochs} "
                       f"epochs in {top}")


def _remove_finished_checkpoints(plan: Plan, prepared) -> None:
    """Training checkpoints that must not be resumed: every one beside a results file made new (left by an
    earlier experiment in the same directory), and those of trainings whose result the file holds already (a run
    killed between storing a result and removing its checkpoint)."""
    out = os.path.dirname(os.path.abspath(plan.results_path))
    if not prepared.resumed:
        for name in os.listdir(out):
            if name.startswith(CHECKPOINT_PREFIX) and name.endswith(".ckpt"):
                remove_file(os.path.join(out, name))
        return
    if prepared.base_todo is not True:
        remove_file(training_checkpoint(plan.results_path))
    for model in prepared.store.references():
        remove_file(training_checkpoint(plan.results_path, model))
