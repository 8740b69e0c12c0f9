"""A worker: one device that trains the base network or cohorts of subnetworks, whatever carries its messages.

:class:`Worker` does the work and reports through an ``emit`` callback; :func:`serve_task` wraps one task with its
:class:`~nps.pipeline.run.protocol.TaskEnd`. The local transport calls them in a spawned process, the Ray transport
in an actor; neither adds behaviour. A worker writes no file: results, kept weights, a trained base network and the
checkpoints of a training in progress go back as messages (files a local worker stages for the driver to move), and
the driver writes them.

The base network and every reference train alike (:meth:`Worker.train_network`,
:mod:`nps.pipeline.training.network_training`): to a plateau of their top-1 on a holdout carved from the training
set, one checkpoint per epoch sent to the driver, resumed from the last one the driver wrote when the task carries it.

The seed rule: what a row's training sees depends on the experiment, the row's recipe and its seed only, never on
the worker, its device index or what it did before. The loaders are seeded with ``experiment.seed`` and told the
epoch before each pass (``set_epoch``), adaptive BN uses the first ``bn_images`` of epoch 0, and the ``random``
criterion and ``scratch`` re-initialisation draw from the row's ``seed``. On the CPU every member steps on one
intra-op thread whatever the cohort size (see :mod:`nps.pipeline.training.devices`), so the same rows give the same numbers
in cohorts of 1 or 8, on one worker or on many.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
import time
import traceback
from typing import Any, Callable

import numpy as np

from nps.pipeline.errors import NpsError, environment_error, one_line, user_errors
from nps.pipeline.run.protocol import (
    BaseResult,
    BaseTask,
    BaseWeights,
    CohortTask,
    Note,
    Progress,
    Ready,
    ReferenceResult,
    ReferenceTask,
    RowResult,
    StagedWeights,
    TaskEnd,
    TrainingCheckpoint,
    WorkerFailed,
    WorkerSpec,
)

log = logging.getLogger(__name__)

PROGRESS_S = 0.5  # at most one progress message per this many seconds (and one per epoch)


class Stopped(Exception):
    """Raised inside a task when the driver asked the workers to stop (Ctrl-C)."""


def check_dataset(data_dir: str, fingerprint: str, node: str) -> dict:
    """The dataset's meta.json on this node, after checking it is the one the driver validated (one line naming the
    node and the path when not)."""
    from nps.datasets.errors import DatasetError
    from nps.datasets.meta import load_meta, same_dataset_problem

    where = f"node {node}: dataset.dir {data_dir}"
    hint = "convert the same dataset to the same path on every node, or put it on a shared filesystem"
    try:
        meta = load_meta(data_dir)
    except DatasetError as exc:
        raise NpsError(f"{where}: {exc}; {hint}") from None
    problem = same_dataset_problem(meta, fingerprint)
    if problem:
        raise NpsError(f"{where}: {problem.replace('the run had', 'the driver has')}; {hint}")
    for split in ("train", "val"):
        path = os.path.join(data_dir, meta["files"][split])
        if not os.path.isfile(path):
            raise NpsError(f"{where}: {path} is missing; {hint}")
    return meta


def stage_weights(spec: WorkerSpec, wid: int, task_id: int, row: int, data: bytes) -> bytes | StagedWeights:
    """A row's weights as its RowResult carries them: a file in ``spec.staging`` (atomically written there, so the
    driver never sees half of one), else the bytes themselves."""
    return stage_bytes(spec, f"w{wid}-t{task_id}-r{row}.pt", data)


def stage_bytes(spec: WorkerSpec, name: str, data: bytes) -> bytes | StagedWeights:
    """A file for the driver (a row's weights, a training checkpoint) as its event carries it: ``name`` in
    ``spec.staging``, atomically written, else the bytes themselves."""
    if not spec.staging:
        return data
    from nps.pipeline.files import write_atomic

    path = write_atomic(os.path.join(spec.staging, name), data)
    return StagedWeights(len(data), path=str(path))


def state_bytes(obj: Any) -> bytes:
    """A module's (or state_dict's) tensors on the CPU, contiguous, as the bytes of a ``torch.save`` file."""
    import torch

    obj = getattr(obj, "_orig_mod", obj)  # torch.compile's wrapper: the module it wraps
    state = obj.state_dict() if hasattr(obj, "state_dict") else obj
    state = {k.removeprefix("_orig_mod."): v.detach().to("cpu").contiguous() if torch.is_tensor(v) else v
             for k, v in state.items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


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

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

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


class Worker:
    """One device's work. ``emit`` takes every event; ``should_stop`` is polled between training steps."""

    def __init__(self, wid: int, spec: WorkerSpec, device: str, threads: int, node: str,
                 emit: Callable[[Any], None], should_stop: Callable[[], bool], progress_s: float = PROGRESS_S):
        import torch

        self.wid, self.spec, self.node, self.threads = wid, spec, node, threads
        self.device = torch.device(device)
        self.cfg = spec.config
        self.emit, self.should_stop, self.progress_s = emit, should_stop, progress_s
        self._loaders: dict[int, tuple] = {}
        self._base_loaders: dict[tuple, tuple] = {}
        self._base: tuple[str, Any] | None = None
        self._teacher: tuple[str, Any] | None = None  # (base key, Teacher): its device copy outlives one task
        self._last_progress = 0.0
        torch.set_num_threads(threads)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def setup(self) -> Ready:
        """Check this node's dataset against the driver's fingerprint and build the loaders."""
        check_dataset(self.cfg.dataset.dir, self.spec.fingerprint, self.node)
        self.loaders(self.cfg.retrain.batch_size, self.cfg.retrain.train_images)
        return Ready(self.wid, self.node, str(self.device), self.threads)

    def loaders(self, batch_size: int, train_images: int = 0):
        """(train, val, info) at ``batch_size``; an epoch is ``train_images`` images (0: dataset.train_images)."""
        d = self.cfg.dataset
        images, resolution = train_images or d.train_images, self.spec.resolution
        if (batch_size, images) not in self._loaders:
            from nps.datasets.loaders import make_loaders

            train, val, info = make_loaders(
                d.dir, batch_size=batch_size, resolution=resolution, device=self.device,
                in_channels=self.spec.in_channels, num_workers=d.workers or self.threads, on_device=d.on_device,
                seed=self.cfg.experiment.seed, val_batch_size=d.val_batch_size, augment=d.augment)
            cpu = self.device.type == "cpu"
            self._loaders[batch_size, images] = (
                _Limited(train, images, whole_batches=True, contiguous=cpu),
                _Limited(val, d.val_images, whole_batches=False, contiguous=cpu), info)
        return self._loaders[batch_size, images]

    def run(self, task, base: BaseWeights | None) -> None:
        if self.should_stop():
            raise Stopped()
        match task:
            case BaseTask():
                self.base(task, base)
            case ReferenceTask():
                self.reference(task)
            case CohortTask():
                self.cohort(task, base)
            case _:
                raise TypeError(f"not a task: {task!r}")

    # -- events from the engine -------------------------------------------------------------------------------------

    def _on_event(self, task_id: int, task: CohortTask | None = None):
        """The engine's events for this task: progress forwarded unchanged (step progress at most every
        ``progress_s``), a finished member as its row's result, a halved cohort as a note."""
        from nps.pipeline.training.events import (
            CohortHalved,
            CohortUnfused,
            EpochEnded,
            MemberFinished,
            StepProgress,
        )

        def handle(event) -> None:
            if isinstance(event, (StepProgress, EpochEnded)):
                if self.should_stop():
                    raise Stopped()
                now = time.monotonic()
                if isinstance(event, StepProgress) and now - self._last_progress < self.progress_s:
                    return
                self._last_progress = now
                self.emit(Progress(self.wid, task_id, event))
            elif isinstance(event, MemberFinished) and task is not None:
                self.emit(self._row_result(task, event.result))
            elif isinstance(event, CohortUnfused):
                self.emit(Note(self.wid, f"{self.device}: a cohort trains unfused: {event.reason}"))
            elif isinstance(event, CohortHalved):
                self.emit(Note(self.wid, f"{self.device}: out of memory with {event.k} subnetworks; retrying in "
                                         f"cohorts of {event.retry_k}"))
        return handle

    def _row_result(self, task: CohortTask, result) -> RowResult:
        space, row = result.id
        weights = None
        if result.ok and result.model is not None and task.wants_weights(result.top1):
            weights = stage_weights(self.spec, self.wid, task.task_id, int(row), state_bytes(result.model))
        return RowResult(self.wid, task.task_id, space, int(row), dataclasses.replace(result, model=None), weights)

    # -- base network ------------------------------------------------------------------------------------------------

    def teacher(self, base: BaseWeights):
        """The :class:`~nps.pipeline.training.distill.Teacher` of the base network, one per base: the copy it places
        on the device serves every distilling cohort of this worker, not only one task's."""
        from nps.pipeline.training.distill import Teacher

        if self._teacher is None or self._teacher[0] != base.key:
            self._teacher = (base.key, Teacher(self.base_model(base)))
        return self._teacher[1]

    def base_model(self, base: BaseWeights):
        if self._base is None or self._base[0] != base.key:
            from nps.pipeline.network.checkpoints import load_base_network

            s = self.spec
            self._base = (base.key, load_base_network(base.open(), self.cfg.model.name, s.num_classes, s.in_channels))
        return self._base[1]

    def base_loaders(self, batch_size: int, resolution: int = 0, replica: int = 0):
        """(train, holdout, val, holdout images) of base and reference training at ``batch_size``: the train split
        without the holdout carved from it (``base.holdout_images``; None when 0), ``dataset.train_images`` a
        training epoch, at ``resolution`` px (0: the run's; a reference may have its own); a reference's further
        seeds (``replica``) draw their own data order from the same split."""
        d, b = self.cfg.dataset, self.cfg.base
        resolution = resolution or self.spec.resolution
        key = (batch_size, resolution, replica)
        if key not in self._base_loaders:
            from nps.datasets.loaders import make_holdout_loaders

            train, holdout, val, info = make_holdout_loaders(
                d.dir, holdout_images=b.holdout_images, holdout_seed=self.cfg.experiment.seed, batch_size=batch_size,
                resolution=resolution, device=self.device, in_channels=self.spec.in_channels,
                num_workers=d.workers or self.threads, on_device=d.on_device, seed=self.cfg.experiment.seed + replica,
                val_batch_size=d.val_batch_size, augment=d.augment)
            cpu = self.device.type == "cpu"
            self._base_loaders[key] = (
                _Limited(train, d.train_images, whole_batches=True, contiguous=cpu),
                None if holdout is None else _Limited(holdout, 0, whole_batches=False, contiguous=cpu),
                _Limited(val, d.val_images, whole_batches=False, contiguous=cpu), info.extra["holdout_images"])
        return self._base_loaders[key]

    def training_plan(self, name: str, epochs: int, holdout_images: int, replica: int = 0):
        """How ``name`` trains (:class:`~nps.pipeline.training.network_training.NetworkTraining`): ``[base]`` over at
        most ``epochs``, and the fingerprint a checkpoint of this training carries (the settings, model and data
        that decide its numbers; runtime keys such as devices or workers aside)."""
        import hashlib
        import json

        from nps.pipeline.training.network_training import NetworkTraining
        from nps.pipeline.training.plateau import PlateauRule
        from nps.pipeline.training.spec import RetrainSpec

        cfg, b, s = self.cfg, self.cfg.base, self.spec
        warmup = min(b.warmup_epochs, epochs)
        spec = RetrainSpec(method="rewind", epochs=epochs, rewind_lr=b.lr, warmup_epochs=warmup,
                           momentum=b.momentum, weight_decay=b.weight_decay, label_smoothing=b.label_smoothing)
        rule = PlateauRule(b.patience, b.min_delta, b.cooldown_epochs, epochs, warmup)
        d = cfg.dataset
        what = {"name": name, "epochs": epochs, "base": dataclasses.asdict(b), "model": dataclasses.asdict(cfg.model),
                "references": [dataclasses.asdict(r) for r in cfg.references], "seed": cfg.experiment.seed + replica,
                "data": [d.train_images, d.val_images, d.augment, s.fingerprint], "shape": [s.resolution,
                                                                                          s.in_channels, s.num_classes]}
        fingerprint = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()
        return NetworkTraining(name, spec, rule, holdout_images, b.amp, fingerprint, b.holdout_bn_images)

    def train_network(self, name: str, epochs: int, task_id: int, resume: BaseWeights | None = None,
                      replica: int = 0):
        """Train ``name`` from its start (:mod:`nps.pipeline.network.pretrained`) as ``[base]`` says, for at most
        ``epochs`` (fewer when its holdout top-1 plateaus), or continue the training of ``resume``'s checkpoint: the
        engine's result with its model (precise BN applied when ``base.bn_images``) and its
        :class:`~nps.pipeline.training.plateau.TrainingCurve`. Each epoch's checkpoint goes to the driver
        (:class:`TrainingCheckpoint`). The base network and every reference train this one way; a reference's
        further seeds (``replica`` i) start from seed experiment.seed + i (initial weights and data order)."""
        import torch

        from nps.pipeline.network.pretrained import build_start, pretrained_of, resolution_of
        from nps.pipeline.training.network_training import train_to_plateau, weights_digest

        b, s = self.cfg.base, self.spec
        train, holdout, val, held = self.base_loaders(b.batch_size, resolution_of(self.cfg, name, s.resolution),
                                                      replica)
        torch.manual_seed(self.cfg.experiment.seed + replica)
        model = build_start(name, pretrained_of(self.cfg, name), s.num_classes, s.in_channels)
        plan = self.training_plan(name, epochs, held, replica)

        def checkpoint(epoch: int, data: bytes) -> None:
            staged = stage_bytes(self.spec, f"w{self.wid}-t{task_id}-e{epoch}.ckpt", data)
            self.emit(TrainingCheckpoint(self.wid, task_id, epoch, staged))

        result, curve = train_to_plateau(model, train, holdout, val, plan, self.device,
                                         on_event=self._on_event(task_id), on_checkpoint=checkpoint,
                                         resume=None if resume is None else resume.open(), progress_s=self.progress_s)
        if not result.ok:
            raise NpsError(f"{name} training failed: {result.error}; lower base.lr or check the dataset")
        t0 = time.perf_counter()
        if b.bn_images and epochs:  # epochs 0 evaluates a pretrained start as it is: its BN statistics too
            result.top1, result.top5, result.loss = self.precise_bn(result.model, train, val)
        curve.seconds += time.perf_counter() - t0
        curve.weights_sha256 = weights_digest(result.model)
        return result, curve

    def reference(self, task: ReferenceTask) -> None:
        result, curve = self.train_network(task.model, task.epochs, task.task_id, task.resume, task.replica)
        self.emit(ReferenceResult(self.wid, task.task_id, task.model, float(result.top1), float(result.top5),
                                  float(result.loss), curve.seconds, curve, task.name, task.replica))

    def base(self, task: BaseTask, base: BaseWeights | None) -> None:
        import torch

        from nps.pipeline.experiment.toml_text import dump
        from nps.pipeline.training.devices import resolve_amp
        from nps.pipeline.training.evaluation import evaluate

        b, s = self.cfg.base, self.spec
        t0 = time.perf_counter()
        checkpoint = curve = None
        if task.train:
            result, curve = self.train_network(self.cfg.model.name, b.epochs, task.task_id, task.resume)
            buffer = io.BytesIO()
            state = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
            torch.save({"model": state, "model_name": self.cfg.model.name, "num_classes": s.num_classes,
                        "in_channels": s.in_channels, "resolution": s.resolution, "top1": result.top1,
                        "top5": result.top5, "epochs": curve.epochs, "max_epochs": b.epochs,
                        "stopped_by": curve.stopped_by, "config": dump(self.cfg)}, buffer)
            checkpoint = buffer.getvalue()
            top1, top5, loss = result.top1, result.top5, result.loss
        else:
            if base is None:
                raise ValueError("evaluating the base network needs its weights")
            _, val, _ = self.loaders(self.cfg.retrain.batch_size)
            model = self.base_model(base).to(self.device)
            top1, top5, loss = evaluate(model, val, self.device, amp_dtype=resolve_amp(b.amp, self.device, [model]))
            model.to("cpu")
        seconds = curve.seconds if curve is not None else time.perf_counter() - t0  # a resumed training's in all
        self.emit(BaseResult(self.wid, task.task_id, float(top1), float(top5), float(loss), task.train, seconds,
                             checkpoint, curve))

    def precise_bn(self, model, train, val) -> tuple[float, float, float]:
        """Precise BN (as pycls does after training): BN statistics recomputed on ``base.bn_images`` training images
        (the first of epoch 0), then the final evaluation. Running averages lag a network that changed fast; with
        torchvision's BN momentum of 0.01 (MobileNetV3, EfficientNet) a short training otherwise evaluates at
        chance."""
        from nps.pipeline.training.devices import resolve_amp, resolve_channels_last
        from nps.pipeline.training.evaluation import precise_bn_evaluate

        amp = resolve_amp(self.cfg.base.amp, self.device, [model])
        nhwc = resolve_channels_last("auto", self.device)
        model.to(self.device)
        scores = precise_bn_evaluate(model, train, val, self.device, num_images=self.cfg.base.bn_images,
                                     amp_dtype=amp, channels_last=nhwc)
        model.to("cpu")
        return scores

    # -- cohorts -----------------------------------------------------------------------------------------------------

    def cohort(self, task: CohortTask, base: BaseWeights | None) -> None:
        from nps.pipeline.network.members import member_factory
        from nps.pipeline.network.pruning_kind import kind_of
        from nps.pipeline.training.cohort import CohortOptions
        from nps.pipeline.training.engine import run_cohorts
        from nps.pipeline.training.fused_cohort import Fusion

        if base is None:
            raise ValueError("a cohort needs the base network's weights")
        r = self.cfg.retrain
        train, val, _ = self.loaders(r.batch_size, r.train_images)
        model, kind = self.base_model(base), kind_of(task.space)
        table = kind.table(self.spec.table, self.spec.weight_table)
        factories = [member_factory(kind, model, table, keep, task.spec.criterion, seed)
                     for keep, seed in zip(task.keep, task.seeds)]
        # the driver decided the cohort's form (and formed its rows for it): the task says whether it is fused
        fusion = Fusion(model, table, np.asarray(task.keep)) if task.fused else None
        teacher = self.teacher(base) if task.spec.retrain.distill else None  # the unpruned base network
        options = CohortOptions(eval_every_epoch=r.eval_every_epoch, bn_images=r.bn_images, amp=r.amp,
                                compile=r.compile, keep_models=task.keep_weights, progress_s=self.progress_s,
                                member_threads=1, fuse=task.fused)
        run_cohorts(factories, train, val, task.spec.retrain, self.device, k=task.k,
                    ids=[(task.space, row) for row in task.rows], seeds=list(task.seeds), options=options,
                    on_event=self._on_event(task.task_id, task), fusion=fusion, teacher=teacher)


