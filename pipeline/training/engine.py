"""The cohort engine: K subnetworks retrained together on ONE data stream.

Every batch is loaded and moved to the device once; each live subnetwork of the cohort then takes its own
optimisation step on it (its own optimizer, per-step LR schedule and, for fp16, GradScaler). What the cohort saves
is the data side (decode, augmentation, host→device copy) paid once instead of K times, and on a GPU the idle time
of small models: each subnetwork runs in its own CUDA stream, so the kernels of K small networks overlap.

Robustness:

- a subnetwork whose training loss becomes NaN/inf is stopped and reported ``failed`` with the epoch and step; the
  rest of the cohort goes on. The check reads a flag kept on the device, every ``check_every`` steps (every step on
  the CPU, every 25 on a GPU, to avoid a host sync per step) and at the end of every epoch;
- a CUDA out-of-memory error inside a cohort raises :class:`CohortOutOfMemory`; :func:`run_cohorts` then splits the
  unfinished subnetworks into halves and retries them from their original weights, keeping what had finished.

On the CPU the analogue of streams is threads: ``cpu_workers`` threads each step their share of the cohort with ONE
intra-op thread (the cores are split between models instead of within every small convolution). Pruned networks'
convolutions have few channels, so splitting each of them across cores scales poorly and suffers badly when the cores
are shared with other processes (OpenMP barriers wait for descheduled threads); one model per core does not. It also
makes a member's numbers independent of the cohort: oneDNN's convolutions may sum in another order with another
thread count, so a cohort of one steps its member on one intra-op thread too (``member_threads=1``, the default).

What a member sees is fixed by its inputs only (the seed rule of the run driver): each epoch's data comes from
``train_loader.set_epoch(epoch - 1)`` when the loader has it (the nps loaders: order and augmentation from their seed
and the epoch, whatever was iterated before), adaptive BN from the first ``bn_images`` of epoch 0, and a ``scratch``
member's fresh weights from its entry in ``seeds``.

Library code never prints: progress goes to the ``on_event`` callback (plain dicts) and to ``logging``. Events:

- ``{"event": "cohort", "ids", "k"}`` (run_cohorts) before a cohort starts;
- ``{"event": "start", "id", "k"}`` per subnetwork when its cohort starts (again after an OOM retry);
- ``{"event": "progress", "epoch", "epochs", "step", "steps", "k_live", "img_per_s"}`` every ``progress_s``;
- ``{"event": "epoch", "epoch", "epochs", "ids", "k_live", "steps", "seconds", "img_per_s", "train_loss"
  (id → mean), "val_top1" (id → %, with evaluation per epoch)}`` after each epoch;
- ``{"event": "done", "id", "result"}`` / ``{"event": "failed", "id", "error", "result"}`` per subnetwork;
- ``{"event": "oom", "ids", "k", "retry_k"}`` (run_cohorts) when a cohort is halved.

``img_per_s`` counts images × live subnetworks.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import dataclasses
import functools
import gc
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from nps.pipeline.errors import NpsError
from nps.pipeline.training.steps import (
    RetrainSpec, run_each, adaptive_bn_many, autocast_context, evaluate_many, make_optimizer, make_scheduler,
    reinitialize,
)

log = logging.getLogger(__name__)

Event = dict[str, Any]
EventCallback = Callable[[Event], None]
_NO_FAULT = -1


@dataclasses.dataclass
class Result:
    """The outcome of retraining one subnetwork."""

    id: Any
    status: str
    """``"done"`` or ``"failed"``."""
    top1: float = math.nan
    top5: float = math.nan
    loss: float = math.nan
    bn_top1: float = math.nan
    """Top-1 after adaptive-BN recalibration, before any training (NaN when not computed)."""
    curve: list[float] = dataclasses.field(default_factory=list)
    """Val top-1 after every epoch (empty unless evaluation per epoch is on)."""
    train_s: float = 0.0
    """Wall seconds of the training loop while this subnetwork was in it (shared with its cohort; evaluation and
    data before the first step excluded)."""
    error: str = ""
    epochs_done: int = 0
    cohort_size: int = 1
    model: nn.Module | None = None
    """The retrained subnetwork (on the CPU), only with ``keep_models=True``."""

    @property
    def ok(self) -> bool:
        return self.status == "done"


class CohortOutOfMemory(RuntimeError):
    """A CUDA out-of-memory error in a cohort: ``finished`` (cohort position → Result) stays valid, the subnetworks
    at positions ``unfinished`` must be retrained from their original weights."""

    def __init__(self, finished: dict[int, Result], unfinished: list[int], where: str):
        super().__init__(f"CUDA out of memory during {where} with {len(finished) + len(unfinished)} subnetworks")
        self.finished = finished
        self.unfinished = unfinished


# --------------------------------------------------------------------------------------------------------------------
# Device settings.


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether the CPU has bf16 arithmetic instructions (AVX512-BF16 or AMX-BF16), read from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def has_depthwise_convs(models: Sequence[nn.Module]) -> bool:
    """Whether any of ``models`` has a depthwise conv (groups == in_channels > 1)."""
    return any(isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
               for model in models for m in model.modules())


def resolve_amp(amp: str | None, device: torch.device, models: Sequence[nn.Module] = ()) -> torch.dtype | None:
    """The autocast dtype. ``"auto"``: bf16 on GPUs that support it, else fp16 (with a GradScaler); on the CPU bf16
    where it has native bf16 instructions (tools/bench_cohort.py measured a pruned ResNet-56 step about 1.5–2× faster
    on a Zen 4 core), except for networks with depthwise convs (``models``): tools/bench_amp.py measured bf16
    autocast about 2× *slower* than fp32 for MobileNetV2/V3, EfficientNet and MNASNet on an AMD EPYC with
    AVX512-BF16, so those train in fp32; else none. Pruning keeps depthwise convs depthwise, so a base network and
    its subnetworks resolve alike."""
    amp = "off" if amp in (None, False) else amp
    if amp == "off":
        return None
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_native_bf16() and not has_depthwise_convs(models):
            return torch.bfloat16
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    raise NpsError(f"amp must be auto, bf16, fp16 or off, got {amp!r}")


def resolve_channels_last(channels_last: bool | str, device: torch.device) -> bool:
    """``"auto"``: channels_last (NHWC) on GPUs (tensor cores want it) and on the CPU (oneDNN's NHWC convolutions:
    a pruned ResNet-56 step measured about 1.4× faster than NCHW on a Zen 4 core, and no slower elsewhere we
    looked); ``False`` on other devices."""
    if channels_last == "auto":
        return device.type in ("cuda", "cpu")
    return bool(channels_last)


def resolve_cpu_workers(cpu_workers: int | str, device: torch.device, k: int) -> int:
    """Threads stepping cohort members concurrently on the CPU: ``"auto"`` → one per intra-op thread torch may use
    (``torch.get_num_threads()``), at most K; 1 = the plain loop (each op multi-threaded). Always 1 on a GPU."""
    if device.type != "cpu":
        return 1
    if cpu_workers == "auto":
        return max(1, min(k, torch.get_num_threads()))
    if isinstance(cpu_workers, bool) or not isinstance(cpu_workers, int) or cpu_workers < 1:
        raise NpsError(f"cpu_workers must be 'auto' or an integer >= 1, got {cpu_workers!r}")
    return min(k, cpu_workers)


class _CpuWorkers:
    """A pool of threads that step cohort members concurrently, each op single-threaded (see the module doc)."""

    def __init__(self, workers: int):
        self.workers = workers
        self._saved_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            workers, thread_name_prefix="nps-cohort", initializer=torch.set_num_threads, initargs=(1,))

    def map(self, fn: Callable[[Any], None], items: Sequence[Any]) -> None:
        """``fn(item)`` for every item, items dealt round-robin to the threads; re-raises the first error."""
        shares = [items[i::self.workers] for i in range(self.workers)]
        futures = [self._pool.submit(lambda share=share: [fn(item) for item in share]) for share in shares if share]
        concurrent.futures.wait(futures)
        for future in futures:
            future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        torch.set_num_threads(self._saved_threads)


# --------------------------------------------------------------------------------------------------------------------
# Cohort size.


def estimate_train_bytes(model: nn.Module, input_shape: Sequence[int], amp_dtype: torch.dtype | None = None) -> int:
    """Rough device bytes to train ``model`` on batches of ``input_shape`` (N, C, H, W).

    Parameters, gradients and momentum in fp32, plus an autocast copy of the weights, plus every leaf module's output
    for the whole batch (what autograd keeps for backward), measured with a shape-only forward on the meta device.
    """
    params = sum(p.numel() for p in model.parameters())
    act_bytes = 2 if amp_dtype in (torch.float16, torch.bfloat16) else 4
    meta = copy.deepcopy(model).to("meta")
    total = [0]

    def hook(module, inputs, output):
        if isinstance(output, torch.Tensor):
            total[0] += output.numel()

    handles = [m.register_forward_hook(hook) for m in meta.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            meta(torch.empty(tuple(input_shape), device="meta"))
    finally:
        for h in handles:
            h.remove()
    return int(params * (4 * 3 + act_bytes) + total[0] * act_bytes * 1.25)


def choose_cohort_size(models: Sequence[nn.Module], device: torch.device | str, input_shape: Sequence[int], *,
                       max_k: int | None = None, amp_dtype: torch.dtype | None = None,
                       free_bytes: int | None = None, reserve: float = 0.15, cpu_default: int = 8) -> int:
    """How many of ``models`` to train at once.

    On a GPU: as many as fit in the free memory (``torch.cuda.mem_get_info``, less ``reserve`` for the data, the
    allocator's slack and cuDNN workspaces), each costing :func:`estimate_train_bytes` of the largest model (every
    CUDA stream keeps its own activations). On the CPU: ``cpu_default``. Always within [1, len(models)] and
    ``max_k``. The estimate is deliberately simple: an out-of-memory error halves the cohort anyway.
    """
    device = torch.device(device)
    n = len(models)
    if n == 0:
        return 0
    limit = n if max_k is None else max(1, min(n, int(max_k)))
    if device.type != "cuda" and free_bytes is None:
        return max(1, min(limit, cpu_default))
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info(device)
    largest = max(models, key=lambda m: sum(p.numel() for p in m.parameters()))
    per_model = max(1, estimate_train_bytes(largest, input_shape, amp_dtype))
    k = int(free_bytes * (1 - reserve) // per_model)
    log.info("cohort size %d (free %.2f GiB, ~%.3f GiB per subnetwork)", k, free_bytes / 2**30, per_model / 2**30)
    return max(1, min(limit, k))


# --------------------------------------------------------------------------------------------------------------------
# One cohort.


class _Slot:
    """One subnetwork's training state."""

    def __init__(self, position, ident, model, train_model, config, steps_per_epoch, device, amp_dtype, stream):
        self.position = position
        self.id = ident
        self.model = model
        self.train_model = train_model
        self.optimizer = make_optimizer(model, config)
        self.scheduler = make_scheduler(self.optimizer, config, steps_per_epoch)
        use_scaler = device.type == "cuda" and amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler) if use_scaler else None
        self.stream = stream
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float32)
        self.fault = torch.full((), _NO_FAULT, device=device, dtype=torch.int64)  # first non-finite step, encoded
        self.curve: list[float] = []
        self.train_s = 0.0
        self.bn_top1 = math.nan
        self.final: tuple[float, float, float] | None = None
        self.epochs_done = 0

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


