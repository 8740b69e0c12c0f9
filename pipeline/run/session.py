"""A run from start to end: the transport chosen, the driver's loop, signals, and what is left behind.

:func:`run_experiment` picks the pool (worker processes on this machine, or Ray actors with ``--ray`` /
``[experiment] ray``), runs the :class:`~nps.pipeline.run.driver.Driver` until every row has finished or a stop
request, and always ends the same way: workers closed, rows still in flight back to pending, the file closed.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import time

from nps.pipeline.experiment.plan import Plan
from nps.pipeline.errors import NpsError
from nps.pipeline.run.driver import STOP_GRACE_S, Driver, Outcome
from nps.pipeline.run.pools import LocalPool, WorkerPool
from nps.pipeline.run.protocol import RowResult, WorkerSpec

log = logging.getLogger(__name__)
BATCH_S = 0.02  # after a row result, how long the driver collects more before it writes them


def staging_dir(plan: Plan) -> str:
    """Where local workers leave row weights for the driver (beside results.h5, so kept ones are moved, not copied);
    emptied when a run starts and removed when it ends."""
    return os.path.join(os.path.dirname(os.path.abspath(plan.results_path)), ".staging")


def fresh_staging_dir(plan: Plan) -> str:
    """The staging directory, emptied of a killed run's leftovers."""
    staging = staging_dir(plan)
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    return staging


def worker_spec(plan: Plan, staging: str = "") -> WorkerSpec:
    return WorkerSpec(plan.config, plan.table, plan.resolution, plan.in_channels, plan.num_classes,
                      plan.meta["fingerprint"], logging.getLogger().level or logging.WARNING, staging=staging)


def _finished(d: Driver) -> bool:
    return d.base.todo is None and d.ledger.finished()


def _raise_failure(d: Driver) -> None:
    if d.fatal is not None:
        if d.fatal.user_error:
            raise NpsError(d.fatal.error)
        raise RuntimeError(f"a worker failed: {d.fatal.error}\n--- the worker's traceback ---\n{d.fatal.detail}")
    if d.failure:
        raise NpsError(d.failure)


def _events(pool: WorkerPool) -> list:
    """The events that arrived; once a row result is among them, those of the next BATCH_S too: results come in
    bursts (a cohort ends all its rows at once, a fleet ends many cohorts a second) and the ledger writes each batch
    as one group per space, two flushes for all (tools/bench_dispatch.py)."""
    events = pool.poll(0.1)
    if any(isinstance(e, RowResult) for e in events):
        deadline = time.monotonic() + BATCH_S
        while (left := deadline - time.monotonic()) > 0:
            more = pool.poll(left)
            if not more:
                break
            events += more
    return events


def loop(d: Driver) -> str:
    """Serve the workers until every row has finished ("complete") or a stop request ("interrupted")."""
    for name in list(d.ledger.spaces):  # spaces finished by an earlier run may still owe their two-stage space
        if not d.ledger.spaces[name].open:
            d._space_complete(name)
    if _finished(d):
        return "complete"  # nothing to do: no worker needed
    # processes on this machine share its disk and stage weights there; Ray actors use their node's object store
    d.pool.start(worker_spec(d.plan, fresh_staging_dir(d.plan) if d.pool.kind == "local" else ""))
    d._phase("starting workers (loading the dataset)")
    while True:
        d.handle(_events(d.pool))
        if d.fatal is not None:
            _raise_failure(d)
        if d.failure and not d.stopping:  # e.g. a full disk: stop as Ctrl-C does, then say why
            d.stopping, d.stop_started = True, time.monotonic()
            d.pool.request_stop()
        if d.stopping:
            if not any(s.task is not None for s in d.slots.values()):
                _raise_failure(d)
                return "interrupted"
            if time.monotonic() - d.stop_started > STOP_GRACE_S:
                d.pool.terminate()
            d._phase("stopping: waiting for the workers to finish their step")
            continue
        if _finished(d):
            return "complete"
        if d.pool.exhausted():
            raise NpsError("every worker is gone (see the lines above); the same command resumes")
        d.dispatch()
        slots = d.slots.values()
        d.state.phase = ("training the base network" if any(s.base for s in slots)
                         else "retraining subnetworks" if any(s.task is not None for s in slots)
                         else "starting workers (loading the dataset)" if not any(s.ready for s in slots)
                         else "waiting for workers")
        d._refresh()