def serve_task(worker: Worker, task, base: BaseWeights | None, emit: Callable[[Any], None]) -> bool:
    """Run one task and end it with its :class:`TaskEnd` (or a :class:`WorkerFailed`); False when the worker must
    exit (stopped, or it cannot work)."""
    try:
        worker.run(task, base)
    except Stopped:
        emit(TaskEnd(worker.wid, task.task_id, stopped=True))
        return False
    except Exception as exc:  # noqa: BLE001 - reported to the driver, which decides
        detail = traceback.format_exc()
        environment = environment_error(exc)
        if environment is not None:  # a full disk is the machine's fault, not the rows': they stay pending
            emit(TaskEnd(worker.wid, task.task_id, error=f"{worker.node} {worker.device}: {environment}",
                         detail=detail, environment=True))
            return True
        if isinstance(task, BaseTask):  # without a base network nothing can run
            user = isinstance(exc, user_errors())
            emit(WorkerFailed(worker.wid, f"{worker.node} {worker.device}: {exc if user else one_line(exc)}", detail,
                              user))
            return False
        log.error("worker %d (%s): a cohort failed\n%s", worker.wid, worker.device, detail)
        emit(TaskEnd(worker.wid, task.task_id, error=one_line(exc), detail=detail))
        return True
    emit(TaskEnd(worker.wid, task.task_id))
    return True


def setup_failure(wid: int, exc: BaseException) -> WorkerFailed:
    """The :class:`WorkerFailed` of a worker that could not start (its dataset, its device)."""
    user = isinstance(exc, user_errors())
    return WorkerFailed(wid, str(exc) if user else one_line(exc), traceback.format_exc(), user)
