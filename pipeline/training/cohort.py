"""One cohort: K subnetworks retrained together on ONE data stream.

Every batch is loaded and moved to the device once; each live member then takes its own optimisation step on it
(its own optimizer, per-step LR schedule and, for fp16, GradScaler). What the cohort saves is the data side (decode,
augmentation, host→device copy) paid once instead of K times, and on a GPU the idle time of small models: each
member runs in its own CUDA stream, so the kernels of K small networks overlap. On the CPU members step in
:class:`~nps.pipeline.training.devices.CpuWorkers` threads, one intra-op thread each.

:class:`Cohort` is the life of one cohort: :meth:`~Cohort.set_up` (models to the device, adaptive BN and its score,
scratch re-initialisation, optimizers), :meth:`~Cohort.train_epoch`, :meth:`~Cohort.finish` (the final evaluation);
:func:`train_cohort` runs it. Robustness:

- a member whose training loss becomes NaN/inf is stopped and reported failed with the epoch and step; the rest of
  the cohort goes on. The check reads a flag kept on the device, every ``check_every`` steps (every step on the
  CPU, every 25 on a GPU, to avoid a host sync per step) and at the end of every epoch;
- a CUDA out-of-memory error raises :class:`CohortOutOfMemory` with what had finished;
  :func:`nps.pipeline.training.engine.run_cohorts` retries the rest in halves.

What a member sees is fixed by its inputs only (the run's seed rule): each epoch's data comes from
``train_loader.set_epoch(epoch - 1)`` when the loader has it, adaptive BN from the first ``bn_images`` of epoch 0,
and a ``scratch`` member's fresh weights from its entry in ``seeds``. A recipe with ``distill`` trains every
member against the soft targets of one teacher forward per batch (:mod:`nps.pipeline.training.distill`). Library
code never prints: progress goes to
``on_event`` (:mod:`nps.pipeline.training.events`) and to ``logging``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from nps.pipeline.errors import NpsError
from nps.pipeline.row_status import RowStatus
from nps.pipeline.training.devices import CpuWorkers, resolve_amp, resolve_channels_last, resolve_cpu_workers
from nps.pipeline.training.distill import Distillation, SoftTargets, Teacher, distillation_for
from nps.pipeline.training.evaluation import adaptive_bn_many, evaluate_many, run_each
from nps.pipeline.training.events import (
    EpochEnded,
    EventCallback,
    MemberFinished,
    MemberStarted,
    Result,
    StepProgress,
)
from nps.pipeline.training.schedule import autocast_context, make_optimizer, make_scheduler, reinitialize
from nps.pipeline.training.spec import RetrainSpec

log = logging.getLogger(__name__)

_NO_FAULT = -1
_FAULT_SHIFT = 1 << 32  # fault code = epoch * 2^32 + step (both 1-based)


@dataclasses.dataclass
class CohortOptions:
    """How a cohort trains and scores its members (everything but the recipe, :class:`RetrainSpec`)."""

    eval_every_epoch: bool = False
    """Evaluate after every epoch (fills ``Result.curve``); otherwise only at the end."""
    bn_images: int = 0
    """If > 0, first recalibrate BN on this many training images and evaluate: ``Result.bn_top1`` (EagleEye)."""
    amp: str | None = "auto"
    """Autocast dtype (:func:`~nps.pipeline.training.devices.resolve_amp`); fp16 on a GPU adds a GradScaler."""
    compile: bool = False
    """``torch.compile`` each member's training forward."""
    channels_last: bool | str = "auto"
    """NHWC memory format for models and inputs (:func:`~nps.pipeline.training.devices.resolve_channels_last`)."""
    steps_per_epoch: int | None = None
    """Batches per epoch, for the LR schedule, when ``len(train_loader)`` does not exist."""
    check_every: int | None = None
    """Steps between NaN/inf checks (default 1 on CPU, 25 on GPU); always at the end of an epoch."""
    keep_models: bool = False
    """Return each retrained model (moved to the CPU) in ``Result.model``."""
    cpu_workers: int | str = "auto"
    """On the CPU, threads stepping members concurrently (``torch.set_num_threads(1)`` while they run)."""
    member_threads: int | None = 1
    """On the CPU, intra-op threads of one member: 1 (a member's numbers independent of the cohort size and the
    cores) or None (a single-member cohort uses every thread torch may use: one model alone, such as the base
    network, trains faster)."""
    progress_s: float = 2.0
    """Seconds between :class:`~nps.pipeline.training.events.StepProgress` events."""
    fuse: bool | str = False
    """Train the cohort as one fused module (:mod:`nps.pipeline.training.fuse`): True, False or ``"auto"``
    (:func:`~nps.pipeline.training.spec.resolve_fuse`); needs the engine's ``fusion`` (the base network, its
    table and the members' keep vectors)."""
    cuda_graphs: bool = True
    """On a GPU, capture a fused cohort's training step as a CUDA graph and replay it."""