def _emit(on_event: EventCallback | None, event: Event) -> None:
    if on_event is not None:
        on_event(event)


def _steps_per_epoch(loader: Iterable, given: int | None) -> int:
    if given is not None:
        return int(given)
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise NpsError("the training loader has no len(); pass steps_per_epoch") from None


_FAULT_SHIFT = 1 << 32  # fault code = epoch * 2^32 + step (both 1-based)


def _ids_for(models, ids) -> list:
    """The caller's ids for ``models`` (default 0..n-1), one per model."""
    ids = list(range(len(models))) if ids is None else list(ids)
    if len(ids) != len(models):
        raise ValueError(f"got {len(models)} models but {len(ids)} ids")
    return ids


def _set_epoch(loader: Iterable, epoch: int) -> None:
    """The next pass of ``loader`` is epoch ``epoch`` (0-based), for loaders that can be told (``set_epoch``)."""
    set_epoch = getattr(loader, "set_epoch", None)
    if set_epoch is not None:
        set_epoch(epoch)


def train_cohort(
    models: Sequence[nn.Module],
    train_loader: Iterable,
    val_loader: Iterable,
    config: RetrainSpec,
    device: torch.device | str = "cpu",
    *,
    ids: Sequence[Any] | None = None,
    seeds: Sequence[int] | None = None,
    eval_every_epoch: bool = False,
    bn_images: int = 0,
    on_event: EventCallback | None = None,
    amp: str | None = "auto",
    compile: bool = False,
    channels_last: bool | str = "auto",
    steps_per_epoch: int | None = None,
    check_every: int | None = None,
    keep_models: bool = False,
    cpu_workers: int | str = "auto",
    member_threads: int | None = 1,
    progress_s: float = 2.0,
) -> list[Result]:
    """Retrain ``models`` together, one pass of ``train_loader`` per epoch shared by all of them.

    Parameters
    ----------
    models : sequence of nn.Module
        The pruned subnetworks. They are moved to ``device`` and trained in place.
    train_loader, val_loader : iterable of (images, labels)
        Any re-iterable batch source (an FFCV or torch DataLoader, a list). Batches are moved to ``device`` once.
    config : RetrainSpec
        Method, epochs and optimiser settings, shared by the cohort.
    ids : sequence, optional
        A label per model for results and events (default ``0..K-1``).
    seeds : sequence of int, optional
        One per model: seeds ``scratch`` re-initialisation (default: torch's global generator).
    eval_every_epoch : bool
        Evaluate on ``val_loader`` after every epoch (fills ``Result.curve``); otherwise only at the end.
    bn_images : int
        If > 0, first recalibrate BN on this many training images and evaluate: ``Result.bn_top1`` (EagleEye).
    on_event : callable, optional
        Receives dict events: ``start``, ``progress``, ``epoch``, ``done``, ``failed`` (see :func:`run_cohorts`).
    amp : "auto" | "bf16" | "fp16" | "off"
        Autocast dtype (see :func:`resolve_amp`); fp16 on a GPU adds a GradScaler per model.
    compile : bool
        ``torch.compile`` each model's training forward.
    channels_last : bool | "auto"
        NHWC memory format for models and inputs (see :func:`resolve_channels_last`).
    steps_per_epoch : int, optional
        Batches per epoch, for the LR schedule, when ``len(train_loader)`` does not exist.
    check_every : int, optional
        Steps between NaN/inf checks (default 1 on CPU, 25 on GPU); always at the end of an epoch.
    keep_models : bool
        Return each retrained model (moved to the CPU) in ``Result.model``.
    cpu_workers : "auto" | int
        On the CPU, threads stepping members concurrently (see :func:`resolve_cpu_workers`); ignored on GPUs.
        While they run, ``torch.set_num_threads(1)`` is in force (restored afterwards).
    member_threads : 1 or None
        On the CPU, intra-op threads of one member: 1 (each member's numbers independent of the cohort size and the
        cores) or None (a single-thread cohort uses every thread torch may use: one model alone, such as the base
        network, trains faster).

    Returns
    -------
    list of Result, in the order of ``models``.

    Raises
    ------
    CohortOutOfMemory
        On a CUDA out-of-memory error (the models are left on the device; the caller retries with fewer).
    """
    device = torch.device(device)
    config.check()
    k = len(models)
    ids = _ids_for(models, ids)
    if seeds is not None and len(seeds) != k:
        raise ValueError(f"got {k} models but {len(seeds)} seeds")
    if k == 0:
        return []
    amp_dtype = resolve_amp(amp, device, models)
    nhwc = resolve_channels_last(channels_last, device)
    spe = _steps_per_epoch(train_loader, steps_per_epoch) if config.epochs > 0 else 1
    check_every = check_every or (25 if device.type == "cuda" else 1)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    results: dict[int, Result] = {}
    slots: list[_Slot] = []
    live: list[_Slot] = []
    where = "setup"
    oom = False
    workers: _CpuWorkers | None = None
    epoch_started: list[float] = []  # start of the running epoch's training loop, if one is running

    def fail(slot: _Slot, message: str) -> None:
        live.remove(slot)
        if epoch_started:
            slot.train_s += time.perf_counter() - epoch_started[0]
        results[slot.position] = Result(slot.id, "failed", bn_top1=slot.bn_top1, curve=list(slot.curve),
                                        train_s=slot.train_s, error=message, epochs_done=slot.epochs_done,
                                        cohort_size=k)
        slot.release()
        log.info("subnetwork %s failed: %s", slot.id, message)
        _emit(on_event, {"event": "failed", "id": slot.id, "error": message, "result": results[slot.position]})

    def check_faults() -> None:
        if not live:
            return
        codes = torch.stack([s.fault for s in live]).tolist()  # one host sync for the whole cohort
        for slot, code in zip(list(live), codes):
            if code != _NO_FAULT:
                epoch, step = divmod(code, _FAULT_SHIFT)
                fail(slot, f"loss became nan/inf at epoch {epoch} step {step}")

    try:
        n_workers = resolve_cpu_workers(cpu_workers, device, k)
        if n_workers > 1 or (device.type == "cpu" and member_threads == 1):
            workers = _CpuWorkers(n_workers)
        runner = workers.map if workers is not None else run_each
        for pos, model in enumerate(models):
            model.to(device)
            if nhwc:
                model.to(memory_format=torch.channels_last)
        for pos in range(k):
            _emit(on_event, {"event": "start", "id": ids[pos], "k": k})

        bn_scores = [math.nan] * k
        if bn_images > 0:
            where = "adaptive BN"
            _set_epoch(train_loader, 0)  # a fixed image set: the first images of epoch 0
            adaptive_bn_many(models, train_loader, device, num_images=bn_images, amp_dtype=amp_dtype,
                             channels_last=nhwc, runner=runner)
            bn_scores = [r[0] for r in evaluate_many(models, val_loader, device, amp_dtype=amp_dtype,
                                                     channels_last=nhwc, runner=runner)]
        if config.method == "scratch":
            for pos, model in enumerate(models):
                reinitialize(model, seed=None if seeds is None else int(seeds[pos]))

        where = "setup"
        for pos, model in enumerate(models):
            stream = torch.cuda.Stream(device) if device.type == "cuda" else None
            train_model = torch.compile(model) if compile else model
            slot = _Slot(pos, ids[pos], model, train_model, config, spe, device, amp_dtype, stream)
            slot.bn_top1 = bn_scores[pos]
            slots.append(slot)
        live.extend(slots)

        for epoch in range(1, config.epochs + 1):
            if not live:
                break
            where = f"training epoch {epoch}"
            for s in live:
                s.model.train()
                s.loss_sum.zero_()
            images = 0
            t_epoch = time.perf_counter()
            t_report = t_epoch
            epoch_started[:] = [t_epoch]
            step = 0
            main_stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
            _set_epoch(train_loader, epoch - 1)
            for x, y in train_loader:
                step += 1
                x = x.to(device, non_blocking=True)
                if nhwc and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = y.to(device, non_blocking=True)
                images += y.shape[0]
                code = epoch * _FAULT_SHIFT + step
                if workers is not None:
                    workers.map(lambda s: s.step(x, y, criterion, device, amp_dtype, code), live)
                else:
                    for s in live:
                        with s.stream_context():
                            if s.stream is not None:
                                s.stream.wait_stream(main_stream)  # the batch (copied on the main stream) is ready
                                x.record_stream(s.stream)
                                y.record_stream(s.stream)
                            s.step(x, y, criterion, device, amp_dtype, code)
                if main_stream is not None:
                    for s in live:
                        main_stream.wait_stream(s.stream)  # device-side join; the host runs ahead to the next batch
                if step % check_every == 0:
                    check_faults()
                    if not live:
                        break
                now = time.perf_counter()
                if on_event is not None and now - t_report >= progress_s:
                    t_report = now
                    _emit(on_event, {"event": "progress", "epoch": epoch, "epochs": config.epochs, "step": step,
                                     "steps": spe, "k_live": len(live),
                                     "img_per_s": images * len(live) / max(now - t_epoch, 1e-9)})
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - t_epoch
            check_faults()  # (a member failing here gets this epoch's time added by fail())
            epoch_started.clear()
            for s in live:
                s.train_s += elapsed
            for s in live:
                s.epochs_done = epoch
            if step == 0:
                raise NpsError("the training loader yielded no batches")
            event: Event = {"event": "epoch", "epoch": epoch, "epochs": config.epochs, "ids": [s.id for s in live],
                            "k_live": len(live), "steps": step, "seconds": elapsed,
                            "img_per_s": images * len(live) / max(elapsed, 1e-9),
                            "train_loss": {s.id: s.loss_sum.item() / step for s in live}}
            if eval_every_epoch and live:
                where = f"evaluation after epoch {epoch}"
                scores = evaluate_many([s.model for s in live], val_loader, device, amp_dtype=amp_dtype,
                                       channels_last=nhwc, runner=runner)
                for s, (top1, top5, loss) in zip(live, scores):
                    s.curve.append(top1)
                    s.final = (top1, top5, loss)
                event["val_top1"] = {s.id: s.curve[-1] for s in live}
            _emit(on_event, event)

        if live:
            where = "final evaluation"
            if not (eval_every_epoch and config.epochs > 0):
                scores = evaluate_many([s.model for s in live], val_loader, device, amp_dtype=amp_dtype,
                                       channels_last=nhwc, runner=runner)
                for s, score in zip(live, scores):
                    s.final = score
            for s in list(live):
                top1, top5, loss = s.final
                model_out = None
                if keep_models:
                    model_out = s.model.to("cpu", memory_format=torch.contiguous_format)
                results[s.position] = Result(s.id, "done", top1=top1, top5=top5, loss=loss, bn_top1=s.bn_top1,
                                             curve=list(s.curve), train_s=s.train_s, epochs_done=config.epochs,
                                             cohort_size=k, model=model_out)
                s.release()
                _emit(on_event, {"event": "done", "id": s.id, "result": results[s.position]})
            live.clear()
    except torch.cuda.OutOfMemoryError:
        oom = True
    finally:
        if workers is not None:
            workers.close()
    if oom:
        # Out of the except block, so the traceback (and the frames holding activations) is already gone.
        # Members whose loss had already gone non-finite stay failed: retrying them would only fail again.
        try:
            check_faults()
        except Exception:  # noqa: BLE001 - best effort on a device that just ran out of memory
            log.debug("could not read the NaN flags after the out-of-memory error", exc_info=True)
        for s in slots:
            s.release()
        slots.clear()
        unfinished = [pos for pos in range(k) if pos not in results]
        raise CohortOutOfMemory(dict(results), unfinished, where)
    return [results[pos] for pos in range(k)]


