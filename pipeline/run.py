"""The run driver behind `nps run`: an experiment end to end, resumable, one worker process per device.

Processes::

    main (the writer)                               worker i (one per device; spawned)
    ─────────────────                               ─────────────────────────────────
    validate → create/open results.h5
    sample every missing space (rows: pending)
    reset 'running' rows → pending
    start workers ─────────────────────────────────► load data, build loaders → "ready"
    base task ("train" or "evaluate") ─────────────► train/evaluate the base network, save out/base.pt
    set base_top1/base_top5 ◄────────────────────── "base_done"
    loop: an idle worker gets a cohort of pending
          rows (marked running) ───────────────────► prune each row from the base, adaptive BN, train_cohort
          mark_done / mark_failed, log.jsonl ◄───── "done"/"failed" per row, "progress"/"epoch", "idle"
          a space finished: two-stage top-k space,
          weights of rows outside the top-k removed
    all rows finished → "exit" to every worker

The main process is the one writer of results.h5 (the store's lock enforces it) and owns the terminal; workers only
send messages over one queue and write their own files (``out/base.pt``, ``out/weights/<space>/<row>.pt``, each
atomically). It also appends one JSON line per event to ``out/log.jsonl`` (dispatch, done, failed, interrupted):
the audit trail of which row was trained when and by whom.

Resuming: running the same command again opens results.h5 (the stored config must match, runtime-only keys such as
``out``, ``devices``, ``cohort_size`` aside), keeps every finished row, puts rows left 'running' back to pending,
samples only spaces that are missing, and skips the base network when its metrics are stored (``out/base.pt`` or
the configured checkpoint gives the weights).

Ctrl-C (SIGINT, or SIGTERM): the first one asks the workers to stop after their current step (they ignore SIGINT
themselves), results that arrive meanwhile are still written, then every in-flight row goes back to pending and
:func:`run_experiment` returns an ``interrupted`` outcome; a second one terminates the workers at once. SIGKILL
needs nothing: rows left 'running' are redone by the next run. Workers die with the main process (PR_SET_PDEATHSIG).

Two-stage (``[two_stage] enabled``): when every row of a space has finished its ``retrain.epochs``, the ``top_k``
rows by top-1 are copied (their recipes and seeds) into a new space ``<space>#top`` (attrs ``stage = "top"``,
``parent``, ``parent_rows``), whose rows are then retrained from the pruned base weights for ``full_epochs``. Its
``space`` attribute is the parent's with ``#top`` appended (``std-0.05#top``), so an analysis grouping by that
attribute keeps the two populations apart.
"""
from __future__ import annotations

import collections
import json
import logging
import math
import multiprocessing as mp
import os
import queue
import signal
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from nps.pipeline.config import Config, Plan, differing_keys, dump, parse_config
from nps.pipeline.errors import NpsError
from nps.pipeline.live import RunState, SpaceState, WorkerState
from nps.pipeline.store import DONE, FAILED, PENDING, RECIPE_FIELDS, RUNNING, ResultsStore

log = logging.getLogger(__name__)

TOP_SUFFIX = "#top"
STOP_GRACE_S = 60.0  # after Ctrl-C, how long workers get to finish their step before they are terminated
AUTO_COHORT = {"cpu": 8, "cuda": 32}  # rows handed to a worker at once with cohort_size = "auto"
MAX_ATTEMPTS = 2  # a row in flight when its worker died this often is marked failed
MAX_RESTARTS = 3  # worker processes restarted per device after a crash


def row_cost(epochs: int, c_flops: float) -> float:
    """Estimated work of retraining one row, in base-network epochs (a fixed part plus a part ∝ FLOPs)."""
    return epochs * (0.2 + 0.8 * float(c_flops))


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


# --------------------------------------------------------------------------------------------------------------------
# The results file: create, or reopen to resume.


def open_results(plan: Plan) -> tuple[ResultsStore, bool]:
    """(store, resumed): a new results.h5, or the existing one after checking it holds this experiment."""
    cfg, path = plan.config, plan.results_path
    attrs = {"base_flops": plan.table.base_flops, "base_params": plan.table.base_params,
             "dataset_fingerprint": plan.meta["fingerprint"], "experiment": cfg.experiment.name}
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return ResultsStore.create(path, plan.table, dump(cfg), attrs), False
    store = ResultsStore.open(path)
    try:
        _check_same_experiment(store, plan)
    except BaseException:
        store.close()
        raise
    return store, True


def _check_same_experiment(store: ResultsStore, plan: Plan) -> None:
    from nps.pipeline.graph import LayerTable

    path = plan.results_path
    hint = "resume with the same settings, or start a new run with another --out"
    try:
        stored = parse_config(store.attrs.get("config", ""), f"{path} (stored config)")
    except NpsError as exc:
        raise NpsError(f"{path} was not written by `nps run` or by an incompatible version ({exc}); {hint}") from None
    diff = differing_keys(stored, plan.config)
    if diff:
        shown = ", ".join(f"{k} (stored {a!r}, now {b!r})" for k, a, b in diff[:4])
        more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
        raise NpsError(f"{path} holds a different experiment: {shown}{more}; {hint}")
    if store.attrs.get("dataset_fingerprint") != plan.meta["fingerprint"]:
        raise NpsError(f"dataset.dir: {plan.config.dataset.dir} is not the dataset {path} was made with "
                       f"(fingerprints differ); {hint}")
    if "layers" in store.file and LayerTable.from_hdf5(store.layers) != plan.table:
        raise NpsError(f"{path}: its layer table differs from {plan.config.model.name} as configured; {hint}")


