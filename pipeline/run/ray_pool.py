"""The Ray transport: one worker actor per GPU of a running Ray cluster (one per node on a CPU-only cluster).

The driver connects with ``ray.init`` (``auto``: RAY_ADDRESS, else the Ray last started on this machine, else a new
local one; or ``HOST:PORT``), then places actors itself rather than through ``ray.util.ActorPool``, because it must
know which actor runs which rows (leases, the live view, faults): every alive node gets ``num_gpus=1`` actors, one
per GPU, pinned to it (``NodeAffinitySchedulingStrategy``) with its share of the node's CPUs, or one actor with all
its CPUs where the cluster has no GPU at all. Nodes are listed again every few seconds, so nodes that join later get
actors, and work.

A task is an actor call whose result is a streaming generator (Ray's ``ObjectRefGenerator``): the actor yields the
worker's events as they happen, in batches (what queued up since the last yield), the driver waits on all generators
at once (``ray.wait``) and reads each batch as it arrives. A row's weights go into the object store of the actor's
node and the event carries only their reference: the driver fetches the weights it keeps and writes them, the others
never leave the node (with keep_weights = "topk" nearly all). The base network goes the other way, ``ray.put`` once,
its reference sent to each actor once, and fetched by an actor only when it does not hold it yet. An actor that dies
(its process, its node) fails its generator with ``RayActorError``: the transport reports the worker lost, the
driver puts its rows back to pending, and a new actor replaces it while its node lives.

``NPS_RAY_GPUS_AS_CPU=1`` (for tests): actors still take one ``GPU`` resource each but train on the CPU, so a
cluster with fake GPU resources behaves like a GPU cluster on a machine without one.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import queue
import re
import socket
import threading
import time
from typing import Any

from nps.pipeline.errors import NpsError, one_line
from nps.pipeline.run.pools import MAX_RESTARTS, WorkerPool
from nps.pipeline.run.protocol import (
    BaseWeights,
    Event,
    Task,
    WorkerFailed,
    WorkerLost,
    WorkerSpec,
    WorkerStarted,
)

log = logging.getLogger(__name__)

INSTALL_HINT = "install Ray: pip install 'nps[ray]' (or pip install 'ray[default]')"
SCAN_S = 5.0  # how often the driver looks for nodes that joined
ALONE_S = 300.0  # with no worker alive and none starting this long, the run gives up (it resumes later)
ACTOR_PROGRESS_S = 1.0  # progress messages per actor: one a second is plenty for a cluster's view
GPUS_AS_CPU_ENV = "NPS_RAY_GPUS_AS_CPU"
# A head node accepts a TCP connection in milliseconds and a port nothing listens on refuses it at once; this bounds
# an address whose packets go nowhere. ray.init itself retries such an address for minutes.
PROBE_S = 3.0
_END = object()


def require_ray(key: str = "--ray") -> None:
    """One line saying how to install Ray when it is missing (before any work starts)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise NpsError(f"{key}: Ray is not installed; {INSTALL_HINT}") from None


def probe_address(address: str, key: str = "--ray", timeout_s: float = PROBE_S) -> None:
    """Refuse within seconds, in one line naming the address, a Ray address (``HOST:PORT``, ``ray://HOST:PORT``)
    where nothing accepts a TCP connection, before ``ray.init`` would wait minutes on it. ``auto`` probes
    RAY_ADDRESS when it is set; without it Ray finds or starts a cluster on this machine (nothing to probe)."""
    target, where = str(address).strip(), f"{key} {str(address).strip()}"
    if target == "auto":
        target = os.environ.get("RAY_ADDRESS", "").strip()
        where = f"{key} auto: RAY_ADDRESS={target}"
    found = re.fullmatch(r"(?:ray://)?\[?([^\[\]]+?)\]?:(\d{1,5})", target)
    if found is None:  # empty, "auto"/"local" in RAY_ADDRESS, or a form Ray parses itself
        return
    host, port = found.group(1), int(found.group(2))
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = f"no answer in {timeout_s:g} s" if isinstance(exc, TimeoutError) else exc.strerror or one_line(exc)
        raise NpsError(f"{where}: no Ray cluster answers there ({reason}); start its head node with "
                       f"`ray start --head --port {port}` (or give the address `ray start` printed), or drop --ray "
                       "to run on this machine") from None


