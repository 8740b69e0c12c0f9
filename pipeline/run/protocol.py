"""What the run driver and its workers say to each other: typed messages, the same over every transport.

The driver sends a worker tasks (:class:`BaseTask`, :class:`ReferenceTask`, :class:`CohortTask`) together with the base network's weights
(:class:`BaseWeights`); the worker answers with events. A local worker process puts them on a queue, a Ray actor
yields them from a streaming generator; either way each is one of the dataclasses below, pickled. A row's weights
stay where the worker made them (:class:`StagedWeights`: a file in the run's staging directory for a local worker,
an object in the node's Ray object store for an actor) and only a reference rides in :class:`RowResult`, so only
the weights the driver keeps ever travel to it; it moves or copies them into weights/ itself. No worker writes
anything the driver owns: the driver is the only writer of results.h5, base.pt and weights/.

A worker's life, as the driver sees it::

    WorkerStarted (from the transport) → Ready (dataset checked, loaders built)
    → per task: Progress… RowResult… (or TrainingCheckpoint… then BaseResult, or ReferenceResult) → TaskEnd
    → WorkerLost (the process, actor or node died) or WorkerFailed (it cannot work: the run stops)
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import numpy as np

from nps.pipeline.row_status import RowStatus
from nps.pipeline.training.events import EpochEnded, Result, StepProgress
from nps.pipeline.training.spec import SpaceSpec


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker needs to know about the experiment (pickled once into each worker)."""

    config: Any  # nps.pipeline.experiment.config.Config
    table: Any  # LayerTable
    resolution: int
    in_channels: int
    num_classes: int
    fingerprint: str  # the dataset's, as the driver validated it: every worker checks its copy against it
    log_level: int = logging.WARNING
    worker_class: Any = None  # None: nps.pipeline.run.worker.Worker (tools/bench_dispatch.py runs a simulated one)
    staging: str = ""  # where local workers leave row weights for the driver (empty: they send them as bytes)
    weight_table: Any = None  # the weight table of weight-pruning spaces (pipeline.network.weight_table)


@dataclass(frozen=True)
class BaseWeights:
    """The base network's weights as a worker receives them: a file it can read (workers on the driver's machine),
    that file's bytes, or a handle of the transport's object store that the worker's side of the pool turns into
    ``fetch`` (Ray: the bytes go through the object store once, so no node needs the driver's files). ``key``
    names the content, so a worker loads each version once."""

    key: str
    path: str = ""
    data: bytes | None = field(default=None, repr=False)
    ref: Any = None  # the transport's handle of ``data`` (a Ray ObjectRef), resolved by the pool, never by nps code
    fetch: Callable[[], bytes] | None = field(default=None, repr=False, compare=False)

    def open(self):
        """The checkpoint as something ``torch.load`` reads: the bytes (fetched once), else the path."""
        import io

        if self.data is not None:
            return io.BytesIO(self.data)
        if self.fetch is not None:
            return io.BytesIO(self.fetch())
        return self.path

    @classmethod
    def from_file(cls, path: str, *, embed: bool) -> "BaseWeights":
        st = os.stat(path)
        if not embed:
            return cls(f"{os.path.abspath(path)}:{st.st_mtime_ns}:{st.st_size}", path=path)
        with open(path, "rb") as fh:
            data = fh.read()
        return cls(hashlib.sha256(data).hexdigest(), path=path, data=data)


# --------------------------------------------------------------------------------------------------------------------
# Tasks (driver → worker).


@dataclass(frozen=True)
class BaseTask:
    """Train the base network (``[base]``) or evaluate the given weights; answered by one :class:`BaseResult`.
    ``resume``: the checkpoint of an interrupted training of it (a file the worker can read, as :class:`BaseWeights`
    carries the base network), continued after its last epoch."""

    task_id: int
    train: bool
    resume: BaseWeights | None = None


@dataclass(frozen=True)
class ReferenceTask:
    """Train a reference network (``[[references]]``) as the base is trained, for at most ``epochs``; answered by
    one :class:`ReferenceResult`. A reference needs no base weights; ``resume`` as :class:`BaseTask`'s."""

    task_id: int
    model: str
    epochs: int
    resume: BaseWeights | None
    name: str  # the training's name (``model``, ``model#1`` ...: :func:`reference_trainings`): its group, checkpoint
    replica: int  # its seed is experiment.seed + replica


