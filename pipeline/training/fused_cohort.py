"""A cohort trained fused: the K members as one module (:mod:`nps.pipeline.training.fuse`), one step for all of them.

Same life and same results as :class:`nps.pipeline.training.cohort.Cohort` (set-up, adaptive BN and its score,
scratch re-initialisation, epochs, the final evaluation, one :class:`~nps.pipeline.training.events.Result` per
member), with one forward, one backward and one optimizer step per batch for the whole cohort instead of K:

- the loss is the sum of the members' own losses (each the mean cross-entropy of its ``[:, m]`` logits), so each
  member's gradients are its own; after every backward the padding's gradients are zeroed (one ``_foreach_mul_``),
  so with them at zero SGD's momentum and weight decay keep the padding at exactly zero;
- with distillation (:mod:`nps.pipeline.training.distill`) each member's loss blends its cross-entropy with the KL
  to the teacher's soft targets, made by one teacher forward per step (inside the captured graph on a GPU);
- a member whose loss turns NaN/inf stops alone: its loss weight goes to zero and its parameters, statistics and
  momentum are zeroed (NaNs included), so it computes zeros from then on; the others go on;
- on a GPU the whole step (forward, backward, padding masks, SGD with the learning rate as a device tensor, the NaN
  flags) is captured once as a CUDA graph and replayed with each batch copied into static buffers (PyTorch's
  whole-network capture); a capture that fails falls back to eager steps with a log line.

Members differ from an unfused run by rounding only (a grouped conv sums in another order than K separate ones):
the README's seed rule says what holds bit for bit and what to tolerance.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nps.pipeline.errors import NpsError
from nps.pipeline.training.cohort import _FAULT_SHIFT, _NO_FAULT, Cohort, CohortOptions, Record, set_epoch
from nps.pipeline.training.distill import Teacher
from nps.pipeline.training.evaluation import _batches, adaptive_bn_many
from nps.pipeline.training.events import MemberStarted, Result
from nps.pipeline.training.fuse import FusedNetwork, fuse
from nps.pipeline.training.schedule import autocast_context, make_optimizer, make_scheduler, reinitialize
from nps.pipeline.training.spec import RetrainSpec

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Fusion:
    """What a fused cohort needs beyond its members: the base network and table they were pruned from, and their
    keep vectors (one per member, in the members' order)."""

    base: nn.Module
    table: Any
    keeps: np.ndarray


def member_losses(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Each member's mean cross-entropy on the batch: ``[B, K, C]`` logits → ``[K]``."""
    b, k, _ = logits.shape
    return F.cross_entropy(logits.permute(0, 2, 1), y[:, None].expand(b, k), reduction="none",
                           label_smoothing=label_smoothing).mean(0)


@torch.no_grad()
def evaluate_fused(net: FusedNetwork, loader: Iterable, device: torch.device, *, amp_dtype=None,
                   channels_last: bool = False) -> list[tuple[float, float, float]]:
    """Top-1 %, top-5 % and mean loss of every member of ``net``, in one pass over ``loader``."""
    was_training = net.training
    net.eval()
    n = 0
    correct1 = correct5 = loss_sum = None
    for x, y in _batches(loader, device, channels_last):
        with autocast_context(device, amp_dtype):
            logits = net(x)
        logits = logits.float()
        b, k, c = logits.shape
        loss = F.cross_entropy(logits.permute(0, 2, 1), y[:, None].expand(b, k), reduction="none").double().sum(0)
        hit = logits.topk(min(5, c), dim=2).indices.eq(y.view(-1, 1, 1))
        top1, top5 = hit[:, :, 0].sum(0).double(), hit.any(dim=2).sum(0).double()
        if correct1 is None:
            correct1, correct5, loss_sum = top1, top5, loss
        else:
            correct1, correct5, loss_sum = correct1 + top1, correct5 + top5, loss_sum + loss
        n += b
    net.train(was_training)
    if n == 0:
        raise NpsError("the evaluation loader yielded no batches")
    return [(100.0 * a / n, 100.0 * b / n, c / n)
            for a, b, c in zip(correct1.tolist(), correct5.tolist(), loss_sum.tolist())]


class CohortSpoiled(RuntimeError):
    """A member's NaN reached other members of a fused cohort: ``finished`` (position → Result) stays valid, the
    members at ``unfinished`` are trained again, unfused, from their original weights."""

    def __init__(self, finished: dict, unfinished: list[int], why: str):
        super().__init__(why)
        self.finished, self.unfinished = finished, unfinished


class FusedCohort(Cohort):
    """The members of one cohort trained as one fused module (see the module docstring): a
    :class:`~nps.pipeline.training.cohort.Cohort` whose set-up fuses the members and whose batch is one step of
    the fused module; the epochs, faults, events and results are the cohort's."""

    # the unfused Cohort's parameters and the fusion: a fused cohort is called exactly as an unfused one
    def __init__(self, models: Sequence[nn.Module], train_loader: Iterable, val_loader: Iterable, spec: RetrainSpec,
                 device: torch.device | str = "cpu", *, fusion: Fusion, ids: Sequence[Any] | None = None,
                 seeds: Sequence[int] | None = None, options: CohortOptions | None = None, on_event=None,
                 teacher: Teacher | None = None):
        super().__init__(models, train_loader, val_loader, spec, device, ids=ids, seeds=seeds, options=options,
                         on_event=on_event, teacher=teacher)
        if len(fusion.keeps) != self.k:
            raise ValueError(f"got {self.k} models but {len(fusion.keeps)} keep vectors")
        self.fusion = fusion
        self.check_every = self.options.check_every or 1  # every step: a failed member is zeroed before it spreads
        self.net: FusedNetwork | None = None
        self._graph = None  # the captured CUDA graph step, when there is one

    # -- set-up ------------------------------------------------------------------------------------------------------

    def set_up(self) -> None:
        """The members fused on the device, adaptive BN and its score, scratch re-initialisation, the optimizer."""
        device = self.device
        for model in self.models:
            model.to(device)
        self.net = fuse(self.fusion.base, self.fusion.table, self.fusion.keeps, self.models)
        if self.nhwc:
            self.net.to(memory_format=torch.channels_last)
        for ident in self.ids:
            self._emit(MemberStarted(ident, self.k))
        bn_top1 = [math.nan] * self.k
        if self.options.bn_images > 0:
            self.where = "adaptive BN"
            set_epoch(self.train_loader, 0)
            adaptive_bn_many([self.net], self.train_loader, device, num_images=self.options.bn_images,
                             amp_dtype=self.amp_dtype, channels_last=self.nhwc)
            bn_top1 = [s[0] for s in evaluate_fused(self.net, self.val_loader, device, amp_dtype=self.amp_dtype,
                                                    channels_last=self.nhwc)]
        if self.spec.method == "scratch":
            for pos, model in enumerate(self.models):
                reinitialize(model, seed=None if self.seeds is None else int(self.seeds[pos]))
            self.net.load_members()
        self.where = "setup"
        self.optimizer = make_optimizer(self.net, self.spec)
        self.scheduler = make_scheduler(self.optimizer, self.spec, self.steps)
        masks = self.net.padding_masks()
        self._masked = [p for p, _ in masks]
        self._masks = [m for _, m in masks]
        self.alive = torch.ones(self.k, device=device, dtype=torch.float32)
        self.fault = torch.full((self.k,), _NO_FAULT, device=device, dtype=torch.int64)
        self.loss_sum = torch.zeros(self.k, device=device, dtype=torch.float32)
        use_scaler = device.type == "cuda" and self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(device.type) if use_scaler else None
        self.members = [Record(pos, self.ids[pos], model, bn_top1[pos]) for pos, model in enumerate(self.models)]
        self.live = list(self.members)
        self._set_up_teacher()

    # -- a step ------------------------------------------------------------------------------------------------------

    def _step(self, x: torch.Tensor, y: torch.Tensor, code: torch.Tensor | int) -> None:
        with autocast_context(self.device, self.amp_dtype):
            logits = self.net(x).float()
        # A member whose logits are not finite gets no gradient at all (zero, not NaN·0): its logits are replaced
        # before the loss, so NaN never enters the backward, where a low-precision kernel may spread it across
        # the groups of a grouped conv (oneDNN's bf16 ones do).
        ok = torch.isfinite(logits).all(dim=2).all(dim=0)
        logits = torch.where(ok[None, :, None], logits, torch.zeros_like(logits))
        losses = member_losses(logits, y, self.spec.label_smoothing)
        if self.distillation is not None:  # one teacher forward for the K members (captured with the step on a GPU)
            losses = self.distillation.loss(losses, logits, self.distillation.targets(x))
        values = losses.detach()
        finite = ok & torch.isfinite(values)
        self.fault.masked_fill_(~finite & (self.fault == _NO_FAULT) & (self.alive > 0), code)
        use = finite & (self.alive > 0)
        self.loss_sum += torch.where(use, values, torch.zeros_like(values))
        total = torch.where(use, losses, torch.zeros_like(losses)).sum()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(total).backward()
            self.scaler.unscale_(self.optimizer)
            self._mask_grads()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            total.backward()
            self._mask_grads()
            self.optimizer.step()

    def _mask_grads(self) -> None:
        if not self._masked:  # members of one width (or one member): no padding
            return
        grads = [p.grad for p in self._masked if p.grad is not None]
        if len(grads) == len(self._masked):
            torch._foreach_mul_(grads, self._masks)
        else:
            for p, m in zip(self._masked, self._masks):
                if p.grad is not None:
                    p.grad.mul_(m)

    def _train_batch(self, x, y, code: int, step: int) -> None:
        if self._graph and self._graph.fits(x, y):
            self._graph.replay(x, y, code, self.scheduler.get_last_lr()[0])
        elif self.device.type == "cuda" and self.options.cuda_graphs and self._graph is None and step >= 3:
            self._graph = CapturedStep.capture(self, x, y, code)  # this step runs once, while capturing
            if self._graph is None:
                self._graph = False  # captured once or never: eager from now on
        else:
            self._step(x, y, code)
        self.scheduler.step()

    # -- faults ------------------------------------------------------------------------------------------------------

    def fail(self, member: Record, message: str) -> None:
        """The member stops alone: its loss weight goes to zero, its parameters, statistics and momentum too."""
        with torch.no_grad():
            self.alive[member.position] = 0.0
        momentum = [self.optimizer.state.get(t, {}).get("momentum_buffer") for t in self.net.tensors()]
        self.net.zero_member(member.position, momentum)
        super().fail(member, message)

    def check_faults(self) -> None:
        if not self.live:
            return
        codes = self.fault.tolist()  # one host sync for the whole cohort
        failed = [m for m in self.live if codes[m.position] != _NO_FAULT]
        for m in failed:
            epoch, step = divmod(codes[m.position], _FAULT_SHIFT)
            self.fail(m, f"loss became nan/inf at epoch {epoch} step {step}")
        if failed:  # the others' weights must still be finite: NaN in a member's activations can cross groups
            spoiled = [m for m in self.live
                       if not all(bool(torch.isfinite(p.fused.detach()[p.at(m.position)]).all())
                                  for p in self.net._params)]
            if spoiled:
                raise CohortSpoiled(dict(self.results), [m for m in range(self.k) if m not in self.results],
                                    f"member {failed[0].id}'s NaN reached {len(spoiled)} others")

    # -- the cohort's hooks ------------------------------------------------------------------------------------------

    def _start_epoch(self) -> None:
        self.net.train()
        self.loss_sum.zero_()

    def _evaluate(self, members: list[Record]) -> list[tuple[float, float, float]]:
        scores = evaluate_fused(self.net, self.val_loader, self.device, amp_dtype=self.amp_dtype,
                                channels_last=self.nhwc)
        return [scores[m.position] for m in members]

    def _epoch_losses(self, step: int) -> dict:
        sums = self.loss_sum.tolist()
        return {m.id: sums[m.position] / step for m in self.live}

    def _before_results(self) -> None:
        if self.options.keep_models:
            self.net.write_back()

    def _after_oom(self) -> None:
        self._graph = self.net = None

    def run(self) -> list[Result]:
        """As :meth:`Cohort.run`; also raises :class:`~nps.pipeline.training.fuse.FuseUnsupported` before any
        training when the members cannot be fused, and :class:`CohortSpoiled` when a member's NaN reached others."""
        return super().run()


class CapturedStep:
    """The fused training step captured as one CUDA graph (PyTorch's whole-network capture): static input and
    label buffers, the learning rate as a device tensor the optimizer reads, and the NaN flags, all inside the
    graph. Made by :meth:`capture`, which returns None (and logs why) when capture fails: the cohort then goes on
    with eager steps. Only on CUDA; nothing of it runs on the CPU."""

    def __init__(self, cohort: FusedCohort, graph, x, y, code, lr):
        self.cohort, self.graph, self.x, self.y, self.code, self.lr = cohort, graph, x, y, code, lr

    @classmethod
    def capture(cls, cohort: FusedCohort, x: torch.Tensor, y: torch.Tensor, step_code: int) -> "CapturedStep | None":
        """Run this batch's step (the warm-up the recipe asks for, on a side stream), then capture the step."""
        if cohort.scaler is not None:
            log.info("no CUDA graph for fp16 with a GradScaler; eager steps")
            return None
        try:
            opt = cohort.optimizer
            lr = torch.tensor(opt.param_groups[0]["lr"], device=cohort.device, dtype=torch.float32)
            for group in opt.param_groups:
                group["lr"] = lr  # SGD accepts a tensor learning rate: the graph reads it, the loop fills it
            static_x, static_y = x.clone(), y.clone()
            code = torch.full((), step_code, device=cohort.device, dtype=torch.int64)
            side = torch.cuda.Stream(cohort.device)
            side.wait_stream(torch.cuda.current_stream(cohort.device))
            with torch.cuda.stream(side):  # the recipe's warm-up on a side stream: this batch's real step
                cohort._step(static_x, static_y, code)
            torch.cuda.current_stream(cohort.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                cohort._step(static_x, static_y, code)
            return cls(cohort, graph, static_x, static_y, code, lr)
        except Exception as exc:  # noqa: BLE001 - any capture failure: eager steps are always correct
            log.warning("CUDA graph capture of the fused step failed (%s); training eagerly", exc)
            for group in cohort.optimizer.param_groups:
                group["lr"] = float(group["lr"])
            return None

    def fits(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        return x.shape == self.x.shape and y.shape == self.y.shape  # the last, shorter batch runs eagerly

    def replay(self, x: torch.Tensor, y: torch.Tensor, code: int, lr: float) -> None:
        self.x.copy_(x, non_blocking=True)
        self.y.copy_(y, non_blocking=True)
        self.code.fill_(code)
        self.lr.fill_(lr)
        self.graph.replay()
