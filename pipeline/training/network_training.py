"""Training one network to a plateau, resumably: how the base network and every reference train (``[base]``).

:func:`train_to_plateau` drives the cohort engine (:class:`~nps.pipeline.training.cohort.Cohort`, one member) one
epoch at a time: train, evaluate on the val split (the curve the report shows) and on the holdout (what the
:class:`~nps.pipeline.training.plateau.PlateauRule` decides on), record the epoch, let the rule start the cool-down,
hand a checkpoint of everything the next epoch depends on to ``on_checkpoint``, then report the epoch
(:class:`~nps.pipeline.training.events.EpochEnded` with its holdout top-1). It writes no file: the run's worker sends
each checkpoint to the driver, which writes it beside results.h5 and removes it once the training's result is stored.

Resuming (``resume``: a checkpoint's bytes or path) continues after the checkpoint's epoch and ends with the same
weights and scores as a training never interrupted, on the CPU exactly: a checkpoint holds the model, the
optimizer (momentum), the schedule (its step and cool-down), the fp16 loss scaler, the curve so far and the random
state (torch, numpy, python; the device's CUDA generator); the data of an epoch is the loader's function of
``(seed, epoch)`` (``set_epoch``, :mod:`nps.datasets.loaders`); the model is built from the same seed before the
checkpoint replaces its weights. A checkpoint of another training (other ``[base]`` settings, model or data) is
refused in one line naming it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from nps.pipeline.errors import NpsError
from nps.pipeline.training.cohort import Cohort, CohortOptions
from nps.pipeline.training.evaluation import evaluate, precise_bn_evaluate
from nps.pipeline.training.events import EpochEnded, EventCallback, StepProgress
from nps.pipeline.training.plateau import PlateauRule, TrainingCurve
from nps.pipeline.training.schedule import LrPlan, make_scheduler, schedule_steps
from nps.pipeline.training.spec import RetrainSpec

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "nps-training-checkpoint-1"


@dataclasses.dataclass(frozen=True)
class NetworkTraining:
    """How one network trains: ``[base]`` resolved for it. ``spec`` is the recipe over the maximum epochs (the
    rewind method: ``rewind_lr`` peak, linear warm-up, cosine to 0); ``fingerprint`` names what a checkpoint must
    have been written for (the settings, model and data), so a stale one is never resumed."""

    name: str
    spec: RetrainSpec
    rule: PlateauRule
    holdout_images: int = 0
    amp: str | None = "auto"
    fingerprint: str = ""
    holdout_bn_images: int = 0  # score the holdout after BN statistics re-estimated on this many training images


def weights_digest(model_or_state) -> str:
    """SHA-256 of a network's tensors (names and bytes, in state-dict order): equal digests, equal weights."""
    state = model_or_state.state_dict() if hasattr(model_or_state, "state_dict") else model_or_state
    digest = hashlib.sha256()
    for name, value in state.items():
        digest.update(name.encode())
        if torch.is_tensor(value):
            digest.update(str(value.dtype).encode())
            digest.update(value.detach().to("cpu").reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# Random state: what a checkpoint restores so that the next epoch draws what it would have drawn.


def rng_state(device: torch.device) -> dict:
    """torch's, numpy's and python's generators (and the device's CUDA generator), as plain data."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
             "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints.


def _cpu(obj):
    """Tensors (in nested dicts and lists) on the CPU, their layout kept: a restored optimizer steps as before."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu")
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def read_checkpoint(source: bytes | str | os.PathLike | io.IOBase, plan: NetworkTraining) -> dict:
    """A training checkpoint's contents, after checking it was written for ``plan`` (one NpsError line naming it
    otherwise). ``source``: its bytes, a path or an open file."""
    where = source if isinstance(source, (str, os.PathLike)) else "the checkpoint"
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file is the user's to remove
        raise NpsError(f"{where}: not a training checkpoint nps can resume ({exc.__class__.__name__}); delete it to "
                       "train from the start") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise NpsError(f"{where}: not an nps training checkpoint ({CHECKPOINT_FORMAT}); delete it to train from the "
                       "start")
    if state.get("name") != plan.name or state.get("fingerprint") != plan.fingerprint:
        raise NpsError(f"{where}: a checkpoint of another training ({state.get('name')}, other [base] settings or "
                       f"data) than {plan.name}'s; delete it to train from the start")
    return state