@dataclass(frozen=True)
class CohortTask:
    """Prune, adaptive-BN score and retrain these rows of one space, together; one :class:`RowResult` per row."""

    task_id: int
    space: str
    rows: tuple[int, ...]
    keep: np.ndarray  # len(rows) × groups, int32
    seeds: tuple[int, ...]
    spec: SpaceSpec
    k: int | None  # the engine's cohort size; None: as many as fit (GPU memory)
    keep_weights: bool  # send retrained subnetworks' weights back
    # ... only of rows whose top-1 (as float32) reaches this: with keep_weights = "topk", the k-th best top-1 kept in
    # the space when the task was handed out. A row below it can never enter the top-k (it only rises), so its
    # weights would be thrown away; not sending them is what lets one driver serve a large fleet.
    weights_above: float = float("-inf")
    fused: bool = False  # the driver's decision: train these rows as one fused module (it formed them for that)

    def wants_weights(self, top1: float) -> bool:
        """Whether the driver may keep the weights of a row that reached ``top1``."""
        return self.keep_weights and bool(np.float32(top1) >= self.weights_above)


Task = Union[BaseTask, ReferenceTask, CohortTask]


# --------------------------------------------------------------------------------------------------------------------
# Events (worker or transport → driver).


@dataclass(frozen=True)
class WorkerStarted:
    """The transport started a worker (it is loading the dataset)."""

    worker: int
    node: str
    device: str


@dataclass(frozen=True)
class Ready:
    """The worker checked its dataset and waits for tasks."""

    worker: int
    node: str
    device: str
    threads: int


@dataclass(frozen=True)
class Progress:
    """Where the worker's task is: the engine's own event, forwarded unchanged (a
    :class:`~nps.pipeline.training.events.StepProgress` at most a few times a second, and every
    :class:`~nps.pipeline.training.events.EpochEnded`)."""

    worker: int
    task_id: int
    event: StepProgress | EpochEnded


@dataclass(frozen=True)
class StagedWeights:
    """A row's weights (the bytes of its ``.pt`` file) left where the worker made them until the driver decides:
    ``path``, a file in the staging directory (workers on the driver's machine), or ``ref``, a Ray object on the
    worker's node. The driver moves (or fetches) the ones it keeps and drops the rest."""

    size: int
    path: str = ""
    ref: Any = None


@dataclass(frozen=True)
class RowResult:
    """One subnetwork finished: the engine's :class:`~nps.pipeline.training.events.Result` (``status`` done or
    failed; its model dropped), and its ``weights`` when asked for (bytes, or where the worker staged them)."""

    worker: int
    task_id: int
    space: str
    row: int
    result: Result
    weights: bytes | StagedWeights | None = field(default=None, repr=False)

    @property
    def status(self) -> RowStatus:
        return self.result.status


@dataclass(frozen=True)
class TrainingCheckpoint:
    """The base network's or a reference's training finished ``epoch``: ``data`` is its checkpoint (bytes, or staged
    as a row's weights are), which the driver writes beside results.h5 for a resume and removes once the training's
    result is stored."""

    worker: int
    task_id: int
    epoch: int
    data: bytes | StagedWeights = field(repr=False)


@dataclass(frozen=True)
class BaseResult:
    """The base network's metrics; ``checkpoint`` is the ``base.pt`` file when the worker trained it, ``curve`` its
    :class:`~nps.pipeline.training.plateau.TrainingCurve` (epoch by epoch, where it stopped)."""

    worker: int
    task_id: int
    top1: float
    top5: float
    loss: float
    trained: bool
    seconds: float
    checkpoint: bytes | None = field(default=None, repr=False)
    curve: Any = field(default=None, repr=False)


@dataclass(frozen=True)
class ReferenceResult:
    """A reference network's metrics after its training (its weights are not kept) and its ``curve``."""

    worker: int
    task_id: int
    model: str
    top1: float
    top5: float
    loss: float
    seconds: float
    curve: Any = field(repr=False)
    name: str  # the training's name (as its task's)
    replica: int


@dataclass(frozen=True)
class Note:
    """A line for the user (e.g. a cohort halved after running out of memory)."""

    worker: int
    text: str


@dataclass(frozen=True)
class TaskEnd:
    """The task is over: ``error`` when it raised (its rows without a result fail, unless ``environment``: then they
    go back to pending and the run stops with ``error``), ``stopped`` on a stop request (they go back to pending)."""

    worker: int
    task_id: int
    error: str = ""
    detail: str = ""  # the traceback, for a bug
    stopped: bool = False
    environment: bool = False  # the machine failed the task (a full disk): its rows go back to pending, the run stops


@dataclass(frozen=True)
class WorkerFailed:
    """The worker cannot work (its dataset, the base network): the run stops. ``user_error`` says whether the
    message is about the input (one line) or a bug (``detail`` holds the traceback)."""

    worker: int
    error: str
    detail: str = ""
    user_error: bool = True


@dataclass(frozen=True)
class WorkerLost:
    """The transport lost the worker (its process, actor or node died); its task's rows go back to pending."""

    worker: int
    reason: str


Event = Union[WorkerStarted, Ready, Progress, RowResult, TrainingCheckpoint, BaseResult, ReferenceResult, Note,
              TaskEnd, WorkerFailed, WorkerLost]
