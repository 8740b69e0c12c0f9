"""Knowledge distillation from the unpruned base network: one teacher forward per batch serves a whole cohort.

With ``[retrain] distill`` every member's training loss becomes

    (1 − α)·CE(student, labels) + α·T²·KL(teacher ∥ student)

with both distributions softmaxes at temperature T (Hinton et al. 2015; T² keeps the soft term's gradients on the
scale of the hard one's), α = ``distill_alpha``, T = ``distill_temperature``; label smoothing applies to the CE part
as without distillation. The KL term is each member's mean over the batch of Σ_c p_c (log p_c − log q_c).

The teacher (:class:`Teacher`) is the base network the members were pruned from, in eval mode (BatchNorm's running
statistics frozen, dropout off) and without gradients, copied once onto the cohort's device and memory format (the
caller's module is never moved or changed); it runs under the cohort's autocast. A cohort asks its
:class:`Distillation` for the batch's :class:`SoftTargets` once per batch and hands them to every member, whatever
steps them: the threads or CUDA streams of :class:`~nps.pipeline.training.cohort.Cohort`, or the one fused step of
:class:`~nps.pipeline.training.fused_cohort.FusedCohort` (inside its captured CUDA graph on a GPU). So the teacher
costs one forward per batch, not K.

The seed rule holds: the soft targets depend on the batch and the base network only. On the CPU the teacher runs in
the cohort's own thread, which steps on one intra-op thread while members step in
:class:`~nps.pipeline.training.devices.CpuWorkers` threads, so its numbers do not depend on the cohort size.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nps.pipeline.training.schedule import autocast_context
from nps.pipeline.training.spec import RetrainSpec


@dataclasses.dataclass(frozen=True)
class SoftTargets:
    """The teacher's answer for one batch: its class log-probabilities at temperature T and their exp, ``[B, C]``
    float32 (computed once, read by every member)."""

    log_p: torch.Tensor
    p: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.log_p, self.p


def kl_to_teacher(logits: torch.Tensor, soft: SoftTargets, temperature: float) -> torch.Tensor:
    """KL(teacher ∥ student) at ``temperature``, the mean over the batch: ``[B, C]`` logits → a scalar, a fused
    cohort's ``[B, K, C]`` → one per member ``[K]``. Computed in float32 whatever the autocast."""
    log_q = F.log_softmax(logits.float() / temperature, dim=-1)
    log_p, p = soft.log_p, soft.p
    if logits.dim() == 3:
        log_p, p = log_p[:, None], p[:, None]
    return (p * (log_p - log_q)).sum(-1).mean(0)


def blend(ce: torch.Tensor, logits: torch.Tensor, soft: SoftTargets, alpha: float, temperature: float) -> torch.Tensor:
    """(1 − α)·CE + α·T²·KL(teacher ∥ student), member by member (``ce`` a scalar or one per member)."""
    return (1.0 - alpha) * ce + (alpha * temperature * temperature) * kl_to_teacher(logits, soft, temperature)


class Teacher:
    """The unpruned base network that a cohort's members distil from (see the module docstring). ``network`` is
    never modified: it is copied onto each device it is asked for (the last copy is kept, so the cohorts of one
    :func:`~nps.pipeline.training.engine.run_cohorts` share it)."""

    def __init__(self, network: nn.Module):
        if not isinstance(network, nn.Module):
            raise TypeError(f"a teacher is a network (nn.Module), got {type(network).__name__}")
        self.network = network
        self._placed: tuple[tuple, nn.Module] | None = None

    def placed(self, device: torch.device, channels_last: bool) -> nn.Module:
        """The teacher on ``device`` in the memory format asked for, in eval mode, its parameters frozen."""
        key = (torch.device(device), bool(channels_last))
        if self._placed is None or self._placed[0] != key:
            self._placed = None  # the old copy goes before the new one is made
            net = copy.deepcopy(self.network).to(key[0])
            if channels_last:
                net.to(memory_format=torch.channels_last)
            net.eval().requires_grad_(False)
            self._placed = (key, net)
        return self._placed[1]

    def for_cohort(self, spec: RetrainSpec, device: torch.device, channels_last: bool,
                   amp_dtype: torch.dtype | None) -> "Distillation":
        return Distillation(self.placed(device, channels_last), spec.distill_alpha, spec.distill_temperature,
                            torch.device(device), amp_dtype)


class Distillation:
    """One cohort's distillation: its teacher placed on the cohort's device, α, T and the cohort's autocast."""

    def __init__(self, network: nn.Module, alpha: float, temperature: float, device: torch.device,
                 amp_dtype: torch.dtype | None):
        self.network, self.alpha, self.temperature = network, float(alpha), float(temperature)
        self.device, self.amp_dtype = device, amp_dtype

    @torch.no_grad()
    def targets(self, x: torch.Tensor) -> SoftTargets:
        """The batch's soft targets: ONE teacher forward, whatever the number of members that read them."""
        with autocast_context(self.device, self.amp_dtype):
            logits = self.network(x)
        log_p = F.log_softmax(logits.float() / self.temperature, dim=-1)
        return SoftTargets(log_p, log_p.exp())

    def loss(self, ce: torch.Tensor, logits: torch.Tensor, soft: SoftTargets) -> torch.Tensor:
        """The members' distillation losses from their cross-entropies ``ce`` and ``logits`` (see :func:`blend`)."""
        return blend(ce, logits, soft, self.alpha, self.temperature)

    def criterion(self, ce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  soft: SoftTargets) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """A member's loss on this batch, ``criterion(logits, labels)``, from its cross-entropy ``ce``."""
        return lambda logits, y: self.loss(ce(logits, y), logits, soft)


def distillation_for(teacher: Teacher | None, spec: RetrainSpec, device: torch.device, channels_last: bool,
                     amp_dtype: torch.dtype | None) -> Distillation | None:
    """A cohort's :class:`Distillation` when its recipe distils (``spec.distill``), else None (a cohort that distils
    has a teacher: :class:`~nps.pipeline.training.cohort.Cohort` refuses one without)."""
    return teacher.for_cohort(spec, device, channels_last, amp_dtype) if spec.distill else None