def sample_missing_spaces(store: ResultsStore, plan: Plan, progress=None) -> list[str]:
    """Sample every configured space the file does not have yet (status pending); returns their names.

    All spaces are drawn in memory before any is written, so an interrupt while sampling leaves no half space.
    """
    from nps.kernels.errors import SamplerError
    from nps.pipeline.sampling import sample_rows

    cfg = plan.config
    present = set(store.spaces())
    drawn = []
    for index, space in plan.spaces:
        if space.regime in present:
            continue
        scfg = cfg.spaces[index]
        if progress:
            progress(f"sampling {space.regime}: {scfg.n} recipes")
        try:
            rows, attrs, _ = sample_rows(plan.table, space, scfg.n, cfg.experiment.seed,
                                         max_seconds=scfg.max_seconds)
        except SamplerError as exc:
            raise NpsError(f"spaces[{index}]: {exc}") from None
        attrs.update(stage="sample", n=int(scfg.n))
        drawn.append((space.regime, rows, attrs))
    for name, rows, attrs in drawn:
        store.add_space(name, rows, epochs=cfg.retrain.epochs, attrs=attrs)
    return [name for name, _, _ in drawn]


# --------------------------------------------------------------------------------------------------------------------
# Worker side (runs in the spawned processes).


class _Stopped(Exception):
    """Raised inside a worker's training loop when the main process asked to stop."""


@dataclass
class WorkerSpec:
    """What a worker needs to know (pickled into the spawned process)."""

    config: Config
    table: Any
    resolution: int
    in_channels: int
    num_classes: int
    results_path: str
    base_path: str
    parent_pid: int
    log_level: int = logging.WARNING


def _die_with_parent(parent_pid: int) -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl
        os._exit(1)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


