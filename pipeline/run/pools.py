"""Worker pools: how tasks reach workers and events come back. One interface, two transports.

:class:`WorkerPool` is all the driver knows of its workers: it starts them, submits a task to one, polls the events
of all, asks them to stop, closes them. What a task or an event means is the driver's business; a pool only moves
them and reports workers it started or lost. :class:`LocalPool` runs one spawned process per device of this machine
(the default); :class:`nps.pipeline.run.ray_pool.RayPool` runs one Ray actor per GPU of a cluster.
"""
from __future__ import annotations

import abc
import dataclasses
import logging
import multiprocessing as mp
import os
import queue
import shutil
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nps.pipeline.files import write_atomic
from nps.pipeline.run.protocol import BaseWeights, Event, Task, WorkerLost, WorkerSpec, WorkerStarted

log = logging.getLogger(__name__)

STAGING_DIR = ".staging"  # beside results.h5: where local workers leave row weights for the driver
MAX_RESTARTS = 3  # worker processes restarted per device after a crash
ALIVE_S = 0.5  # how often poll looks for dead worker processes (a waitpid each: with 256 workers it adds up)


class WorkerPool(abc.ABC):
    """The transport between the driver and its workers."""

    kind = "pool"

    @abc.abstractmethod
    def start(self, spec: WorkerSpec, out_dir: str = "") -> None:
        """Start the workers (they announce themselves with WorkerStarted, then Ready); ``out_dir`` is where the
        run's files live (a pool on this machine stages row weights beside them)."""

    @abc.abstractmethod
    def submit(self, worker: int, task: Task, base: BaseWeights | None) -> None:
        """Hand ``task`` to an idle worker; ``base`` is the base network it needs (None to train it)."""

    @abc.abstractmethod
    def poll(self, timeout: float) -> list[Event]:
        """The events that arrived, waiting up to ``timeout`` seconds for the first one."""

    @abc.abstractmethod
    def request_stop(self) -> None:
        """Ask every worker to stop after its current training step (Ctrl-C)."""

    @abc.abstractmethod
    def terminate(self) -> None:
        """Stop every worker now."""

    @abc.abstractmethod
    def close(self, timeout: float = 10.0) -> None:
        """Let every worker exit, then release the transport."""

    @abc.abstractmethod
    def exhausted(self) -> bool:
        """No worker is left and none can come."""

    def base_weights(self, path: str) -> BaseWeights:
        """The base network at ``path`` (on the driver's machine) as this pool's workers can receive it."""
        return BaseWeights.from_file(path, embed=False)

    # -- row weights: the pool moves them, the driver decides which to keep -----------------------------------------

    def commit_weights(self, weights, path: Path) -> bool:
        """Put a row's weights (bytes, or staged by a worker) at ``path`` atomically; False when they are gone (the
        node that held them died)."""
        if isinstance(weights, (bytes, bytearray)):
            write_atomic(path, bytes(weights))
            return True
        if not weights.path:
            raise TypeError(f"{type(self).__name__} cannot fetch {weights!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # a file on this machine: moved into place, never copied
            os.replace(weights.path, path)
        except OSError:  # gone, or another filesystem
            if not os.path.exists(weights.path):
                return False
            with open(weights.path, "rb") as fh:
                write_atomic(path, fh.read())
            self.release_weights(weights)
        return True

    def release_weights(self, weights) -> None:
        """Weights the driver does not keep: a staged file is removed (an object in a store goes with its handle)."""
        path = getattr(weights, "path", "")
        if path:
            try:
                os.remove(path)
            except OSError:
                pass


# --------------------------------------------------------------------------------------------------------------------
# Local processes.


def _die_with_parent(parent_pid: int) -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl
        os._exit(1)


@dataclass(frozen=True)
class WorkerPlace:
    """Where a local worker process runs and how it talks: its id, device, threads and node, and its queues."""

    wid: int
    device: str
    threads: int
    node: str
    tasks: Any  # driver -> worker: (task, base weights), None to exit
    results: Any  # worker -> driver: events
    stop: Any  # the pool's stop event
    parent_pid: int


def worker_main(place: WorkerPlace, spec: WorkerSpec) -> None:
    """A local worker process: set up, then serve tasks until told to exit (or stopped)."""
    from nps.pipeline.run.worker import Worker, serve_task, setup_failure

    wid, device, threads, node = place.wid, place.device, place.threads, place.node
    tasks, results, stop, parent_pid = place.tasks, place.results, place.stop, place.parent_pid
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the driver decides
    logging.basicConfig(level=spec.log_level)
    try:
        worker = (spec.worker_class or Worker)(wid, spec, device, threads, node, results.put, stop.is_set)
        results.put(worker.setup())
    except Exception as exc:  # noqa: BLE001 - reported to the driver, which stops the run
        results.put(setup_failure(wid, exc))
        return
    while True:
        try:
            item = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent_pid:
                return
            continue
        if item is None:
            return
        task, base = item
        if not serve_task(worker, task, base, results.put):
            return


@dataclass
class _Process:
    wid: int
    device: str
    threads: int
    process: Any
    tasks: Any
    restarts: int = 0
    gone: bool = False


class LocalPool(WorkerPool):
    """One spawned worker process per device of this machine; a crashed one is restarted (MAX_RESTARTS)."""

    kind = "local"

    def __init__(self, devices: list[str]):
        self.devices = list(devices)
        self.ctx = mp.get_context("spawn")
        self.node = socket.gethostname()
        self.procs: dict[int, _Process] = {}
        self.events: list[Event] = []
        self.results = None
        self.stop_event = None
        self.spec: WorkerSpec | None = None
        self.stopping = False
        self.staging = ""
        self._next = 0
        self._checked = 0.0

    def _threads(self, device: str) -> int:
        """Torch threads of a worker: the cores shared among the CPU workers (at most OMP_NUM_THREADS when set);
        a GPU worker needs a few for its loader."""
        cores = len(os.sched_getaffinity(0))
        if device != "cpu":
            return max(1, min(4, cores // len(self.devices)))
        threads = max(1, cores // max(1, sum(1 for d in self.devices if d == "cpu")))
        cap = os.environ.get("OMP_NUM_THREADS", "")
        return max(1, min(threads, int(cap))) if cap.isdigit() and int(cap) > 0 else threads

    def _spawn(self, device: str, restarts: int = 0) -> None:
        wid, self._next = self._next, self._next + 1
        threads = self._threads(device)
        tasks = self.ctx.Queue()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the child inherits "ignore" from birth
        try:
            place = WorkerPlace(wid, device, threads, self.node, tasks, self.results, self.stop_event, os.getpid())
            process = self.ctx.Process(target=worker_main, name=f"nps-worker-{wid}", daemon=True,
                                       args=(place, self.spec))
            process.start()
        finally:
            signal.signal(signal.SIGINT, previous)
        self.procs[wid] = _Process(wid, device, threads, process, tasks, restarts)
        self.events.append(WorkerStarted(wid, self.node, device))

    def start(self, spec: WorkerSpec, out_dir: str = "") -> None:
        if out_dir:  # row weights wait beside results.h5, so the ones the driver keeps are moved, not copied
            self.staging = os.path.join(out_dir, STAGING_DIR)
            shutil.rmtree(self.staging, ignore_errors=True)  # a killed run's leftovers
            os.makedirs(self.staging)
            spec = dataclasses.replace(spec, staging=self.staging)
        self.spec = spec
        self.results = self.ctx.Queue()
        self.stop_event = self.ctx.Event()
        for device in self.devices:
            self._spawn(device)

    def submit(self, worker: int, task: Task, base: BaseWeights | None) -> None:
        self.procs[worker].tasks.put((task, base))

    def poll(self, timeout: float) -> list[Event]:
        out, self.events = self.events, []
        if self.results is None:
            return out
        try:
            out.append(self.results.get(timeout=0 if out else timeout))
            while True:
                out.append(self.results.get_nowait())
        except queue.Empty:
            pass
        now = time.monotonic()
        if now - self._checked < ALIVE_S and not self.stopping:
            return out
        self._checked = now
        for p in list(self.procs.values()):
            if p.gone or p.process.is_alive():
                continue
            p.gone = True
            code = p.process.exitcode
            out.append(WorkerLost(p.wid, f"the worker process on {p.device} died (exit code {code})"))
            if code != 0 and not self.stopping and p.restarts < MAX_RESTARTS:
                log.warning("restarting the worker on %s (exit code %s)", p.device, code)
                self._spawn(p.device, p.restarts + 1)
                out.append(self.events.pop())
        return out

    def request_stop(self) -> None:
        self.stopping = True
        if self.stop_event is not None:
            self.stop_event.set()

    def terminate(self) -> None:
        self.stopping = True
        for p in self.procs.values():
            if p.process.is_alive():
                p.process.terminate()

    def close(self, timeout: float = 10.0) -> None:
        self.stopping = True
        for p in self.procs.values():
            if p.process.is_alive():
                p.tasks.put(None)
        deadline = time.monotonic() + timeout
        while any(p.process.is_alive() for p in self.procs.values()) and time.monotonic() < deadline:
            self._drain()
            time.sleep(0.05)
        for p in self.procs.values():
            if p.process.is_alive():
                p.process.terminate()
        for p in self.procs.values():
            p.process.join(5)
        self._drain()
        if self.staging:  # weights of rows not kept, or not finished
            shutil.rmtree(self.staging, ignore_errors=True)

    def _drain(self) -> None:
        """Empty the result queue (a process cannot exit while its queue's feeder thread holds data)."""
        if self.results is None:
            return
        try:
            while True:
                self.results.get_nowait()
        except queue.Empty:
            pass

    def exhausted(self) -> bool:
        return bool(self.procs) and all(p.gone for p in self.procs.values())