def _staged(event):
    """A row result's weights go into this node's object store; the event carries the reference, so the driver
    fetches only the weights it keeps (most rows of a topk run are not)."""
    import ray

    from nps.pipeline.run.protocol import RowResult, StagedWeights

    if isinstance(event, RowResult) and isinstance(event.weights, bytes):
        return dataclasses.replace(event, weights=StagedWeights(len(event.weights), ref=ray.put(event.weights)))
    return event


class RayWorker:
    """The actor: a :class:`~nps.pipeline.run.worker.Worker` whose events a streaming generator yields."""

    def __init__(self, wid: int, spec: WorkerSpec, threads: int, node: str, gpus_as_cpu: bool):
        self.wid, self.spec, self.threads, self.node, self.gpus_as_cpu = wid, spec, threads, node, gpus_as_cpu
        self.stop_event = threading.Event()
        self.worker = None
        self.base_refs: dict[str, Any] = {}  # the base network's object, by key: the driver sends its reference once
        logging.basicConfig(level=spec.log_level)

    def _device(self) -> str:
        import ray

        gpus = ray.get_gpu_ids()
        if not gpus or self.gpus_as_cpu:
            return "cpu"
        import torch  # only here: a worker class that trains nothing (tools/bench_dispatch.py) never needs it
        if not torch.cuda.is_available():
            raise NpsError(f"node {self.node}: Ray gave this worker GPU {gpus[0]} but torch sees no CUDA device "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')})")
        return "cuda:0"  # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPU

    def setup(self):
        from nps.pipeline.run.worker import Worker, setup_failure

        try:
            self.worker = (self.spec.worker_class or Worker)(self.wid, self.spec, self._device(), self.threads,
                                                             self.node, lambda e: None, self.stop_event.is_set,
                                                             progress_s=ACTOR_PROGRESS_S)
            return self.worker.setup()
        except Exception as exc:  # noqa: BLE001 - reported to the driver, which stops the run
            return setup_failure(self.wid, exc)

    def run(self, task: Task, base: BaseWeights | None):
        """Serve one task; yields the worker's events in batches (every event queued since the last yield: a
        cohort's results and its end arrive together, and each item read costs the driver a round trip)."""
        from nps.pipeline.run.worker import serve_task

        if base is not None:
            import ray

            if base.ref is not None:
                self.base_refs[base.key] = base.ref
            ref = self.base_refs.get(base.key)
            if ref is not None:  # fetched only when the worker does not hold this version yet
                base = dataclasses.replace(base, ref=None, fetch=lambda ref=ref: ray.get(ref))
        events: queue.SimpleQueue = queue.SimpleQueue()

        def work() -> None:
            try:
                self.worker.emit = events.put
                serve_task(self.worker, task, base, events.put)
            finally:
                events.put(_END)

        threading.Thread(target=work, name="nps-task", daemon=True).start()
        while True:
            batch = [events.get()]
            try:
                while True:
                    batch.append(events.get_nowait())
            except queue.Empty:
                pass
            end = batch[-1] is _END
            batch = [_staged(e) for e in batch if e is not _END]
            if batch:
                yield batch
            if end:
                return

    def stop(self) -> None:
        self.stop_event.set()


class RayPool(WorkerPool):
    """Worker actors on a Ray cluster (see the module docstring)."""

    kind = "ray"

    def __init__(self, address: str, *, key: str = "--ray"):
        require_ray(key)
        self.address, self.key = address, key
        self.gpus_as_cpu = os.environ.get(GPUS_AS_CPU_ENV, "") not in ("", "0")
        self.actors: dict[int, Any] = {}
        self.info: dict[int, tuple[str, str, str]] = {}  # wid -> (node id, node label, device)
        self.restarts: dict[str, int] = {}
        self.nodes: set[str] = set()
        self.setups: dict[Any, int] = {}
        self.streams: dict[Any, int] = {}
        self.events: list[Event] = []
        self.bases: dict[str, Any] = {}
        self.base_sent: dict[int, str] = {}  # the base network key each actor has been sent the reference of
        self.spec_ref = None
        self.remote = None
        self._next, self._scanned, self._alone_since = 0, 0.0, time.monotonic()
        self.started = self.stopping = False

    # -- start -------------------------------------------------------------------------------------------------------

    def start(self, spec: WorkerSpec, out_dir: str = "") -> None:
        import ray

        probe_address(self.address, self.key)
        address = None if self.address == "auto" else self.address
        try:
            debug = spec.log_level <= logging.DEBUG
            ray.init(address=address, namespace="nps", include_dashboard=False, ignore_reinit_error=True,
                     log_to_driver=debug, logging_level=logging.INFO if debug else logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise NpsError(f"{self.key}: cannot connect to the Ray cluster at {self.address} ({one_line(exc)}); "
                           "start it with `ray start --head` or give its address") from None
        self.started = True
        self.spec_ref = ray.put(spec)
        self.remote = ray.remote(RayWorker)
        self._scan()

    def _scan(self) -> None:
        """Start actors on every alive node that has none yet."""
        import ray

        self._scanned = time.monotonic()
        alive = [n for n in ray.nodes() if n.get("Alive")]
        alive_ids = {n["NodeID"] for n in alive}
        for wid in [w for w, (node_id, _, _) in self.info.items() if node_id not in alive_ids]:
            self._lost(wid, "its node died")  # an idle actor's death shows nowhere else
        gpu_cluster = any(n["Resources"].get("GPU", 0) >= 1 for n in alive)
        for n in alive:
            node_id = n["NodeID"]
            if node_id in self.nodes:
                continue
            self.nodes.add(node_id)
            for _ in range(self._plan(n, gpu_cluster)[0]):
                self._start_actor(n, gpu_cluster)

    @staticmethod
    def _plan(node: dict, gpu_cluster: bool) -> tuple[int, int, int]:
        """(actors, CPUs each, GPUs each) for a node: one per GPU, else (CPU-only cluster) one with every core."""
        cpus = int(node["Resources"].get("CPU", 0))
        if gpu_cluster:
            gpus = int(node["Resources"].get("GPU", 0))
            return gpus, (cpus // gpus if gpus else 0), 1
        return (1 if cpus else 0), cpus, 0

    def _start_actor(self, node: dict, gpu_cluster: bool) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        _, cpus, gpus = self._plan(node, gpu_cluster)
        wid, self._next = self._next, self._next + 1
        label = f"{node.get('NodeManagerAddress', '?')}/{node['NodeID'][:6]}"
        threads = max(1, min(cpus, 4) if gpus else cpus)
        actor = self.remote.options(
            num_cpus=cpus, num_gpus=gpus, max_concurrency=2, max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
        ).remote(wid, self.spec_ref, threads, label, self.gpus_as_cpu)
        self.actors[wid] = actor
        self.info[wid] = (node["NodeID"], label, "gpu" if gpus else "cpu")
        self.setups[actor.setup.remote()] = wid
        self.events.append(WorkerStarted(wid, label, "cuda" if gpus and not self.gpus_as_cpu else "cpu"))

    # -- tasks and events --------------------------------------------------------------------------------------------

    def base_weights(self, path: str) -> BaseWeights:
        return BaseWeights.from_file(path, embed=True)

    def commit_weights(self, weights, path) -> bool:
        """A row's weights from the object store of the node that trained it (False when that node died)."""
        if getattr(weights, "ref", None) is None:
            return super().commit_weights(weights, path)
        import ray

        from nps.pipeline.files import write_atomic

        try:
            data = ray.get(weights.ref, timeout=120)
        except Exception:  # noqa: BLE001 - the object's owner (the actor) or its node died
            return False
        write_atomic(path, data)
        return True

    def submit(self, worker: int, task: Task, base: BaseWeights | None) -> None:
        import ray

        if base is not None:  # the bytes go into the object store once; tasks carry a reference
            if base.key not in self.bases:
                self.bases[base.key] = ray.put(base.data)
            if self.base_sent.get(worker) == base.key:
                base = BaseWeights(base.key)  # the actor holds the reference (serialising one costs milliseconds)
            else:
                base = BaseWeights(base.key, ref=self.bases[base.key])
                self.base_sent[worker] = base.key
        self.streams[self.actors[worker].run.remote(task, base)] = worker

    def poll(self, timeout: float) -> list[Event]:
        import ray

        if time.monotonic() - self._scanned > SCAN_S and not self.stopping:
            self._scan()
        waitables = list(self.setups) + list(self.streams)
        if not waitables:
            time.sleep(0 if self.events else timeout)
        else:
            ready, _ = ray.wait(waitables, num_returns=1, timeout=0 if self.events else timeout)
            if ready:
                ready, _ = ray.wait(waitables, num_returns=len(waitables), timeout=0)
            for item in ready:
                if item in self.setups:
                    self._setup_done(item)
                elif item in self.streams:
                    self._read_stream(item)
        if self.actors:
            self._alone_since = time.monotonic()
        out, self.events = self.events, []
        return out

    def _setup_done(self, ref) -> None:
        import ray

        wid = self.setups.pop(ref)
        try:
            self.events.append(ray.get(ref))
        except ray.exceptions.RayActorError as exc:
            self._lost(wid, type(exc).__name__)

    def _read_stream(self, gen) -> None:
        import ray

        wid = self.streams[gen]
        try:  # ready: its next batch has arrived, or it ended (one batch per poll; the next poll reads on)
            self.events.extend(ray.get(next(gen)))
        except StopIteration:
            del self.streams[gen]
        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as exc:
            del self.streams[gen]
            self._lost(wid, type(exc).__name__)
        except ray.exceptions.RayTaskError as exc:  # the actor's glue raised: a bug
            del self.streams[gen]
            self.events.append(WorkerFailed(wid, one_line(exc), str(exc), user_error=False))

    def _lost(self, wid: int, reason: str) -> None:
        """Report a dead actor, and replace it while its node lives (MAX_RESTARTS per node)."""
        import ray

        if wid not in self.actors:
            return
        del self.actors[wid]
        for ref in [r for r, w in self.setups.items() if w == wid]:
            del self.setups[ref]
        for gen in [g for g, w in self.streams.items() if w == wid]:
            del self.streams[gen]
        node_id, label, _ = self.info.pop(wid)
        self.events.append(WorkerLost(wid, f"the worker on {label} died ({reason})"))
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        node = next((n for n in nodes if n["NodeID"] == node_id), None)
        if node is None:
            self.nodes.discard(node_id)
            return
        self.restarts[node_id] = self.restarts.get(node_id, 0) + 1
        if self.restarts[node_id] <= MAX_RESTARTS and not self.stopping:
            self._start_actor(node, any(n["Resources"].get("GPU", 0) >= 1 for n in nodes))

    # -- stop --------------------------------------------------------------------------------------------------------

    def request_stop(self) -> None:
        self.stopping = True
        for actor in self.actors.values():
            actor.stop.remote()

    def terminate(self) -> None:
        import ray

        self.stopping = True
        for actor in self.actors.values():
            ray.kill(actor, no_restart=True)

    def close(self, timeout: float = 10.0) -> None:
        import ray

        if not self.started:
            return
        self.terminate()
        self.actors.clear()
        self.setups.clear()
        self.streams.clear()
        ray.shutdown()
        self.started = False

    def exhausted(self) -> bool:
        return not self.actors and time.monotonic() - self._alone_since > ALONE_S