class _Limited:
    """At most ``images`` images of each pass over ``loader``: whole batches (training) or exactly ``images``
    (evaluation, the last batch cut). On the CPU batches are made NCHW-contiguous (what the engine trains in)."""

    def __init__(self, loader, images: int, *, whole_batches: bool, contiguous: bool):
        self.loader, self.images, self.whole, self.contiguous = loader, int(images), whole_batches, contiguous
        batch = int(getattr(loader, "batch_size", 0) or 1)
        full = len(loader)
        if not self.images:
            self.batches = full
        elif whole_batches:
            self.batches = max(1, min(full, self.images // batch))
        else:
            self.batches = min(full, -(-self.images // batch))

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        seen = 0
        for i, (x, y) in enumerate(self.loader):
            if i >= self.batches:
                break
            if self.images and not self.whole and seen + len(y) > self.images:
                cut = self.images - seen
                x, y = x[:cut], y[:cut]
            seen += len(y)
            yield (x.contiguous() if self.contiguous else x), y


class _Worker:
    def __init__(self, wid: int, device: str, threads: int, spec: WorkerSpec, results, stop):
        import torch

        self.wid, self.device, self.spec, self.results, self.stop = wid, torch.device(device), spec, results, stop
        self.cfg: Config = spec.config
        self.threads = threads
        self._loaders: dict[int, tuple] = {}
        self._base = None
        self._last_send = 0.0
        torch.set_num_threads(threads)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def send(self, kind: str, payload: dict | None = None) -> None:
        self.results.put((kind, self.wid, payload or {}))

    def loaders(self, batch_size: int):
        if batch_size not in self._loaders:
            from nps.datasets.loaders import make_loaders

            d = self.cfg.dataset
            train, val, info = make_loaders(
                d.dir, batch_size=batch_size, resolution=self.spec.resolution, device=self.device,
                in_channels=self.spec.in_channels, num_workers=d.workers or self.threads, on_device=d.on_device,
                seed=self.cfg.experiment.seed * 1000 + self.wid, val_batch_size=d.val_batch_size, augment=d.augment)
            cpu = self.device.type == "cpu"
            self._loaders[batch_size] = (_Limited(train, d.train_images, whole_batches=True, contiguous=cpu),
                                         _Limited(val, d.val_images, whole_batches=False, contiguous=cpu), info)
        return self._loaders[batch_size]

    def on_event(self, context: dict):
        def handle(event: dict) -> None:
            kind = event["event"]
            if kind in ("progress", "epoch"):
                if self.stop.is_set():
                    raise _Stopped()
                now = time.monotonic()
                if kind == "epoch" or now - self._last_send >= 0.5:
                    self._last_send = now
                    keep = ("epoch", "epochs", "step", "steps", "img_per_s", "k_live", "seconds")
                    payload = {k: event[k] for k in keep if k in event}
                    if kind == "epoch":
                        payload["step"] = payload["steps"] = event.get("steps", 0)
                        losses = list(event.get("train_loss", {}).values())
                        payload["train_loss"] = float(np.mean(losses)) if losses else math.nan
                        tops = list(event.get("val_top1", {}).values())
                        payload["val_top1"] = float(np.max(tops)) if tops else math.nan
                    self.send(kind, {**context, **payload})
            elif kind in ("done", "failed") and context["phase"] == "cohort":
                self.finished(context, event["id"], event["result"])
            elif kind == "oom":
                self.send("note", {"text": f"{self.device}: out of memory with {event['k']} subnetworks; "
                                           f"retrying in cohorts of {event['retry_k']}"})
        return handle

    # -- base network ------------------------------------------------------------------------------------------------

    def base_model(self):
        if self._base is None:
            from nps.pipeline.config import check_checkpoint
            from nps.pipeline.models import build_model

            s = self.spec
            model = build_model(self.cfg.model.name, num_classes=s.num_classes, in_channels=s.in_channels)
            path = self.cfg.model.checkpoint or s.base_path
            model.load_state_dict(check_checkpoint(path, self.cfg.model.name, s.num_classes, s.in_channels))
            self._base = model.eval()
        return self._base

    def base(self, task: dict) -> None:
        import torch

        from nps.pipeline.engine import resolve_amp, train_cohort
        from nps.pipeline.models import build_model
        from nps.pipeline.train import RetrainConfig as TrainSettings, evaluate

        b, s = self.cfg.base, self.spec
        t0 = time.perf_counter()
        if task["train"]:
            train, val, _ = self.loaders(b.batch_size)
            torch.manual_seed(self.cfg.experiment.seed)
            model = build_model(self.cfg.model.name, num_classes=s.num_classes, in_channels=s.in_channels)
            settings = TrainSettings(method="rewind", epochs=b.epochs, rewind_lr=b.lr, warmup_epochs=b.warmup_epochs,
                                     momentum=b.momentum, weight_decay=b.weight_decay,
                                     label_smoothing=b.label_smoothing)
            (result,) = train_cohort([model], train, val, settings, self.device, ids=["base"], eval_every_epoch=True,
                                     amp=b.amp, keep_models=True, progress_s=0.5,
                                     on_event=self.on_event({"phase": "base", "space": "", "rows": []}))
            if not result.ok:
                raise NpsError(f"base training failed: {result.error}")
            state = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
            from nps.pipeline.export import save_atomic

            save_atomic({"model": state, "model_name": self.cfg.model.name, "num_classes": s.num_classes,
                         "in_channels": s.in_channels, "resolution": s.resolution, "top1": result.top1,
                         "top5": result.top5, "epochs": b.epochs, "config": dump(self.cfg)}, s.base_path)
            top1, top5, loss = result.top1, result.top5, result.loss
        else:
            _, val, _ = self.loaders(self.cfg.retrain.batch_size)
            model = self.base_model().to(self.device)
            top1, top5, loss = evaluate(model, val, self.device, amp_dtype=resolve_amp(b.amp, self.device))
            model.to("cpu")
        self.send("base_done", {"top1": top1, "top5": top5, "loss": loss, "trained": bool(task["train"]),
                                "seconds": time.perf_counter() - t0})

    # -- cohorts -----------------------------------------------------------------------------------------------------

    def cohort(self, task: dict) -> None:
        from nps.pipeline.engine import run_cohorts
        from nps.pipeline.prune import prune_model
        from nps.pipeline.train import RetrainConfig as TrainSettings

        r, m = self.cfg.retrain, self.cfg.model
        train, val, _ = self.loaders(r.batch_size)
        base = self.base_model()
        table = self.spec.table
        factories = [lambda keep=np.asarray(keep), seed=int(seed): prune_model(base, table, keep, m.criterion, seed)
                     for keep, seed in zip(task["keep"], task["seeds"])]
        settings = TrainSettings(method=r.method, epochs=int(task["epochs"]), lr=r.lr, momentum=r.momentum,
                                 weight_decay=r.weight_decay, nesterov=r.nesterov, label_smoothing=r.label_smoothing,
                                 rewind_lr=r.rewind_lr, warmup_epochs=min(r.warmup_epochs, int(task["epochs"])))
        context = {"phase": "cohort", "space": task["space"], "rows": list(task["rows"])}
        keep_models = self.cfg.output.keep_weights != "none"
        run_cohorts(factories, train, val, settings, self.device, k=task["k"], ids=list(task["rows"]),
                    eval_every_epoch=r.eval_every_epoch, bn_images=r.bn_images, amp=r.amp, compile=r.compile,
                    keep_models=keep_models, progress_s=0.5, on_event=self.on_event(context))

    def finished(self, context: dict, row: int, result) -> None:
        space = context["space"]
        payload = {"space": space, "row": int(row), "train_s": float(result.train_s),
                   "bn_top1": float(result.bn_top1), "cohort_size": int(result.cohort_size)}
        if result.ok:
            if result.model is not None:
                try:
                    from nps.pipeline.export import save_subnetwork_weights

                    staged = save_subnetwork_weights(self.spec.results_path, space, int(row), result.model,
                                                     staged=True)
                    payload["weights_staged"] = str(staged)
                except Exception as exc:  # noqa: BLE001 - a result without its weights is still a result
                    self.send("note", {"text": f"could not save the weights of {space} row {row}: {_one_line(exc)}"})
                result.model = None
            payload.update(top1=float(result.top1), top5=float(result.top5), loss=float(result.loss),
                           curve=[float(v) for v in result.curve])
            self.send("done", payload)
        else:
            payload["error"] = result.error
            self.send("failed", payload)


def worker_main(wid: int, device: str, threads: int, spec: WorkerSpec, tasks, results, stop) -> None:
    """Entry point of a worker process: set up, then serve tasks until "exit" (or a stop request)."""
    _die_with_parent(spec.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the main process decides
    logging.basicConfig(level=spec.log_level)
    try:
        worker = _Worker(wid, device, threads, spec, results, stop)
        if spec.config.dataset.dir:
            worker.loaders(spec.config.retrain.batch_size)
    except Exception as exc:  # noqa: BLE001 - reported to the main process, which stops the run
        results.put(("fatal", wid, {"error": _one_line(exc)}))
        return
    results.put(("ready", wid, {"threads": threads}))
    while True:
        try:
            kind, task = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != spec.parent_pid:
                return
            continue
        if kind == "exit":
            return
        try:
            if stop.is_set():
                raise _Stopped()
            if kind == "base":
                worker.base(task)
            elif kind == "cohort":
                worker.cohort(task)
        except _Stopped:
            results.put(("stopped", wid, {}))
            return
        except Exception as exc:  # noqa: BLE001 - one bad cohort must not end the run
            log.exception("worker %d (%s): %s task failed", wid, device, kind)
            results.put(("fatal" if kind == "base" else "task_error", wid, {"error": _one_line(exc)}))
            if kind == "base":
                return
        results.put(("idle", wid, {}))


# --------------------------------------------------------------------------------------------------------------------
# Main side: the writer, dispatcher and view driver.


@dataclass
class _Task:
    space: str
    rows: set[int]
    units: float
    fraction: float = 0.0


@dataclass
class _Proc:
    device: str
    threads: int
    process: Any
    tasks: Any
    ready: bool = False
    task: _Task | None = None
    base: bool = False
    exited: bool = False
    restarts: int = 0


class Driver:
    """Runs one experiment to completion or interruption; see the module docstring."""

    def __init__(self, plan: Plan, devices: list[str], view, *, retry_failed: bool = False):
        self.plan, self.cfg, self.devices, self.view = plan, plan.config, devices, view
        self.retry_failed = retry_failed
        self.store: ResultsStore | None = None
        self.state = RunState(self.cfg.experiment.name, plan.results_path)
        self.pending: dict[str, collections.deque] = {}
        self.order: list[str] = []
        self.rows_info: dict[str, dict[str, np.ndarray]] = {}
        self.units: dict[str, np.ndarray] = {}
        self.attempts: collections.Counter = collections.Counter()
        self.procs: dict[int, _Proc] = {}
        self.base_todo: dict | None = None
        self.base_units = 0.0
        self.done_units = 0.0
        self.interrupts = 0
        self.stopping = False
        self.stop_started = 0.0
        self.fatal: str | None = None
        self.log_file = None
        self.ctx = mp.get_context("spawn")
        self.results = None
        self.stop_event = None

    # -- bookkeeping -------------------------------------------------------------------------------------------------

    def _log(self, event: str, **fields) -> None:
        if self.log_file is not None:
            record = {"t": round(time.time(), 3), "event": event, **fields}
            self.log_file.write(json.dumps(record, default=float) + "\n")
            self.log_file.flush()

    def _note(self, text: str) -> None:
        self.view.note(text)

    def _load_space(self, name: str) -> None:
        """Queue a space's pending rows and account its work (from the file)."""
        store = self.store
        cols = store.read(name, ["status", "acc_drop", "top1", "c_flops", "keep", "seed"])
        epochs = store.epochs(name)
        self.rows_info[name] = {"keep": cols["keep"], "seed": cols["seed"], "c_flops": cols["c_flops"]}
        self.units[name] = np.array([row_cost(epochs, c) for c in cols["c_flops"]])
        status = cols["status"]
        self.state.spaces[name] = SpaceState.from_columns(name, status, cols["acc_drop"], cols["top1"], epochs)
        finished = (status == DONE) | (status == FAILED)
        self.done_units += float(self.units[name][finished].sum())
        self.state.work_total += float(self.units[name].sum())
        self.pending[name] = collections.deque(int(r) for r in np.flatnonzero(status == PENDING))
        if name not in self.order:
            self.order.append(name)

    def _expected_top_units(self) -> float:
        """Work of the two-stage spaces not created yet."""
        t = self.cfg.two_stage
        if not t.enabled:
            return 0.0
        return sum(t.top_k * row_cost(t.full_epochs, space.value if space.target == "c_flops" else 0.5)
                   for _, space in self.plan.spaces if space.regime + TOP_SUFFIX not in self.pending)

    def _refresh_work(self) -> None:
        partial = sum(p.task.units * p.task.fraction for p in self.procs.values() if p.task is not None)
        self.state.work_done = self.done_units + partial
        self.view.update(self.state)

    # -- setup -------------------------------------------------------------------------------------------------------

    def prepare(self) -> bool:
        """Open or create results.h5, sample missing spaces, reset running rows. Returns True when resumed."""
        plan = self.plan
        self.state.phase = "opening results"
        self.store, resumed = open_results(plan)
        sampled = sample_missing_spaces(self.store, plan, progress=self._phase)
        names = self.store.spaces()
        redone = 0
        for name in names:
            if self.retry_failed:
                before = int(np.count_nonzero(self.store.status(name) == FAILED))
                self.store.reset_failed(name)
                if before:
                    self._note(f"{name}: {before} failed rows will be retried")
            redone += int(np.count_nonzero(self.store.status(name) == RUNNING))
            self.store.reset_running(name)
        self.store.flush()
        configured = [space.regime for _, space in plan.spaces]
        for name in sorted(names, key=lambda n: (configured.index(n.removesuffix(TOP_SUFFIX))
                                                  if n.removesuffix(TOP_SUFFIX) in configured else len(configured),
                                                  n)):
            self._load_space(name)
        self.state.work_total += self._expected_top_units()
        os.makedirs(self.cfg.experiment.out, exist_ok=True)
        self.log_file = open(os.path.join(self.cfg.experiment.out, "log.jsonl"), "a", encoding="utf-8")
        done = sum(s.done for s in self.state.spaces.values())
        self._log("start", pid=os.getpid(), resumed=resumed, done=done, redo=redone, sampled=sampled,
                  devices=self.devices)
        if resumed:
            self._note(f"resuming {plan.results_path}: {done} subnetworks done are kept"
                       + (f", {redone} left running by the last run are redone" if redone else ""))

        base_top1 = float(self.store.attrs.get("base_top1", math.nan))
        weights = self.cfg.model.checkpoint or plan.base_path
        if math.isfinite(base_top1):
            if not os.path.isfile(weights):
                raise NpsError(f"{plan.results_path} has base metrics but the base weights {weights} are gone; "
                               "start a new run with another --out")
            self.state.base_top1 = base_top1
        else:
            train = not self.cfg.model.checkpoint and not os.path.isfile(plan.base_path)
            self.base_todo = {"train": train}
            self.base_units = float(self.cfg.base.epochs) if train else 0.2
            self.state.work_total += self.base_units
            self.state.base_note = "training the base network" if train else "evaluating the base network"
        return resumed

    def _phase(self, text: str) -> None:
        self.state.phase = text
        self.view.update(self.state, force=True)

    # -- workers -----------------------------------------------------------------------------------------------------

    def _threads(self, device: str) -> int:
        """Torch threads of a worker: the cores shared among the CPU workers (at most OMP_NUM_THREADS when set);
        a GPU worker needs a few for its loader."""
        cores = len(os.sched_getaffinity(0))
        if device != "cpu":
            return max(1, min(4, cores // len(self.devices)))
        threads = max(1, cores // max(1, sum(1 for d in self.devices if d == "cpu")))
        cap = os.environ.get("OMP_NUM_THREADS", "")
        return max(1, min(threads, int(cap))) if cap.isdigit() and int(cap) > 0 else threads

    def _spawn(self, wid: int, device: str, restarts: int = 0) -> None:
        spec = WorkerSpec(self.cfg, self.plan.table, self.plan.resolution, self.plan.in_channels,
                          self.plan.num_classes, self.plan.results_path, self.plan.base_path, os.getpid(),
                          logging.getLogger().level or logging.WARNING)
        tasks = self.ctx.Queue()
        threads = self._threads(device)
        process = self.ctx.Process(target=worker_main, name=f"nps-worker-{wid}",
                                   args=(wid, device, threads, spec, tasks, self.results, self.stop_event),
                                   daemon=True)
        process.start()
        self.procs[wid] = _Proc(device, threads, process, tasks, restarts=restarts)
        self.state.workers[wid] = WorkerState(device)

    def _start_workers(self) -> None:
        self.results = self.ctx.Queue()
        self.stop_event = self.ctx.Event()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # children inherit "ignore" from birth
        try:
            for wid, device in enumerate(self.devices):
                self._spawn(wid, device)
        finally:
            signal.signal(signal.SIGINT, previous)

    def _on_signal(self, signum, frame) -> None:
        self.interrupts += 1
        if self.interrupts == 1:
            self.stopping = True
            self.stop_started = time.monotonic()
            if self.stop_event is not None:
                self.stop_event.set()
        else:
            for p in self.procs.values():
                if p.process.is_alive():
                    p.process.terminate()

    # -- dispatch ----------------------------------------------------------------------------------------------------

    def _cohort_k(self, proc: _Proc) -> int:
        k = self.cfg.retrain.cohort_size
        if k == "auto":
            k = AUTO_COHORT["cuda" if proc.device.startswith("cuda") else "cpu"]
        return int(k)

    def _dispatch(self) -> None:
        if self.stopping or self.fatal:
            return
        for wid, proc in self.procs.items():
            if not proc.ready or proc.task is not None or proc.base or proc.exited:
                continue
            if self.base_todo is not None:
                proc.base = True
                proc.tasks.put(("base", self.base_todo))
                self.base_todo = None
                self.state.workers[wid].phase = "base network"
                self._log("base", worker=wid, device=proc.device)
                continue
            if not math.isfinite(self.state.base_top1):
                continue  # cohorts wait for the base metrics
            space = next((name for name in self.order if self.pending[name]), None)
            if space is None:
                continue
            waiting = sum(len(q) for q in self.pending.values())
            workers = sum(1 for p in self.procs.values() if not p.exited)
            k = max(1, min(self._cohort_k(proc), -(-waiting // max(1, workers))))
            q = self.pending[space]
            rows = [q.popleft() for _ in range(min(k, len(q)))]
            self.store.mark_running(space, rows)
            info = self.rows_info[space]
            epochs = self.store.epochs(space)
            k_arg = None if self.cfg.retrain.cohort_size == "auto" else len(rows)
            proc.tasks.put(("cohort", {"space": space, "rows": rows, "keep": info["keep"][rows].tolist(),
                                       "seeds": info["seed"][rows].tolist(), "epochs": epochs, "k": k_arg}))
            proc.task = _Task(space, set(rows), float(self.units[space][rows].sum()))
            s = self.state.spaces[space]
            s.pending -= len(rows)
            s.running += len(rows)
            ws = self.state.workers[wid]
            ws.phase, ws.space, ws.rows = "cohort", space, rows
            ws.epoch, ws.epochs, ws.step, ws.steps, ws.img_per_s = 0, epochs, 0, 0, math.nan
            self._log("dispatch", space=space, rows=rows, worker=wid, device=proc.device)

    def _requeue(self, proc: _Proc, reason: str) -> None:
        """Rows of a task that ended without their results: back to the queue (or failed after MAX_ATTEMPTS)."""
        task, proc.task = proc.task, None
        if task is None:
            return
        s = self.state.spaces[task.space]
        for row in sorted(task.rows, reverse=True):
            self.attempts[(task.space, row)] += 1
            s.running -= 1
            if self.attempts[(task.space, row)] >= MAX_ATTEMPTS:
                self.store.mark_failed(task.space, row, reason)
                self._finished(task.space, row, {"status": "failed", "error": reason})
            else:  # status stays 'running' in the file until it is dispatched again (or reset at the end)
                self.pending[task.space].appendleft(row)
                s.pending += 1

    # -- messages ----------------------------------------------------------------------------------------------------

    def _finished(self, space: str, row: int, info: dict) -> None:
        s = self.state.spaces[space]
        if info["status"] == "done":
            s.done += 1
            s.add_done(row, info["top1"], info["acc_drop"])
        else:
            s.failed += 1
        self.done_units += float(self.units[space][row])
        self._log(info["status"], space=space, row=row, **{k: v for k, v in info.items() if k != "status"})
        self.view.row_finished(self.state, space, row, info)
        if s.pending == 0 and s.running == 0:
            self._space_complete(space)

    def _handle(self, kind: str, wid: int, p: dict) -> None:
        proc = self.procs.get(wid)
        ws = self.state.workers.get(wid)
        if proc is None:
            return
        if kind == "ready":
            proc.ready = True
            ws.phase = "idle"
        elif kind in ("progress", "epoch"):
            ws.epoch, ws.epochs = p.get("epoch", ws.epoch), p.get("epochs", ws.epochs)
            ws.step, ws.steps = p.get("step", ws.step), p.get("steps", ws.steps)
            ws.img_per_s = p.get("img_per_s", ws.img_per_s)
            fraction = ((ws.epoch - 1) + (ws.step / ws.steps if ws.steps else 0)) / max(ws.epochs, 1)
            if proc.task is not None:
                proc.task.fraction = min(1.0, max(0.0, fraction))
            elif proc.base:
                self.state.work_done = self.done_units + self.base_units * fraction
            if kind == "epoch" and proc.base:
                self.view.epoch(self.state, wid, f"base epoch {p['epoch']}/{p['epochs']}: train loss "
                                                 f"{p.get('train_loss', math.nan):.3f}, val top-1 "
                                                 f"{p.get('val_top1', math.nan):.2f} "
                                                 f"({p.get('img_per_s', 0):,.0f} img/s)")
        elif kind == "base_done":
            self.store.set_attrs(base_top1=float(p["top1"]), base_top5=float(p["top5"]), base_loss=float(p["loss"]),
                                 base_trained=bool(p["trained"]),
                                 base_checkpoint=self.cfg.model.checkpoint or self.plan.base_path)
            self.state.base_top1 = float(p["top1"])
            self.done_units += self.base_units
            what = "trained" if p["trained"] else "evaluated"
            self._note(f"base network {what} in {p['seconds']:.0f}s: top-1 {p['top1']:.2f}, top-5 {p['top5']:.2f}")
            self._log("base_done", worker=wid, **p)
        elif kind in ("done", "failed"):
            space, row = p["space"], int(p["row"])
            staged = p.get("weights_staged")
            if proc.task is None or proc.task.space != space or row not in proc.task.rows:
                log.warning("ignoring a result for %s row %d that was not in flight on worker %d", space, row, wid)
                if staged and os.path.exists(staged):
                    os.remove(staged)
                return
            if staged:
                from nps.pipeline.export import commit_staged_weights

                commit_staged_weights(staged)
            proc.task.rows.discard(row)
            proc.task.units -= float(self.units[space][row])
            self.state.spaces[space].running -= 1
            c_flops = float(self.rows_info[space]["c_flops"][row])
            if kind == "done":
                self.store.mark_done(space, row, top1=p["top1"], top5=p["top5"], loss=p["loss"],
                                     bn_top1=p["bn_top1"], curve=p["curve"] or None, train_s=p["train_s"])
                info = {"status": "done", "top1": p["top1"], "top5": p["top5"], "bn_top1": p["bn_top1"],
                        "acc_drop": self.state.base_top1 - p["top1"], "c_flops": c_flops, "train_s": p["train_s"],
                        "worker": wid}
            else:
                self.store.mark_failed(space, row, p["error"], train_s=p["train_s"], bn_top1=p["bn_top1"])
                info = {"status": "failed", "error": p["error"], "c_flops": c_flops, "worker": wid}
            self._finished(space, row, info)
        elif kind == "task_error":
            self._note(f"[{proc.device}] a cohort failed: {p['error']}")
            task = proc.task
            if task is not None:
                for row in sorted(task.rows):
                    self.store.mark_failed(task.space, row, p["error"])
                    self.state.spaces[task.space].running -= 1
                    self._finished(task.space, row, {"status": "failed", "error": p["error"]})
                proc.task = None
        elif kind == "idle":  # the worker finished its task (base or cohort) and waits for the next one
            if proc.task is not None and proc.task.rows:
                self._requeue(proc, "the worker returned no result for this row")
            proc.task = None
            proc.base = False
            ws.phase, ws.space, ws.rows, ws.epochs, ws.img_per_s = "idle", "", [], 0, math.nan
        elif kind == "note":
            self._note(p["text"])
        elif kind == "stopped":
            proc.exited = True
            ws.phase = "stopped"
        elif kind == "fatal":
            proc.exited = True
            ws.phase = "failed"
            self.fatal = f"worker on {proc.device}: {p['error']}"

    def _check_processes(self) -> None:
        for wid, proc in list(self.procs.items()):
            if proc.exited or proc.process.is_alive():
                continue
            proc.exited = True
            if self.stopping or self.fatal:
                continue
            code = proc.process.exitcode
            reason = f"the worker process on {proc.device} died (exit code {code})"
            self._note(reason)
            self._log("worker_died", worker=wid, device=proc.device, exitcode=code)
            if proc.base:
                self.fatal = f"{reason} while working on the base network"
                continue
            self._requeue(proc, reason)
            if proc.restarts < MAX_RESTARTS:
                self._note(f"restarting the worker on {proc.device}; its rows are queued again")
                self._spawn(wid, proc.device, proc.restarts + 1)
            elif all(p.exited for p in self.procs.values()):
                self.fatal = f"{reason}; every worker is gone"

    # -- two-stage and weights ---------------------------------------------------------------------------------------

    def _space_complete(self, space: str) -> None:
        self._trim_weights(space)
        t = self.cfg.two_stage
        if not t.enabled or space.endswith(TOP_SUFFIX):
            return
        top = space + TOP_SUFFIX
        if top in self.store.spaces():
            return
        cols = self.store.read(space, ["status", "top1", "bn_top1"] + list(RECIPE_FIELDS))
        done = np.flatnonzero(cols["status"] == DONE)
        if done.size == 0:
            self._note(f"{space}: no subnetwork finished; no two-stage retraining")
            return
        order = done[np.lexsort((-np.nan_to_num(cols["bn_top1"][done], nan=-1),
                                 -np.nan_to_num(cols["top1"][done], nan=-1)))]
        chosen = np.sort(order[: t.top_k])
        rows = {k: cols[k][chosen] for k in RECIPE_FIELDS}
        attrs = {k: v for k, v in self.store.file["spaces"][space].attrs.items() if k not in ("epochs", "groups")}
        attrs.update(space=f"{attrs.get('space', space)}{TOP_SUFFIX}", stage="top", parent=space,
                     parent_rows=chosen.astype(np.int64), top_k=int(t.top_k))
        self.store.add_space(top, rows, epochs=t.full_epochs, attrs=attrs)
        self.state.work_total -= self._expected_top_units()
        self._load_space(top)
        self.state.work_total += self._expected_top_units()
        self._log("two_stage", space=space, top=top, parent_rows=chosen.tolist())
        self._note(f"{space}: rows {', '.join(map(str, chosen))} go on to {t.full_epochs} epochs in {top}")

    def _trim_weights(self, space: str) -> None:
        """keep_weights = 'topk': remove the weights of rows outside the space's top_k by top-1."""
        if self.cfg.output.keep_weights != "topk":
            return
        try:
            from nps.pipeline.export import saved_weight_rows, weights_path
        except ImportError:
            return
        cols = self.store.read(space, ["status", "top1"])
        done = np.flatnonzero(cols["status"] == DONE)
        keep = set(done[np.argsort(-np.nan_to_num(cols["top1"][done], nan=-1), kind="stable")]
                   [: self.cfg.output.top_k].tolist())
        for row in saved_weight_rows(self.plan.results_path, space):
            if row not in keep:
                try:
                    os.remove(weights_path(self.plan.results_path, space, row))
                except OSError:
                    pass

    # -- the loop ----------------------------------------------------------------------------------------------------

    def _all_finished(self) -> bool:
        if self.base_todo is not None or any(p.base for p in self.procs.values()):
            return False
        if any(self.pending[name] for name in self.order) or any(p.task for p in self.procs.values()):
            return False
        return True

    def _drain(self, timeout: float) -> None:
        try:
            kind, wid, payload = self.results.get(timeout=timeout)
        except queue.Empty:
            return
        self._handle(kind, wid, payload)
        while True:
            try:
                kind, wid, payload = self.results.get_nowait()
            except queue.Empty:
                return
            self._handle(kind, wid, payload)

    def _finish_workers(self, timeout: float = 10.0) -> None:
        for proc in self.procs.values():
            if proc.process.is_alive():
                proc.tasks.put(("exit", None))
        deadline = time.monotonic() + timeout
        while any(p.process.is_alive() for p in self.procs.values()) and time.monotonic() < deadline:
            self._drain(0.1)
        for proc in self.procs.values():
            if proc.process.is_alive():
                proc.process.terminate()
        for proc in self.procs.values():
            proc.process.join(5)
        if self.results is not None:
            self._drain(0.0)

    def loop(self) -> str:
        """Serve workers until every row has finished ("complete") or a stop request ("interrupted")."""
        for name in list(self.order):  # spaces finished by an earlier run may still owe their two-stage space
            s = self.state.spaces[name]
            if s.pending == 0 and s.running == 0:
                self._space_complete(name)
        if self._all_finished():
            return "complete"  # nothing to do: no worker needed
        self._start_workers()
        self._phase("starting workers (loading the dataset)")
        while True:
            self._drain(0.1)
            self._check_processes()
            if self.fatal:
                raise NpsError(self.fatal)
            if self.stopping:
                for proc in self.procs.values():
                    if proc.task is None and not proc.base and not proc.exited:
                        proc.tasks.put(("exit", None))
                        proc.exited = True
                alive = [p for p in self.procs.values() if p.process.is_alive()]
                if not alive:
                    self._drain(0.0)
                    return "interrupted"
                if time.monotonic() - self.stop_started > STOP_GRACE_S:
                    for p in alive:
                        p.process.terminate()
                self._phase("stopping: waiting for the workers to finish their step")
                continue
            if self._all_finished():
                self._finish_workers()
                return "complete"
            self._dispatch()
            busy = any(p.task or p.base for p in self.procs.values())
            ready = any(p.ready for p in self.procs.values())
            self.state.phase = ("training the base network" if any(p.base for p in self.procs.values())
                                else "retraining subnetworks" if busy
                                else "starting workers (loading the dataset)" if not ready else "waiting")
            self._refresh_work()

    def run(self) -> Outcome:
        t0 = time.monotonic()
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        status = "failed"
        resumed = False
        try:
            self.view.start(self.state)
            resumed = self.prepare()
            for sig in previous:
                signal.signal(sig, self._on_signal)
            status = self.loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for proc in self.procs.values():
                if proc.process.is_alive():
                    proc.process.terminate()
                    proc.process.join(5)
            if self.store is not None:
                try:
                    for name in self.store.spaces():  # rows in flight go back to pending
                        self.store.reset_running(name)
                    states = [s for s in self.state.spaces.values()]
                    for s in states:
                        s.pending += s.running
                        s.running = 0
                finally:
                    self.store.close()
            self._log("end", status=status, elapsed_s=round(time.monotonic() - t0, 2))
            if self.log_file is not None:
                self.log_file.close()
            self.view.stop(self.state)
        return Outcome(status, self.plan.results_path, list(self.state.spaces.values()), self.state.base_top1,
                       time.monotonic() - t0, resumed)


def run_experiment(plan: Plan, view, *, devices: list[str] | None = None, retry_failed: bool = False) -> Outcome:
    """Run (or resume) a validated experiment; ``view`` is a :mod:`nps.pipeline.live` view."""
    from nps.pipeline.config import parse_devices

    key = "--devices" if devices else "experiment.devices"
    devices = devices or parse_devices(plan.config.experiment.devices, key=key)
    cuda = [d for d in devices if d.startswith("cuda")]
    if cuda:
        import torch

        visible = torch.cuda.device_count()
        absent = [d for d in cuda if int(d.split(":")[1]) >= visible]
        if absent:
            raise NpsError(f"{key}: {', '.join(absent)} not available ({visible} GPUs visible)")
    return Driver(plan, devices, view, retry_failed=retry_failed).run()