class _Training:
    """One network's training to a plateau (see :func:`train_to_plateau`)."""

    # the three data streams (train, holdout, val), the plan, the device and where epochs and checkpoints go: each
    # differs between the base network and a reference, none is derived from another
    def __init__(self, model: nn.Module, train: Iterable, holdout: Iterable | None, val: Iterable,
                 plan: NetworkTraining, device: torch.device, on_event: EventCallback | None,
                 on_checkpoint: Callable[[int, bytes], None] | None, progress_s: float):
        self.plan, self.device, self.holdout, self.train = plan, device, holdout, train
        self.on_event, self.on_checkpoint = on_event, on_checkpoint
        options = CohortOptions(eval_every_epoch=True, amp=plan.amp, keep_models=True, progress_s=progress_s,
                                member_threads=None)
        self.cohort = Cohort([model], train, val, plan.spec, device, ids=[plan.name], options=options,
                             on_event=self._engine_event)
        self.curve = TrainingCurve.for_rule(plan.rule, plan.holdout_images)
        self.epoch_ended: EpochEnded | None = None
        self.member = None
        self.elapsed_before = 0.0
        self.started = time.perf_counter()

    def _engine_event(self, event) -> None:
        """The engine's events, as the caller sees them: the epoch's end is held back until the holdout is scored
        (it carries that score), and progress counts to the epoch training now ends with."""
        if isinstance(event, EpochEnded):
            self.epoch_ended = event
            return
        if isinstance(event, StepProgress):
            event = dataclasses.replace(event, epochs=self.curve.last_epoch)
        if self.on_event is not None:
            self.on_event(event)

    def set_up(self) -> None:
        """The member on the device, its optimizer, and the schedule that may end early (:class:`LrPlan`)."""
        self.cohort.set_up()
        self.member = self.cohort.members[0]
        total, warmup = schedule_steps(self.plan.spec, self.cohort.steps)
        # LambdaLR keeps a callable object's attributes in its state_dict: the cool-down travels with the schedule
        self.member.scheduler = make_scheduler(self.member.optimizer, self.plan.spec, self.cohort.steps,
                                               factor=LrPlan(total, warmup))

    def checkpoint(self, epoch: int) -> bytes:
        m = self.member
        state = {"format": CHECKPOINT_FORMAT, "name": self.plan.name, "fingerprint": self.plan.fingerprint,
                 "epoch": epoch, "model": _cpu(m.model.state_dict()), "optimizer": _cpu(m.optimizer.state_dict()),
                 "scheduler": m.scheduler.state_dict(), "scaler": m.scaler.state_dict() if m.scaler else None,
                 "curve": self.curve.as_dict(), "final": list(m.final) if m.final else None,
                 "val_curve": list(m.curve), "train_s": m.train_s, "elapsed_s": self.elapsed(),
                 "rng": rng_state(self.device)}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue()

    def restore(self, state: dict) -> int:
        """Continue from a checkpoint: returns its epoch (the last one finished)."""
        m = self.member
        m.model.load_state_dict(state["model"])
        m.optimizer.load_state_dict(state["optimizer"])
        m.scheduler.load_state_dict(state["scheduler"])
        if m.scaler is not None and state["scaler"]:
            m.scaler.load_state_dict(state["scaler"])
        self.curve = TrainingCurve.from_dict(state["curve"])
        m.curve, m.train_s = list(state["val_curve"]), float(state["train_s"])
        m.final = tuple(state["final"]) if state["final"] else None
        m.epochs_done = int(state["epoch"])
        self.elapsed_before = float(state["elapsed_s"])
        set_rng_state(state["rng"], self.device)
        return int(state["epoch"])

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def epoch(self, epoch: int) -> None:
        """Train one epoch, score it, record it, maybe start the cool-down, checkpoint it, report it."""
        cohort, m, rule = self.cohort, self.member, self.plan.rule
        self.epoch_ended = None
        cohort.train_epoch(epoch)
        if not cohort.live:  # its loss became NaN/inf: the engine has its failed result
            return
        holdout = self.holdout_top1(cohort, m) if self.holdout is not None else math.nan
        ended = self.epoch_ended
        lr = self.plan.spec.peak_lr * m.scheduler.lr_lambdas[0](epoch * cohort.steps - 1)
        self.curve.record(ended.train_loss.get(self.plan.name, math.nan), m.curve[-1], holdout, lr)
        if not self.curve.plateau_epoch and rule.stops_after(self.curve.holdout_top1):
            self.curve.plateau_epoch = epoch
            m.scheduler.lr_lambdas[0].cool_down(epoch * cohort.steps, rule.cooldown_epochs * cohort.steps)
            log.info("%s: holdout top-1 plateaued after epoch %d; cooling down for %d epochs", self.plan.name, epoch,
                     rule.cooldown_epochs)
        self.curve.seconds = self.elapsed()
        if self.on_checkpoint is not None:
            self.on_checkpoint(epoch, self.checkpoint(epoch))
        if self.on_event is not None:
            name = self.plan.name
            self.on_event(dataclasses.replace(ended, epochs=self.curve.last_epoch,
                                              holdout_top1={name: holdout} if self.holdout is not None else {}))

    def holdout_top1(self, cohort, m) -> float:
        """The holdout's top-1 after this epoch: of the network as it is (its running BN statistics), or with
        ``plan.holdout_bn_images``, of a copy whose BN statistics were re-estimated on that many training images
        (the first of epoch 0, as precise BN takes them). Running statistics lag a network that changes fast; a
        network whose eval-mode accuracy swings from epoch to epoch (FBNetV3 at 28 px: 65 % → 53 % → 27 % while its
        training loss fell) would end by the plateau rule on noise. The trained network is not touched."""
        import copy

        if not self.plan.holdout_bn_images:
            return evaluate(m.model, self.holdout, self.device, amp_dtype=cohort.amp_dtype,
                            channels_last=cohort.nhwc)[0]
        return precise_bn_evaluate(copy.deepcopy(m.model), self.train, self.holdout, self.device,
                                   num_images=self.plan.holdout_bn_images, amp_dtype=cohort.amp_dtype,
                                   channels_last=cohort.nhwc)[0]

    def run(self, resume) -> tuple[Any, TrainingCurve]:
        try:
            self.set_up()
            first = self.restore(read_checkpoint(resume, self.plan)) + 1 if resume is not None else 1
            epoch = first
            while epoch <= self.curve.last_epoch and self.cohort.live:
                self.epoch(epoch)
                epoch += 1
            self.cohort.finish()
        finally:
            if self.cohort.workers is not None:
                self.cohort.workers.close()
        result = self.cohort.results[0]
        self.curve.seconds = self.elapsed()
        return dataclasses.replace(result, epochs_done=self.curve.epochs), self.curve