class CohortOutOfMemory(RuntimeError):
    """A CUDA out-of-memory error in a cohort: ``finished`` (cohort position → Result) stays valid, the members at
    positions ``unfinished`` must be retrained from their original weights."""

    def __init__(self, finished: dict[int, Result], unfinished: list[int], where: str):
        super().__init__(f"CUDA out of memory during {where} with {len(finished) + len(unfinished)} subnetworks")
        self.finished = finished
        self.unfinished = unfinished


class Record:
    """What a cohort keeps of one member whatever trains it: its place, id, model and scores so far."""

    def __init__(self, position: int, ident, model: nn.Module, bn_top1: float = math.nan):
        self.position = position
        self.id = ident
        self.model = model
        self.curve: list[float] = []
        self.train_s = 0.0
        self.bn_top1 = bn_top1
        self.final: tuple[float, float, float] | None = None
        self.epochs_done = 0

    def release(self) -> None:
        """Drop what training held (nothing here)."""


class _Member(Record):
    """One member's training state: its own optimizer, schedule, stream and device-side flags."""

    # 9 parameters: everything one member's step needs, set once by Cohort (its only caller) and never again
    def __init__(self, position, ident, model, train_model, spec, steps_per_epoch, device, amp_dtype, stream):
        super().__init__(position, ident, model)
        self.train_model = train_model
        self.optimizer = make_optimizer(model, spec)
        self.scheduler = make_scheduler(self.optimizer, spec, steps_per_epoch)
        use_scaler = device.type == "cuda" and amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler) if use_scaler else None
        self.stream = stream
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float32)
        self.fault = torch.full((), _NO_FAULT, device=device, dtype=torch.int64)  # first non-finite step, encoded

    def stream_context(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def step(self, x, y, criterion, device, amp_dtype, code: int) -> None:
        with autocast_context(device, amp_dtype):
            out = self.train_model(x)
            loss = criterion(out, y)
        loss_value = loss.detach().float()
        self.fault.masked_fill_(~torch.isfinite(loss_value) & (self.fault == _NO_FAULT), code)
        self.loss_sum += loss_value
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.scheduler.step()

    def release(self) -> None:
        self.optimizer = self.scheduler = self.scaler = None
        self.train_model = self.model = None


def steps_per_epoch(loader: Iterable, given: int | None) -> int:
    if given is not None:
        return int(given)
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise NpsError("the training loader has no len(); pass steps_per_epoch") from None


def set_epoch(loader: Iterable, epoch: int) -> None:
    """The next pass of ``loader`` is epoch ``epoch`` (0-based), for loaders that can be told (``set_epoch``)."""
    setter = getattr(loader, "set_epoch", None)
    if setter is not None:
        setter(epoch)


def ids_for(models, ids) -> list:
    """The caller's ids for ``models`` (default 0..n-1), one per model."""
    ids = list(range(len(models))) if ids is None else list(ids)
    if len(ids) != len(models):
        raise ValueError(f"got {len(models)} models but {len(ids)} ids")
    return ids


class Cohort:
    """The members of one cohort and their training on one data stream (see the module docstring)."""

    # past (models, data, recipe, device) every parameter is an optional keyword, as run_cohorts' (see its comment)
    def __init__(self, models: Sequence[nn.Module], train_loader: Iterable, val_loader: Iterable, spec: RetrainSpec,
                 device: torch.device | str = "cpu", *, ids: Sequence[Any] | None = None,
                 seeds: Sequence[int] | None = None, options: CohortOptions | None = None,
                 on_event: EventCallback | None = None, teacher: Teacher | None = None):
        spec.check()
        self.models, self.spec = list(models), spec
        self.train_loader, self.val_loader = train_loader, val_loader
        self.device = torch.device(device)
        self.options = options or CohortOptions()
        self.on_event = on_event
        self.k = len(self.models)
        self.ids = ids_for(self.models, ids)
        if seeds is not None and len(seeds) != self.k:
            raise ValueError(f"got {self.k} models but {len(seeds)} seeds")
        self.seeds = seeds
        o = self.options
        self.amp_dtype = resolve_amp(o.amp, self.device, self.models)
        self.nhwc = resolve_channels_last(o.channels_last, self.device)
        self.steps = steps_per_epoch(train_loader, o.steps_per_epoch) if spec.epochs > 0 else 1
        self.check_every = o.check_every or (25 if self.device.type == "cuda" else 1)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=spec.label_smoothing)
        if spec.distill and teacher is None:
            raise ValueError("the recipe distils (retrain.distill) but the cohort was given no teacher network")
        self.teacher = teacher
        self.distillation: Distillation | None = None  # placed by set_up when the recipe distils
        self.results: dict[int, Result] = {}
        self.members: list[Record] = []
        self.live: list[Record] = []
        self.where = "setup"
        self.workers: CpuWorkers | None = None
        self.runner = run_each
        self._epoch_started: float | None = None  # start of the running epoch's training loop
        self._main_stream = None

    def _emit(self, event) -> None:
        if self.on_event is not None:
            self.on_event(event)

    # -- set-up ------------------------------------------------------------------------------------------------------

    def set_up(self) -> None:
        """Members on the device, adaptive BN and its score, scratch re-initialisation, optimizers and streams."""
        o, device = self.options, self.device
        n_workers = resolve_cpu_workers(o.cpu_workers, device, self.k)
        if n_workers > 1 or (device.type == "cpu" and o.member_threads == 1):
            self.workers = CpuWorkers(n_workers)
            self.runner = self.workers.map
        for model in self.models:
            model.to(device)
            if self.nhwc:
                model.to(memory_format=torch.channels_last)
        for ident in self.ids:
            self._emit(MemberStarted(ident, self.k))
        bn_scores = self.adaptive_bn() if o.bn_images > 0 else [math.nan] * self.k
        if self.spec.method == "scratch":
            for pos, model in enumerate(self.models):
                reinitialize(model, seed=None if self.seeds is None else int(self.seeds[pos]))
        self.where = "setup"
        for pos, model in enumerate(self.models):
            stream = torch.cuda.Stream(device) if device.type == "cuda" else None
            train_model = torch.compile(model) if o.compile else model
            member = _Member(pos, self.ids[pos], model, train_model, self.spec, self.steps, device, self.amp_dtype,
                             stream)
            member.bn_top1 = bn_scores[pos]
            self.members.append(member)
        self.live.extend(self.members)
        self._set_up_teacher()

    def _set_up_teacher(self) -> None:
        """The recipe's teacher on the cohort's device, memory format and autocast (nothing without distill)."""
        self.distillation = distillation_for(self.teacher, self.spec, self.device, self.nhwc, self.amp_dtype)

    def adaptive_bn(self) -> list[float]:
        """BN statistics recomputed on the first ``bn_images`` of epoch 0, then each member's top-1 (bn_top1)."""
        self.where = "adaptive BN"
        set_epoch(self.train_loader, 0)  # a fixed image set: the first images of epoch 0
        adaptive_bn_many(self.models, self.train_loader, self.device, num_images=self.options.bn_images,
                         amp_dtype=self.amp_dtype, channels_last=self.nhwc, runner=self.runner)
        return [r[0] for r in evaluate_many(self.models, self.val_loader, self.device, amp_dtype=self.amp_dtype,
                                            channels_last=self.nhwc, runner=self.runner)]

    # -- faults ------------------------------------------------------------------------------------------------------

    def fail(self, member: Record, message: str) -> None:
        self.live.remove(member)
        if self._epoch_started is not None:
            member.train_s += time.perf_counter() - self._epoch_started
        self.results[member.position] = Result(member.id, RowStatus.FAILED, bn_top1=member.bn_top1,
                                               curve=list(member.curve), train_s=member.train_s, error=message,
                                               epochs_done=member.epochs_done, cohort_size=self.k)
        member.release()
        log.info("subnetwork %s failed: %s", member.id, message)
        self._emit(MemberFinished(self.results[member.position]))

    def check_faults(self) -> None:
        if not self.live:
            return
        codes = torch.stack([m.fault for m in self.live]).tolist()  # one host sync for the whole cohort
        for member, code in zip(list(self.live), codes):
            if code != _NO_FAULT:
                epoch, step = divmod(code, _FAULT_SHIFT)
                self.fail(member, f"loss became nan/inf at epoch {epoch} step {step}")

    # -- training ----------------------------------------------------------------------------------------------------

    def _step_all(self, x, y, code: int, main_stream, soft: SoftTargets | None = None) -> None:
        """Every live member's step on the batch; with distillation, against the batch's ``soft`` targets (made
        once, on the main stream, before any member reads them)."""
        device, amp = self.device, self.amp_dtype
        criterion = self.criterion if soft is None else self.distillation.criterion(self.criterion, soft)
        if self.workers is not None:
            self.workers.map(lambda m: m.step(x, y, criterion, device, amp, code), self.live)
            return
        shared = (x, y) if soft is None else (x, y, *soft.tensors())
        for m in self.live:
            with m.stream_context():
                if m.stream is not None:
                    # the batch (copied on the main stream) and the teacher's soft targets are ready
                    m.stream.wait_stream(main_stream)
                    for t in shared:
                        t.record_stream(m.stream)
                m.step(x, y, criterion, device, amp, code)
        if main_stream is not None:
            for m in self.live:
                main_stream.wait_stream(m.stream)  # device-side join; the host runs ahead to the next batch

    # What a subclass that steps the cohort otherwise (training/fused_cohort.py) replaces: how an epoch starts, how a
    # batch trains every live member, how live members are evaluated, their epoch's mean losses, what an
    # out-of-memory error leaves to clean up.

    def _start_epoch(self) -> None:
        for m in self.live:
            m.model.train()
            m.loss_sum.zero_()
        self._main_stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

    def _train_batch(self, x, y, code: int, step: int) -> None:
        soft = None if self.distillation is None else self.distillation.targets(x)  # one teacher forward per batch
        self._step_all(x, y, code, self._main_stream, soft)

    def _evaluate(self, members: list[Record]) -> list[tuple[float, float, float]]:
        return evaluate_many([m.model for m in members], self.val_loader, self.device, amp_dtype=self.amp_dtype,
                             channels_last=self.nhwc, runner=self.runner)

    def _epoch_losses(self, step: int) -> dict:
        return {m.id: m.loss_sum.item() / step for m in self.live}

    def _before_results(self) -> None:
        """Called once before the live members' final results are made."""

    def _after_oom(self) -> None:
        # Members whose loss had already gone non-finite stay failed: retrying them would only fail again.
        try:
            self.check_faults()
        except Exception:  # noqa: BLE001 - best effort on a device that just ran out of memory
            log.debug("could not read the NaN flags after the out-of-memory error", exc_info=True)
        for m in self.members:
            m.release()
        self.members.clear()

    def train_epoch(self, epoch: int) -> None:
        """One pass of the training loader, every live member stepping on every batch; then the epoch's event
        (and the evaluation, with ``eval_every_epoch``)."""
        device, epochs = self.device, self.spec.epochs
        self.where = f"training epoch {epoch}"
        self._start_epoch()
        images, step = 0, 0
        t_epoch = t_report = time.perf_counter()
        self._epoch_started = t_epoch
        set_epoch(self.train_loader, epoch - 1)
        for x, y in self.train_loader:
            step += 1
            x = x.to(device, non_blocking=True)
            if self.nhwc and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            images += y.shape[0]
            self._train_batch(x, y, epoch * _FAULT_SHIFT + step, step)
            if step % self.check_every == 0:
                self.check_faults()
                if not self.live:
                    break
            now = time.perf_counter()
            if self.on_event is not None and now - t_report >= self.options.progress_s:
                t_report = now
                self._emit(StepProgress(epoch, epochs, step, self.steps, len(self.live),
                                        images * len(self.live) / max(now - t_epoch, 1e-9)))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t_epoch
        self.check_faults()  # (a member failing here gets this epoch's time added by fail())
        self._epoch_started = None
        for m in self.live:
            m.train_s += elapsed
            m.epochs_done = epoch
        if step == 0:
            raise NpsError("the training loader yielded no batches")
        val_top1 = {}
        if self.options.eval_every_epoch and self.live:
            self.where = f"evaluation after epoch {epoch}"
            for m, score in zip(self.live, self._evaluate(self.live)):
                m.curve.append(score[0])
                m.final = score
            val_top1 = {m.id: m.curve[-1] for m in self.live}
        self._emit(EpochEnded(epoch, epochs, step, len(self.live), elapsed,
                              images * len(self.live) / max(elapsed, 1e-9), self._epoch_losses(step), val_top1))

    def finish(self) -> None:
        """The final evaluation (unless every epoch was evaluated) and every live member's result."""
        if not self.live:
            return
        self.where = "final evaluation"
        if not (self.options.eval_every_epoch and self.spec.epochs > 0):
            for m, score in zip(self.live, self._evaluate(self.live)):
                m.final = score
        self._before_results()
        for m in list(self.live):
            top1, top5, loss = m.final
            model_out = None
            if self.options.keep_models:
                model_out = m.model.to("cpu", memory_format=torch.contiguous_format)
            self.results[m.position] = Result(m.id, RowStatus.DONE, top1=top1, top5=top5, loss=loss,
                                              bn_top1=m.bn_top1, curve=list(m.curve), train_s=m.train_s,
                                              epochs_done=self.spec.epochs, cohort_size=self.k, model=model_out)
            m.release()
            self._emit(MemberFinished(self.results[m.position]))
        self.live.clear()

    def run(self) -> list[Result]:
        """Set up, train every epoch, finish; the results in the order of the models. Raises
        :class:`CohortOutOfMemory` on a CUDA out-of-memory error (models left on the device)."""
        if self.k == 0:
            return []
        oom = False
        try:
            self.set_up()
            for epoch in range(1, self.spec.epochs + 1):
                if not self.live:
                    break
                self.train_epoch(epoch)
            self.finish()
        except torch.cuda.OutOfMemoryError:
            oom = True
        finally:
            if self.workers is not None:
                self.workers.close()
        if oom:
            # Out of the except block, so the traceback (and the frames holding activations) is already gone.
            self._after_oom()
            unfinished = [pos for pos in range(self.k) if pos not in self.results]
            raise CohortOutOfMemory(dict(self.results), unfinished, self.where)
        return [self.results[pos] for pos in range(self.k)]


# past (models, data, recipe, device) every parameter is an optional keyword, as run_cohorts' (see its comment)
def train_cohort(models: Sequence[nn.Module], train_loader: Iterable, val_loader: Iterable, spec: RetrainSpec,
                 device: torch.device | str = "cpu", *, ids: Sequence[Any] | None = None,
                 seeds: Sequence[int] | None = None, on_event: EventCallback | None = None,
                 options: CohortOptions | None = None, teacher: Teacher | None = None,
                 **settings: Any) -> list[Result]:
    """Retrain ``models`` (trained in place, moved to ``device``) together, one pass of ``train_loader`` per epoch
    shared by all; the results in the order of ``models``. ``ids`` label the results and events (default 0..K-1),
    ``seeds`` seed ``scratch`` re-initialisation; ``options`` (or its fields as keywords) say how (see
    :class:`CohortOptions`); ``teacher`` is the network a recipe with ``distill`` distils from. Raises
    :class:`CohortOutOfMemory` on a CUDA out-of-memory error."""
    if settings:
        options = dataclasses.replace(options or CohortOptions(), **settings)
    return Cohort(models, train_loader, val_loader, spec, device, ids=ids, seeds=seeds, options=options,
                  on_event=on_event, teacher=teacher).run()
