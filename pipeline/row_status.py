"""A row's status and its result: one enum and one type for the engine, the ledger, the results file and the
views.

The status values are the codes results.h5 stores in each space's ``status`` column (docs/results-format.md), so a
numpy column compares with them directly (``status == RowStatus.DONE``). A row's :class:`Result` is what the engine
makes of it, what a worker sends (in :class:`nps.pipeline.run.protocol.RowResult`, without its model) and what
:meth:`nps.pipeline.results.store.ResultsStore.record`, the one way a row's outcome reaches the file, stores.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any


class RowStatus(enum.IntEnum):
    PENDING = 0
    RUNNING = 1
    DONE = 2
    FAILED = 3

    @property
    def label(self) -> str:
        """``pending``, ``running``, ``done`` or ``failed``: how files, logs and views spell it."""
        return self.name.lower()


@dataclass
class Result:
    """The outcome of retraining one subnetwork."""

    id: Any
    status: RowStatus
    """:attr:`RowStatus.DONE` or :attr:`RowStatus.FAILED`."""
    top1: float = math.nan
    top5: float = math.nan
    loss: float = math.nan
    bn_top1: float = math.nan
    """Top-1 after adaptive-BN recalibration, before any training (NaN when not computed)."""
    curve: list[float] = field(default_factory=list)
    """Val top-1 after every epoch (empty unless evaluation per epoch is on)."""
    train_s: float = 0.0
    """Wall seconds of the training loop while this subnetwork was in it (shared with its cohort; evaluation and
    data before the first step excluded)."""
    error: str = ""
    epochs_done: int = 0
    cohort_size: int = 1
    model: Any = field(default=None, repr=False)
    """The retrained subnetwork (an ``nn.Module`` on the CPU), only with ``keep_models=True``."""

    @property
    def ok(self) -> bool:
        return self.status == RowStatus.DONE

    @classmethod
    def done(cls, id: Any = None, *, top1: float, top5: float = math.nan, loss: float = math.nan, **more) -> "Result":
        """A finished row's result (tests, tools and importers build rows this way)."""
        return cls(id, RowStatus.DONE, top1=top1, top5=top5, loss=loss, **more)

    @classmethod
    def failed(cls, id: Any = None, error: str = "", **more) -> "Result":
        """A failed row's result with its one-line reason."""
        return cls(id, RowStatus.FAILED, error=error, **more)