# the network, its three data streams, the plan and the device; the rest are optional keywords (see _Training)
def train_to_plateau(model: nn.Module, train: Iterable, holdout: Iterable | None, val: Iterable,
                     plan: NetworkTraining, device: torch.device | str = "cpu", *,
                     on_event: EventCallback | None = None, on_checkpoint: Callable[[int, bytes], None] | None = None,
                     resume: bytes | str | os.PathLike | io.IOBase | None = None,
                     progress_s: float = 2.0) -> tuple[Any, TrainingCurve]:
    """Train ``model`` (in place, moved to ``device``) for at most ``plan.spec.epochs`` epochs, stopping on the
    holdout's plateau (``plan.rule``; never without a ``holdout``); returns the engine's
    :class:`~nps.pipeline.row_status.Result` (its model kept; scores on ``val``) and the
    :class:`~nps.pipeline.training.plateau.TrainingCurve`. ``on_checkpoint(epoch, bytes)`` receives a checkpoint
    after every epoch; ``resume`` (one of them) continues after its epoch. ``on_event`` gets the engine's events,
    every :class:`~nps.pipeline.training.events.EpochEnded` with the holdout's top-1."""
    device = torch.device(device)
    return _Training(model, train, holdout, val, plan, device, on_event, on_checkpoint, progress_s).run(resume)