def run(d: Driver) -> Outcome:
    t0 = time.monotonic()

    def on_signal(signum, frame) -> None:
        d.interrupts += 1
        if d.interrupts == 1:
            d.stopping, d.stop_started = True, time.monotonic()
            d.pool.request_stop()
        else:
            d.pool.terminate()

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    status, resumed = "failed", False
    try:
        d.view.start(d.state)
        resumed = d.prepare()
        for sig in previous:
            signal.signal(sig, on_signal)
        status = loop(d)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            # interrupted: every worker ended its step and exits; a run stopped by a failure ends the workers at once
            # only when one is still working (a full disk stops the run between tasks: they all exit cleanly)
            clean = status in ("complete", "interrupted") or not any(s.task is not None for s in d.slots.values())
            if not clean:
                d.pool.terminate()
            d.pool.close(timeout=10.0 if clean else 2.0)
        finally:
            if d.store is not None:
                try:
                    if d.ledger is not None:
                        d.ledger.release_in_flight()  # rows in flight go back to pending
                finally:
                    d.store.close()
            d._log("end", status=status, elapsed_s=round(time.monotonic() - t0, 2))
            if d.log_file is not None:
                d.log_file.close()
            if d.ledger is not None:
                d.state.spaces = {s.name: s for s in d.ledger.states()}
            shutil.rmtree(staging_dir(d.plan), ignore_errors=True)  # weights of rows not kept, or not finished
            d.view.stop(d.state)
    spaces = d.ledger.states() if d.ledger is not None else []
    return Outcome(status, d.plan.results_path, spaces, d.state.base_top1, time.monotonic() - t0, resumed)


def make_pool(plan: Plan, *, devices: list[str] | None, ray: str | None) -> WorkerPool:
    """Ray actors when a Ray address is given (``--ray`` over ``experiment.ray``), else local processes."""
    from nps.pipeline.experiment.config import check_ray_address, parse_devices

    address = check_ray_address(ray) if ray is not None else plan.config.experiment.ray
    if address:
        from nps.pipeline.run.ray_pool import RayPool

        if devices:
            raise NpsError("--devices: not used on a Ray cluster (every GPU of it gets a worker); drop --devices or "
                           "the Ray address")

        return RayPool(address, key="--ray" if ray is not None else "experiment.ray")
    key = "--devices" if devices else "experiment.devices"
    devices = devices or parse_devices(plan.config.experiment.devices, key=key)
    cuda = [d for d in devices if d.startswith("cuda")]
    if cuda:
        import torch

        visible = torch.cuda.device_count()
        absent = [d for d in cuda if int(d.split(":")[1]) >= visible]
        if absent:
            raise NpsError(f"{key}: {', '.join(absent)} not available ({visible} GPUs visible)")
    return LocalPool(devices)


def run_experiment(plan: Plan, view, *, devices: list[str] | None = None, ray: str | None = None,
                   retry_failed: bool = False, pool: WorkerPool | None = None) -> Outcome:
    """Run (or resume) a validated experiment; ``view`` is a :mod:`nps.pipeline.views.terminal` view. ``ray`` is an address
    (``auto``, ``HOST:PORT``) to run on a Ray cluster; ``pool`` replaces the transport altogether."""
    pool = pool or make_pool(plan, devices=devices, ray=ray)
    return run(Driver(plan, pool, view, retry_failed=retry_failed))
