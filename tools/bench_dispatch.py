"""How many results per second one driver sustains: the real driver, ledger and results.h5 with W simulated workers.

The workers are the real transports (``LocalPool``: one spawned process per worker; ``RayPool``: one actor per fake
GPU of a Ray cluster that this script starts on this machine, loopback only, inside a network namespace of its own)
running :class:`SimulatedWorker` instead of the trainer: a cohort "trains" by sleeping ``--train-s`` (±20 %
jitter), sends progress as the real worker does, then one :class:`RowResult` per row with realistic metrics and,
where the driver asks for them, weights of the subnetwork's real size (4 bytes per parameter of its pruned network,
from the layer table of ``--model``), staged as the real workers stage them: a file in the run's staging directory
(local) or an object in the node's store (Ray). The simulated workers do not pay for making those weights (the
file is sparse; an actor puts one object of the mean size once and refers to it), since W workers that really wrote
22 MB per row on one 2-core machine would measure this machine's page cache, not the driver; on a fleet each node
pays for its own. Everything the driver does is real: the ledger writes every change through to results.h5 (two
flushes per group of results), kept weights are moved (local) or fetched and written (Ray) under weights/, the
others released, log.jsonl gets every event, the view (``--view``) renders.

The offered load is W·k/train_s results/s; with it above the driver's limit, the measured rate is that limit. One
JSON line per measurement: ``results_per_s`` (finished rows per second between the 10 % and 90 % marks of the run)
against ``offered_per_s`` (the baseline: what the workers would deliver to a driver that costs nothing), and
``driver_cpu_s_per_result`` (the driver process's CPU time in that window over its results).

usage: python tools/bench_dispatch.py [--workers 8,64,256] [--transports local,ray] [--rows 4000] [--train-s 2]
                                      [--cohort 4] [--model resnet50] [--keep-weights topk] [--view plain]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SPACES = ("std-0.01", "std-0.05", "std-0.1", "mcb-0.9-1.1")


@dataclass(frozen=True)
class Simulation:
    """What every simulated worker needs (it stands in for the experiment's config in the worker spec, so that a
    worker process imports neither torch nor the layer table: 256 of them fit in this machine's memory)."""

    train_s: float
    epochs: int
    weight_bytes: dict  # space key -> bytes of each row's weights (np.ndarray)
    base_top1: float = 93.0
    progress_s: float = 0.5


class SimulatedWorker:
    """The real worker's interface (:class:`nps.pipeline.run.worker.Worker`) over a sleep."""

    def __init__(self, wid, spec, device, threads, node, emit, should_stop, progress_s=None):
        self.wid, self.spec, self.device, self.threads, self.node = wid, spec, device, threads, node
        self.emit, self.should_stop = emit, should_stop
        self.sim: Simulation = spec.config
        self.progress_s = progress_s if progress_s is not None else self.sim.progress_s
        self.rng = random.Random(wid)
        self._object = None  # Ray: the one object of the mean weights size this actor refers to

    def _weights(self, task_id: int, row: int, size: int):
        from nps.pipeline.run.protocol import StagedWeights

        if self.spec.staging:  # a sparse file of the real size, where the real worker would leave it
            path = os.path.join(self.spec.staging, f"w{self.wid}-t{task_id}-r{row}.pt")
            with open(path, "wb") as fh:
                fh.truncate(size)
            return StagedWeights(size, path=path)
        import ray

        if self._object is None:
            mean = int(np.mean(np.concatenate(list(self.sim.weight_bytes.values()))))
            self._object = (mean, ray.put(b"\0" * mean))
        return StagedWeights(self._object[0], ref=self._object[1])

    def setup(self):
        from nps.pipeline.run.protocol import Ready

        return Ready(self.wid, self.node, self.device, self.threads)

    def run(self, task, base) -> None:
        from nps.pipeline.row_status import RowStatus
        from nps.pipeline.run.protocol import BaseResult, BaseTask, Progress, RowResult
        from nps.pipeline.run.worker import Stopped
        from nps.pipeline.training.events import Result, StepProgress

        if isinstance(task, BaseTask):
            self.emit(BaseResult(self.wid, task.task_id, self.sim.base_top1, 99.5, 0.2, task.train, 0.0,
                                 b"\0" * 1024 if task.train else None))
            return
        seconds = self.sim.train_s * self.rng.uniform(0.8, 1.2)
        epochs, steps = self.sim.epochs, 100
        t0 = time.monotonic()
        while True:
            if self.should_stop():
                raise Stopped()
            done = min(1.0, (time.monotonic() - t0) / seconds)
            epoch = min(epochs, int(done * epochs) + 1)
            step = int((done * epochs - (epoch - 1)) * steps)
            self.emit(Progress(self.wid, task.task_id, StepProgress(epoch, epochs, step, steps, len(task.rows), 5000.0)))
            if done >= 1.0:
                break
            time.sleep(max(0.0, min(self.progress_s, seconds - (time.monotonic() - t0))) + 1e-3)
        sizes = self.sim.weight_bytes[task.space]
        for row, seed in zip(task.rows, task.seeds):
            top1 = self.sim.base_top1 - 3.0 - 4.0 * random.Random(seed).random()
            weights = self._weights(task.task_id, row, int(sizes[row])) if task.wants_weights(top1) else None
            curve = tuple(np.linspace(top1 - 5.0, top1, epochs).tolist())
            result = Result((task.space, row), RowStatus.DONE, top1=top1, top5=99.0, loss=0.3, bn_top1=top1 - 20.0,
                            curve=list(curve), train_s=seconds, cohort_size=len(task.rows))
            self.emit(RowResult(self.wid, task.task_id, task.space, row, result, weights=weights))


def _light(spec, sim: Simulation):
    return dataclasses.replace(spec, config=sim, table=None, worker_class=SimulatedWorker)


def make_pools(sim: Simulation):
    from nps.pipeline.run.pools import LocalPool
    from nps.pipeline.run.ray_pool import RayPool

    class SimLocalPool(LocalPool):
        def start(self, spec, out_dir=""):
            super().start(_light(spec, sim), out_dir)

    class SimRayPool(RayPool):
        def start(self, spec, out_dir=""):
            super().start(_light(spec, sim), out_dir)

    return SimLocalPool, SimRayPool


class Recorder:
    """A view that records (wall, driver CPU) at every finished row, passing everything to the real view."""

    def __init__(self, inner):
        self.inner, self.marks = inner, []

    def start(self, state):
        self.inner.start(state)

    def update(self, state, force=False):
        self.inner.update(state, force)

    def note(self, text):
        self.inner.note(text)

    def epoch(self, state, wid, text):
        self.inner.epoch(state, wid, text)

    def row_finished(self, state, row):
        self.marks.append((time.time(), time.process_time()))
        self.inner.row_finished(state, row)

    def stop(self, state):
        self.inner.stop(state)


def make_view(kind: str):
    from rich.console import Console

    from nps.pipeline.views.terminal import LiveView, PlainView

    sink = open(os.devnull, "w")
    if kind == "live":  # rendered as on a 50-line terminal, written to /dev/null
        return LiveView(Console(file=sink, force_terminal=True, width=140, height=50))
    return PlainView(sink)


def make_plan(out: str, table, rows: int, epochs: int, cohort: int, keep_weights: str, seed: int = 0):
    from nps.pipeline.experiment.config import Config, SpaceConfig, expand_spaces
    from nps.pipeline.experiment.plan import Plan

    cfg = Config()
    cfg.experiment.name, cfg.experiment.out, cfg.experiment.seed = "bench-dispatch", out, seed
    cfg.experiment.baseline = False
    cfg.dataset.dir, cfg.model.name = "unused", table.model
    cfg.spaces = [SpaceConfig(name=s, c_flops=[0.25], n=rows // len(SPACES)) for s in SPACES]
    cfg.retrain.epochs, cfg.retrain.cohort_size = epochs, cohort
    cfg.output.keep_weights = keep_weights
    return Plan(cfg, {"fingerprint": "simulated"}, table, table.resolution, table.in_channels, table.num_classes,
                expand_spaces(cfg), "", os.path.join(out, "results.h5"), os.path.join(out, "base.pt"))


def weight_sizes(plan) -> dict:
    """Bytes of each row's weights: its pruned network's parameters in float32 (plus 2 % for buffers and names)."""
    from nps.pipeline.experiment.sampling import sample_rows

    sizes = {}
    for p in plan.spaces:
        rows, _, _ = sample_rows(plan.table, p.space, p.n, plan.config.experiment.seed)
        sizes[p.key] = (rows["params"].astype(np.float64) * 4 * 1.02).astype(np.int64)
    return sizes


def measure(transport: str, workers: int, args, table, out: str) -> dict:
    from nps.pipeline.run import run_experiment

    plan = make_plan(out, table, args.rows, args.epochs, args.cohort, args.keep_weights)
    sim = Simulation(args.train_s, args.epochs, weight_sizes(plan))
    SimLocalPool, SimRayPool = make_pools(sim)
    pool = SimLocalPool(["cpu"] * workers) if transport == "local" else SimRayPool("auto")
    view = Recorder(make_view(args.view))
    t0 = time.monotonic()
    if args.profile:  # the driver's own time, by function (stderr): where the limit is
        import cProfile
        import pstats

        profile = cProfile.Profile()
        outcome = profile.runcall(run_experiment, plan, view, pool=pool)
        pstats.Stats(profile, stream=sys.stderr).sort_stats("tottime").print_stats(args.profile)
    else:
        outcome = run_experiment(plan, view, pool=pool)
    wall = time.monotonic() - t0
    # The window: from the later of the 10 % mark and the last worker ready (Ray starts actors a few at a time) to
    # the 90 % mark, so that neither the fleet's start nor its tail is counted.
    with open(os.path.join(out, "log.jsonl")) as fh:
        ready = max(e["t"] for e in map(json.loads, fh) if e["event"] == "ready")
    marks = view.marks
    n = len(marks)
    first = max(int(0.1 * n), next((i for i, m in enumerate(marks) if m[0] >= ready), n - 1))
    last = min(n - 1, int(0.9 * n))
    lo, hi = marks[first], marks[last]
    window = hi[0] - lo[0]
    count = last - first
    if count <= 0:  # the fleet was still starting at the 90 % mark: give more --rows
        window = 0.0
    sizes = np.concatenate(list(sim.weight_bytes.values()))
    offered = workers * args.cohort / args.train_s
    return {"bench": "dispatch", "transport": transport, "workers": workers, "rows": n, "window_rows": count,
            "status": outcome.status, "train_s": args.train_s, "cohort": args.cohort, "model": table.model,
            "keep_weights": args.keep_weights, "view": args.view, "weights_mb_mean": round(sizes.mean() / 2**20, 2),
            "results_per_s": round(count / window, 1) if window > 0 else None,
            "offered_per_s": round(offered, 1), "baseline": "offered load W*k/train_s (a driver that costs nothing)",
            "ratio": round(count / window / offered, 3) if window > 0 else None,
            "driver_cpu_s_per_result": round((hi[1] - lo[1]) / max(count, 1), 5), "wall_s": round(wall, 1)}


def inside_namespace(argv: list[str]) -> int:
    """Run this script again in a fresh network namespace holding only ``lo`` (Ray binds to loopback only)."""
    command = f"ip link set lo up && exec {sys.executable} {os.path.abspath(__file__)} --inside " + " ".join(argv)
    return subprocess.call(["unshare", "-n", "sh", "-c", command])


def start_ray(workers: int, temp: str):
    """A local Ray head with ``workers`` fake GPUs (the actors train nothing), stopped by ray.shutdown."""
    import ray

    os.environ["RAY_TMPDIR"] = temp
    os.environ["NPS_RAY_GPUS_AS_CPU"] = "1"
    # The raylet starts 2 worker processes at a time by default (one per core here); a real node starts its own few
    # actors, this one node hosts the whole simulated fleet.
    os.environ["RAY_worker_maximum_startup_concurrency"] = "16"
    ray.init(num_cpus=workers, num_gpus=workers, include_dashboard=False, namespace="nps",
             object_store_memory=max(200, 8 * workers) * 2**20, _temp_dir=os.path.join(temp, "ray"),
             log_to_driver=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="8,64,256")
    ap.add_argument("--transports", default="local,ray")
    ap.add_argument("--rows", type=int, default=4000, help="rows per measurement (4 spaces)")
    ap.add_argument("--train-s", type=float, default=2.0, help="seconds a simulated cohort trains")
    ap.add_argument("--cohort", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=50, help="curve length (the paper's fine-tuning epochs)")
    ap.add_argument("--model", default="resnet50", help="base network whose subnetworks' weights travel")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--keep-weights", default="topk", choices=["all", "topk", "none"])
    ap.add_argument("--view", default="plain", choices=["plain", "live"])
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="print the driver's N costliest functions")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    transports = args.transports.split(",")
    if "ray" in transports and not args.inside:
        return inside_namespace(sys.argv[1:])
    # stdout carries the JSON lines only: whatever else writes to it (Ray's raylet warnings) goes to stderr
    results = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    from nps.pipeline.network.layer_table import build_layer_table

    table = build_layer_table(args.model, "all", args.resolution, 10)
    for transport in transports:
        for workers in [int(w) for w in args.workers.split(",")]:
            temp = tempfile.mkdtemp(prefix="nps-bench-", dir="/tmp")
            try:
                if transport == "ray":
                    start_ray(workers, temp)
                print(json.dumps(measure(transport, workers, args, table, os.path.join(temp, "run"))), file=results,
                      flush=True)
            finally:
                if transport == "ray":
                    import ray

                    ray.shutdown()
                shutil.rmtree(temp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
