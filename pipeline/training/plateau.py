"""When a network has finished learning: the plateau rule, the learning-rate plan that ends early, the curve.

The base network and every reference ("networks trained like the base", ``[base]``) train for at most
``max_epochs``, scored after every epoch on a **holdout** carved from the training set (never the test split that
scores the study; :func:`nps.datasets.loaders.holdout_split`). :class:`PlateauRule`:

    after epoch e, training has plateaued when the best holdout top-1 of the last ``patience`` epochs is not above
    the best of the epochs before them by more than ``min_delta`` percentage points.

The rule is looked at only where stopping saves epochs: after the warm-up, from epoch ``patience + 1`` on, and while
``e + cooldown_epochs < max_epochs``. When it fires at epoch e, the learning rate does not stop where the cosine
had it (high, mid-schedule): :class:`~nps.pipeline.training.schedule.LrPlan` turns the rest into a **cool-down**, a
linear decay from that rate to 0 over ``cooldown_epochs`` epochs, after which training ends (epoch e +
cooldown_epochs); the last weights are kept.
Where the rule never fires the schedule is the recipe's own, the cosine to 0 at ``max_epochs``, so a short training
(the demo's 3 epochs) is what it always was. docs/base-training.md says why this rule, these defaults and this
schedule, after pycls, timm's train.py and torchvision's references.

:class:`TrainingCurve` is what one such training records, epoch by epoch: train loss, val top-1 (the test split,
shown, never used to decide), holdout top-1, the learning rate; where it stopped and why. It travels from the worker
to the driver, which stores it in results.h5 (``/base/curve``, ``/references/<model>/curve``). Plain data, no torch
(the driver and the results layer read it).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

STOPPED_PLATEAU = "plateau"  # the rule fired (then the cool-down ran)
STOPPED_MAX = "max_epochs"  # trained every epoch it may


@dataclass(frozen=True)
class PlateauRule:
    """When training stops before ``max_epochs`` (module docstring). ``patience`` 0 turns the rule off."""

    patience: int
    min_delta: float
    cooldown_epochs: int
    max_epochs: int
    warmup_epochs: float = 0.0

    def plateaued(self, holdout: Sequence[float]) -> bool:
        """Whether the curve ``holdout`` (top-1 after epochs 1..e, e = its length) has plateaued at e: the best of its
        last ``patience`` values is not above the best before them by more than ``min_delta``. A NaN (no holdout)
        never plateaus."""
        e, p = len(holdout), self.patience
        if p < 1 or e <= p or any(math.isnan(float(v)) for v in holdout):
            return False
        before, recent = max(holdout[: e - p]), max(holdout[e - p:])
        return not recent > before + self.min_delta

    def may_stop(self, epoch: int) -> bool:
        """Whether stopping after ``epoch`` would save an epoch (the cool-down included) and the warm-up is over."""
        return (self.patience >= 1 and epoch > self.patience and epoch >= self.warmup_epochs
                and epoch + self.cooldown_epochs < self.max_epochs)

    def stops_after(self, holdout: Sequence[float]) -> bool:
        """Whether training with this holdout curve so far stops (and cools down) now."""
        return self.may_stop(len(holdout)) and self.plateaued(holdout)

    def first_stop(self, holdout: Sequence[float]) -> int:
        """The epoch at which this rule stops a training whose holdout curve is ``holdout`` (0: it never does)."""
        for epoch in range(1, len(holdout) + 1):
            if self.stops_after(holdout[:epoch]):
                return epoch
        return 0


def describe_ending(curve: Mapping[str, Any]) -> str:
    """How a training ended, in words, from its curve's attributes (:meth:`TrainingCurve.attrs`, or as results.h5
    stores them): "stopped after epoch 12 of at most 30 (holdout plateau at epoch 10, then 2 of cool-down)"."""
    epochs, most = int(curve.get("epochs", 0)), int(curve.get("max_epochs", 0))
    patience, cooldown = int(curve.get("patience", 0)), int(curve.get("cooldown_epochs", 0))
    if not most:
        return "evaluated as it is (0 epochs)"
    if curve.get("plateau_epoch"):
        return (f"stopped after epoch {epochs} of at most {most} (holdout plateau at epoch {curve['plateau_epoch']}, "
                f"then {cooldown} of cool-down)")
    if not patience or not curve.get("holdout_images"):
        return f"trained all {epochs} epochs (no plateau rule)"
    if most < patience + cooldown + 2:  # the rule looks from epoch patience + 1 while epoch + cool-down < most
        return (f"trained all {epochs} epochs, too few for the plateau rule to judge (it needs at least "
                f"patience + cooldown_epochs + 2 = {patience + cooldown + 2})")
    return f"trained all {epochs} epochs without a holdout plateau"


@dataclass
class TrainingCurve:
    """One network's training, epoch by epoch, and where it ended (module docstring). Lists hold one value per
    epoch trained; ``val_top1`` and ``holdout_top1`` are NaN where not evaluated."""

    max_epochs: int
    patience: int = 0
    min_delta: float = 0.0
    cooldown_epochs: int = 0
    holdout_images: int = 0
    train_loss: list[float] = field(default_factory=list)
    val_top1: list[float] = field(default_factory=list)
    holdout_top1: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)  # the rate of each epoch's last step
    plateau_epoch: int = 0  # the epoch after which the rule fired (0: it never did)
    seconds: float = 0.0  # wall seconds of training, every attempt of a resumed training together
    weights_sha256: str = ""  # of the final weights (after precise BN): which network these numbers belong to

    SERIES = ("train_loss", "val_top1", "holdout_top1", "lr")

    @classmethod
    def for_rule(cls, rule: PlateauRule, holdout_images: int) -> "TrainingCurve":
        return cls(rule.max_epochs, rule.patience, rule.min_delta, rule.cooldown_epochs, holdout_images)

    @property
    def epochs(self) -> int:
        """Epochs trained so far."""
        return len(self.train_loss)

    @property
    def stopped_by(self) -> str:
        return STOPPED_PLATEAU if self.plateau_epoch else STOPPED_MAX

    @property
    def last_epoch(self) -> int:
        """The epoch training ends with: the rule's epoch plus the cool-down, else ``max_epochs``."""
        return self.plateau_epoch + self.cooldown_epochs if self.plateau_epoch else self.max_epochs

    def record(self, train_loss: float, val_top1: float, holdout_top1: float, lr: float) -> None:
        for name, value in zip(self.SERIES, (train_loss, val_top1, holdout_top1, lr)):
            getattr(self, name).append(float(value))

    def attrs(self) -> dict:
        """The scalars, as results.h5 stores them on the curve's group."""
        return {"max_epochs": self.max_epochs, "epochs": self.epochs, "plateau_epoch": self.plateau_epoch,
                "stopped_by": self.stopped_by, "patience": self.patience, "min_delta": self.min_delta,
                "cooldown_epochs": self.cooldown_epochs, "holdout_images": self.holdout_images,
                "train_s": self.seconds, "weights_sha256": self.weights_sha256}

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainingCurve":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