# --------------------------------------------------------------------------------------------------------------------
# Many cohorts.


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


def run_cohorts(
    models: Sequence[ModelSource],
    train_loader: Iterable,
    val_loader: Iterable,
    config: RetrainSpec,
    device: torch.device | str = "cpu",
    *,
    k: int | None = None,
    max_k: int | None = None,
    ids: Sequence[Any] | None = None,
    seeds: Sequence[int] | None = None,
    input_shape: Sequence[int] | None = None,
    on_event: EventCallback | None = None,
    **cohort_kwargs: Any,
) -> list[Result]:
    """Retrain any number of subnetworks in cohorts of ``k``, halving a cohort on CUDA out-of-memory.

    Parameters
    ----------
    models : sequence of nn.Module or zero-argument callables returning one
        Never modified: each cohort trains fresh copies (modules are deep-copied, callables called), so a cohort
        that runs out of memory restarts its unfinished subnetworks from their original weights.
    seeds : sequence of int, optional
        One per model, for ``scratch`` re-initialisation (see :func:`train_cohort`).
    k : int, optional
        Cohort size; by default :func:`choose_cohort_size` (free GPU memory; 8 on the CPU), capped by ``max_k``.
    input_shape : (N, C, H, W), optional
        Training batch shape for the automatic ``k``; read from the first training batch if not given.
    on_event : callable, optional
        Receives the events of :func:`train_cohort` plus ``{"event": "cohort", "ids", "k"}`` before each cohort
        and ``{"event": "oom", "ids", "k", "retry_k"}`` when a cohort is halved.
    **cohort_kwargs
        Passed to :func:`train_cohort` (``eval_every_epoch``, ``bn_images``, ``amp``, ``compile``, ...).

    Returns
    -------
    list of Result, in the order of ``models``. A subnetwork that runs out of memory even alone is ``failed``.
    """
    device = torch.device(device)
    config.check()
    n = len(models)
    ids = _ids_for(models, ids)
    if seeds is not None and len(seeds) != n:
        raise ValueError(f"got {n} models but {len(seeds)} seeds")
    if n == 0:
        return []
    if k is None:
        if device.type == "cuda":
            shape = tuple(input_shape) if input_shape is not None else _first_input_shape(train_loader)
            sample = [m for m in models if isinstance(m, nn.Module)] or [_materialize(models[0])]
            amp_dtype = resolve_amp(cohort_kwargs.get("amp", "auto"), device, sample)
            k = choose_cohort_size(sample, device, shape, max_k=max_k, amp_dtype=amp_dtype)
        else:
            k = choose_cohort_size(list(models), device, (1,), max_k=max_k)
    k = max(1, min(int(k), n if max_k is None else max_k))
    results: list[Result | None] = [None] * n
    todo = list(range(n))
    while todo:
        cohort, todo = todo[:k], todo[k:]
        _emit(on_event, {"event": "cohort", "ids": [ids[i] for i in cohort], "k": len(cohort)})
        trained = [_materialize(models[i]) for i in cohort]
        oom = None
        try:
            out = train_cohort(trained, train_loader, val_loader, config, device, ids=[ids[i] for i in cohort],
                               seeds=None if seeds is None else [seeds[i] for i in cohort],
                               on_event=on_event, **cohort_kwargs)
        except CohortOutOfMemory as exc:
            oom = (exc.finished, exc.unfinished, str(exc))
        if oom is not None:
            # Outside the except block: the exception, its traceback and the frames holding device tensors are gone.
            finished, unfinished, message = oom
            del trained
            _free_device_memory(device)
            for pos, result in finished.items():
                results[cohort[pos]] = result
            rest = [cohort[pos] for pos in unfinished]
            if len(cohort) == 1:
                error = f"{message}: does not fit even alone"
                for i in rest:
                    results[i] = Result(ids[i], "failed", error=error, cohort_size=1)
                    _emit(on_event, {"event": "failed", "id": ids[i], "error": error, "result": results[i]})
                continue
            k = max(1, len(cohort) // 2)
            log.warning("%s; retrying %d subnetworks in cohorts of %d", message, len(rest), k)
            _emit(on_event, {"event": "oom", "ids": [ids[i] for i in rest], "k": len(cohort), "retry_k": k})
            todo = rest + todo
            continue
        for i, result in zip(cohort, out):
            results[i] = result
        del trained, out
        _free_device_memory(device)
    return results  # type: ignore[return-value]
