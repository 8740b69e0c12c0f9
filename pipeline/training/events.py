"""What the cohort engine reports: typed events, and a member's result.

The engine calls ``on_event(event)`` with one of these dataclasses; the run's worker forwards the progress events
unchanged to the driver (inside :class:`nps.pipeline.run.protocol.Progress`) and turns a :class:`MemberFinished`
into the row's result. ``img_per_s`` counts images × live members.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Union

from nps.pipeline.row_status import Result  # noqa: F401 - the engine's results are rows' results


@dataclass(frozen=True)
class CohortStarted:
    """A cohort of ``k`` members starts (``run_cohorts``; again after an out-of-memory halving)."""

    ids: tuple
    k: int


@dataclass(frozen=True)
class MemberStarted:
    """A member's cohort starts (again after an out-of-memory halving)."""

    id: Any
    k: int


@dataclass(frozen=True)
class StepProgress:
    """Where the cohort's epoch is (at most every ``progress_s``)."""

    epoch: int
    epochs: int
    step: int
    steps: int
    k_live: int
    img_per_s: float


@dataclass(frozen=True)
class EpochEnded:
    """An epoch of the cohort ended: its members' mean train loss, their val top-1 when evaluated per epoch, and
    (base and reference training, :mod:`nps.pipeline.training.network_training`) their top-1 on the holdout carved
    from the training set; ``epochs`` is the epoch training now ends with."""

    epoch: int
    epochs: int
    steps: int
    k_live: int
    seconds: float
    img_per_s: float
    train_loss: dict = field(default_factory=dict)  # member id -> mean loss of the epoch
    val_top1: dict = field(default_factory=dict)  # member id -> top-1 %, with evaluation per epoch
    holdout_top1: dict = field(default_factory=dict)  # member id -> top-1 % on the training set's holdout (base)


@dataclass(frozen=True)
class MemberFinished:
    """A member is done or failed (its NaN/inf loss, or out of memory even alone): ``result.status`` says which."""

    result: Result


@dataclass(frozen=True)
class CohortUnfused:
    """The cohort could not be fused (``reason``: the layer or operation) and trains unfused."""

    ids: tuple
    reason: str


@dataclass(frozen=True)
class CohortHalved:
    """CUDA ran out of memory with ``k`` members: the unfinished ``ids`` are retried in cohorts of ``retry_k``."""

    ids: tuple
    k: int
    retry_k: int


EngineEvent = Union[CohortStarted, MemberStarted, StepProgress, EpochEnded, MemberFinished, CohortUnfused,
                    CohortHalved]
EventCallback = Callable[[EngineEvent], None]
