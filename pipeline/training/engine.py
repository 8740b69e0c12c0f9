"""The cohort engine: any number of subnetworks retrained in cohorts of ``k`` on one data stream each.

:func:`run_cohorts` forms the cohorts (``k`` from the device's free memory on a GPU, 8 on the CPU, or given),
trains each with :class:`~nps.pipeline.training.cohort.Cohort`, and halves a cohort that runs out of CUDA memory,
retrying its unfinished members from their original weights while keeping what had finished. Events
(:mod:`nps.pipeline.training.events`) go to ``on_event``: :class:`CohortStarted` before each cohort,
:class:`CohortHalved` when one is halved, and the cohort's own.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from nps.pipeline.errors import NpsError
from nps.pipeline.row_status import RowStatus
from nps.pipeline.training.cohort import CohortOptions, CohortOutOfMemory, ids_for, train_cohort
from nps.pipeline.training.devices import choose_cohort_size, resolve_amp
from nps.pipeline.training.events import (
    CohortHalved,
    CohortStarted,
    CohortUnfused,
    EventCallback,
    MemberFinished,
    Result,
)
from nps.pipeline.training.spec import RetrainSpec, resolve_fuse

log = logging.getLogger(__name__)

ModelSource = nn.Module | Callable[[], nn.Module]


def _materialize(source: ModelSource) -> nn.Module:
    """A fresh trainable copy: the original module is never modified (an OOM retry starts from it again)."""
    if isinstance(source, nn.Module):
        return copy.deepcopy(source)
    model = source()
    if not isinstance(model, nn.Module):
        raise TypeError(f"a model factory returned {type(model).__name__}, not an nn.Module")
    return model


def _free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _first_input_shape(loader: Iterable) -> tuple[int, ...]:
    for x, _ in loader:
        return tuple(x.shape)
    raise NpsError("the training loader yielded no batches")


# 14 parameters: the engine's one entry point, used by the run's worker, the tests and the benchmarks; past the data
# and the recipe every parameter is a keyword with a default, and how a cohort trains is one CohortOptions.
def run_cohorts(models: Sequence[ModelSource], train_loader: Iterable, val_loader: Iterable, spec: RetrainSpec,
                device: torch.device | str = "cpu", *, k: int | None = None, max_k: int | None = None,
                ids: Sequence[Any] | None = None, seeds: Sequence[int] | None = None,
                input_shape: Sequence[int] | None = None, on_event: EventCallback | None = None,
                options: CohortOptions | None = None, fusion=None, teacher=None, **settings: Any) -> list[Result]:
    """Retrain any number of subnetworks in cohorts of ``k``, halving a cohort on CUDA out-of-memory.

    Parameters
    ----------
    models : sequence of nn.Module or zero-argument callables returning one
        Never modified: each cohort trains fresh copies (modules are deep-copied, callables called), so a cohort
        that runs out of memory restarts its unfinished subnetworks from their original weights.
    seeds : sequence of int, optional
        One per model, for ``scratch`` re-initialisation.
    k : int, optional
        Cohort size; by default :func:`~nps.pipeline.training.devices.choose_cohort_size` (free GPU memory; 8 on
        the CPU), capped by ``max_k``.
    input_shape : (N, C, H, W), optional
        Training batch shape for the automatic ``k``; read from the first training batch if not given.
    options, **settings
        How each cohort trains (:class:`~nps.pipeline.training.cohort.CohortOptions`, or its fields as keywords).
    fusion : :class:`~nps.pipeline.training.fused_cohort.Fusion`, optional
        The base network, its table and one keep vector per model: with ``options.fuse`` resolved true, each
        cohort trains fused (:mod:`nps.pipeline.training.fused_cohort`); one that cannot be fused trains unfused,
        and says why (:class:`~nps.pipeline.training.events.CohortUnfused`).
    teacher : :class:`~nps.pipeline.training.distill.Teacher`, optional
        The network a recipe with ``distill`` distils from (the unpruned base network); each cohort, fused or
        not, runs it once per batch for all its members. Needed when ``spec.distill``, unused otherwise.

    Returns
    -------
    list of Result, in the order of ``models``. A subnetwork that runs out of memory even alone has failed.
    """
    device = torch.device(device)
    spec.check()
    if spec.distill and teacher is None:
        raise ValueError("the recipe distils (retrain.distill) but run_cohorts was given no teacher network")
    if settings:
        options = dataclasses.replace(options or CohortOptions(), **settings)
    options = options or CohortOptions()
    n = len(models)
    ids = ids_for(models, ids)
    if seeds is not None and len(seeds) != n:
        raise ValueError(f"got {n} models but {len(seeds)} seeds")
    if n == 0:
        return []
    if k is None:
        k = _automatic_k(models, train_loader, device, options, max_k, input_shape)
    k = max(1, min(int(k), n if max_k is None else max_k))
    run = _Run(train_loader, val_loader, spec, device, on_event, options, teacher)
    fused = fusion is not None and resolve_fuse(options.fuse, device)
    results: list[Result | None] = [None] * n
    todo = list(range(n))
    while todo:
        cohort, todo = todo[:k], todo[k:]
        run.emit(CohortStarted(tuple(ids[i] for i in cohort), len(cohort)))
        trained = [_materialize(models[i]) for i in cohort]
        oom = None
        cohort_ids = [ids[i] for i in cohort]
        cohort_seeds = None if seeds is None else [seeds[i] for i in cohort]
        try:
            out = None
            if fused:
                out = _train_fused(run, trained, cohort_ids, cohort_seeds, fusion, cohort)
                fused = out is not None  # a network that cannot be fused is not tried again
            if out is None:
                out = run.unfused(trained, cohort_ids, cohort_seeds)
        except CohortOutOfMemory as exc:
            oom = (exc.finished, exc.unfinished, str(exc))
        if oom is not None:
            # Outside the except block: the exception, its traceback and the frames holding device tensors are gone.
            del trained
            _free_device_memory(device)
            k, rest = _after_out_of_memory(run, oom, cohort, ids, results)
            todo = rest + todo
            continue
        for i, result in zip(cohort, out):
            results[i] = result
        del trained, out
        _free_device_memory(device)
    return results  # type: ignore[return-value]


@dataclasses.dataclass
class _Run:
    """What every cohort of one run_cohorts call shares: the data, the recipe, the device, where events go, how a
    cohort trains, and the teacher it distils from."""

    train_loader: Iterable
    val_loader: Iterable
    spec: RetrainSpec
    device: torch.device
    on_event: EventCallback | None
    options: CohortOptions
    teacher: Any = None

    def emit(self, event) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def unfused(self, models, ids, seeds) -> list[Result]:
        return train_cohort(models, self.train_loader, self.val_loader, self.spec, self.device, ids=ids, seeds=seeds,
                            on_event=self.on_event, options=self.options, teacher=self.teacher)


def _automatic_k(models, train_loader, device: torch.device, options: CohortOptions, max_k, input_shape) -> int:
    """The cohort size when none is given: what fits the GPU's free memory, or the CPU's default."""
    if device.type != "cuda":
        return choose_cohort_size(list(models), device, (1,), max_k=max_k)
    shape = tuple(input_shape) if input_shape is not None else _first_input_shape(train_loader)
    sample = [m for m in models if isinstance(m, nn.Module)] or [_materialize(models[0])]
    amp_dtype = resolve_amp(options.amp, device, sample)
    return choose_cohort_size(sample, device, shape, max_k=max_k, amp_dtype=amp_dtype)


def _after_out_of_memory(run: _Run, oom: tuple, cohort: list[int], ids, results: list) -> tuple[int, list[int]]:
    """A cohort ran out of memory: keep what finished, fail what does not fit even alone; returns the halved cohort
    size and the positions to train again."""
    finished, unfinished, message = oom
    for pos, result in finished.items():
        results[cohort[pos]] = result
    rest = [cohort[pos] for pos in unfinished]
    if len(cohort) == 1:
        for i in rest:
            results[i] = Result(ids[i], RowStatus.FAILED, error=f"{message}: does not fit even alone", cohort_size=1)
            run.emit(MemberFinished(results[i]))
        return 1, []
    k = max(1, len(cohort) // 2)
    log.warning("%s; retrying %d subnetworks in cohorts of %d", message, len(rest), k)
    run.emit(CohortHalved(tuple(ids[i] for i in rest), len(cohort), k))
    return k, rest


def _train_fused(run: _Run, models, ids, seeds, fusion, cohort):
    """The cohort trained fused, or None when it cannot be fused (said with a CohortUnfused event; nothing was
    trained: fusing is refused before the first step). When a member's NaN spoiled others, the members without a
    result are trained again unfused from fresh copies."""
    from nps.pipeline.training.fuse import FuseUnsupported
    from nps.pipeline.training.fused_cohort import CohortSpoiled, FusedCohort, Fusion

    part = Fusion(fusion.base, fusion.table, fusion.keeps[list(cohort)])
    fresh = [copy.deepcopy(m) for m in models]  # (the fused cohort trains the members in place)
    try:
        return FusedCohort(models, run.train_loader, run.val_loader, run.spec, run.device, fusion=part, ids=ids,
                           seeds=seeds, options=run.options, on_event=run.on_event, teacher=run.teacher).run()
    except FuseUnsupported as exc:
        log.warning("cannot fuse this cohort (%s); training it unfused", exc)
        run.emit(CohortUnfused(tuple(ids), str(exc)))
        return None
    except CohortSpoiled as exc:
        log.warning("%s; training the rest of the cohort unfused", exc)
        run.emit(CohortUnfused(tuple(ids[i] for i in exc.unfinished), str(exc)))
        out = dict(exc.finished)
        rest = run.unfused([fresh[i] for i in exc.unfinished], [ids[i] for i in exc.unfinished],
                           None if seeds is None else [seeds[i] for i in exc.unfinished])
        out.update(zip(exc.unfinished, rest))
        return [out[i] for i in range(len(models))]
