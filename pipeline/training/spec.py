"""What a subnetwork's retraining is: one definition, shared by the experiment file, the engine and results.h5.

:class:`RetrainSpec` is the recipe (paper §2.2): method, epochs, learning rates, SGD settings, and whether the
subnetworks distil from the base network (:mod:`nps.pipeline.training.distill`). The experiment's
``[retrain]`` table extends it (:class:`nps.pipeline.experiment.config.RetrainConfig`), the engine trains by it
(:func:`nps.pipeline.training.cohort.train_cohort`), and :class:`SpaceSpec` (recipe plus pruning criterion) is stored on every
space of a results file, so the run driver trains each space by its own spec and a cohort only ever mixes rows of
one spec. Plain data, no torch: the CLI reads experiment files without importing it.
"""
from __future__ import annotations

import dataclasses
import json

from nps.pipeline.errors import NpsError

METHODS = ("finetune", "rewind", "scratch")
AUTO_COHORT = {"cpu": 8, "cuda": 32}  # members per cohort with cohort_size = "auto" (a GPU: as many as fit, up to this)
# Whether "auto" fuses a cohort on the CPU: what tools/bench_cohort.py measured on this project's 2-core machines (the
# README's "Fused cohorts"): there the per-member threads of an unfused cohort were faster.
CPU_FUSES = False


def resolve_fuse(fuse, device) -> bool:
    """Whether a cohort on ``device`` (a torch device or its name) trains fused: ``"auto"`` fuses on GPUs (one
    Python thread launching every member's kernels is the bottleneck there) and on the CPU where
    :data:`CPU_FUSES` says it was measured faster."""
    kind = getattr(device, "type", str(device).split(":")[0])
    if fuse == "auto":
        return kind == "cuda" or (kind == "cpu" and CPU_FUSES)
    if isinstance(fuse, bool):
        return fuse
    raise NpsError(f"fuse must be 'auto', true or false, got {fuse!r}")


def _help(default, text: str):
    return dataclasses.field(default=default, metadata={"help": text})


@dataclasses.dataclass
class RetrainSpec:
    """How a subnetwork is retrained: the one definition of a retraining recipe.

    The experiment's ``[retrain]`` table extends it (:class:`nps.pipeline.experiment.config.RetrainConfig` adds the settings
    that do not change a recipe: batch size, cohort size, ...), the engine trains by it, and every space of a
    results file stores its own (``retrain_spec`` attribute, :meth:`to_json`), so a space may one day differ from
    the experiment's defaults. Defaults are the paper's standard setting (fine-tuning, lr 0.01, cosine).
    :meth:`check` is the only validation, with every error naming its key (``retrain.epochs: ...``).
    """

    method: str = _help("finetune", "finetune (the paper's standard setting), rewind or scratch")
    epochs: int = _help(50, "retraining epochs of every subnetwork (the short first stage when two_stage is on)")
    lr: float = _help(0.01, "initial learning rate of fine-tuning (cosine to 0)")
    momentum: float = _help(0.9, "SGD momentum")
    weight_decay: float = _help(5e-4, "SGD weight decay (every parameter, BN included)")
    nesterov: bool = _help(False, "Nesterov momentum")
    label_smoothing: float = _help(0.0, "label smoothing")
    rewind_lr: float = _help(0.1, "peak learning rate of rewind and scratch")
    warmup_epochs: float = _help(5.0, "linear warm-up of rewind and scratch (fine-tuning has none)")
    distill: bool = _help(False, "distil from the unpruned base network: loss (1 - distill_alpha) * CE + "
                                 "distill_alpha * T^2 * KL(teacher || subnetwork); one teacher forward per batch "
                                 "per cohort")
    distill_alpha: float = _help(0.5, "with distill: the weight of the distillation term, in [0, 1] (1: the "
                                      "teacher's soft targets alone, no labels)")
    distill_temperature: float = _help(4.0, "with distill: the softmax temperature T of teacher and subnetwork "
                                            "(> 0; the KL term is scaled by T^2)")

    def check(self, key: str = "retrain") -> "RetrainSpec":
        """Reject impossible settings before any work starts (NpsError naming ``key.field``); returns self."""
        def need(ok: bool, name: str, problem: str) -> None:
            if not ok:
                raise NpsError(f"{key}.{name}: {problem}")

        need(self.method in METHODS, "method", f"{self.method!r} is not one of {', '.join(METHODS)}")
        need(isinstance(self.epochs, int) and not isinstance(self.epochs, bool) and self.epochs >= 0, "epochs",
             f"must be an integer >= 0, got {self.epochs!r}")
        for name in ("lr", "rewind_lr"):
            need(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)!r}")
        need(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum!r}")
        need(not (self.nesterov and self.momentum == 0), "nesterov", f"needs {key}.momentum > 0")
        need(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay!r}")
        need(0 <= self.label_smoothing < 1, "label_smoothing", f"must be in [0, 1), got {self.label_smoothing!r}")
        need(self.warmup_epochs >= 0, "warmup_epochs", f"must be >= 0, got {self.warmup_epochs!r}")
        need(self.method == "finetune" or self.warmup_epochs <= self.epochs, "warmup_epochs",
             f"{self.warmup_epochs} exceeds the retraining epochs ({self.epochs})")
        need(isinstance(self.distill, bool), "distill", f"must be true or false, got {self.distill!r}")
        need(0 <= self.distill_alpha <= 1, "distill_alpha", f"must be in [0, 1], got {self.distill_alpha!r}")
        need(self.distill_temperature > 0, "distill_temperature",
             f"must be > 0, got {self.distill_temperature!r}")
        return self

    def spec(self) -> "RetrainSpec":
        """Just the recipe (a subclass's extra settings dropped)."""
        return RetrainSpec(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RetrainSpec)})

    def with_epochs(self, epochs: int) -> "RetrainSpec":
        """The same recipe over ``epochs`` (two-stage retraining), the warm-up cut to fit."""
        return dataclasses.replace(self.spec(), epochs=int(epochs),
                                   warmup_epochs=min(float(self.warmup_epochs), float(epochs)))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self.spec()), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RetrainSpec":
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def peak_lr(self) -> float:
        return self.lr if self.method == "finetune" else self.rewind_lr

    @property
    def warmup(self) -> float:
        return 0.0 if self.method == "finetune" else float(self.warmup_epochs)



@dataclasses.dataclass(frozen=True)
class SpaceSpec:
    """How the rows of one space are pruned and retrained; stored in the space's attributes (``criterion``,
    ``retrain_spec``), so the driver reads it from the file, never from the experiment's globals."""

    retrain: RetrainSpec
    criterion: str = "l2"

    def attrs(self) -> dict[str, str]:
        return {"criterion": self.criterion, "retrain_spec": self.retrain.to_json()}

    @classmethod
    def from_attrs(cls, attrs, default: "SpaceSpec") -> "SpaceSpec":
        """The spec stored on a space; ``default`` (the experiment's, epochs from the space) for files written before
        spaces carried one."""
        def text(value) -> str:
            return value.decode() if isinstance(value, bytes) else str(value)

        if "retrain_spec" in attrs:
            retrain = RetrainSpec.from_json(text(attrs["retrain_spec"]))
        else:
            retrain = default.retrain.with_epochs(int(attrs["epochs"]))
        criterion = text(attrs["criterion"]) if "criterion" in attrs else default.criterion
        return cls(retrain, criterion)
