"""Measuring latency: the base network and the subnetworks of a results file timed in one session
(``nps latency``, ``[output] latency = true``); what a measurement is, and how it is stored and read, is
:mod:`nps.pipeline.results.latency`.
"""
from __future__ import annotations

import datetime
import math
import os
import platform
import time
from collections.abc import Callable, Iterable
from typing import Any
from dataclasses import dataclass

import numpy as np

from nps.pipeline import __version__ as NPS_VERSION
from nps.pipeline.deploy.allocator import steady_heap
from nps.pipeline.deploy import isolation as process_isolation
from nps.pipeline.errors import NpsError
from nps.pipeline.results.latency import BASE, NOISE_LIMIT, PairedTiming, Timing, read_latency

DEFAULT_BATCHES = (1, 64)
DEFAULT_WARMUP = 5
DEFAULT_RUNS = 20
DEFAULT_MIN_RUN_S = 0.02
RETRY_ABOVE = 0.05  # a timing whose IQR / median exceeds this is taken again (half the warning limit, NOISE_LIMIT)
DEFAULT_RETRIES = 2
# Every network is timed in this many passes over all of them, each pass after the first in its own shuffled order,
# and keeps its least median: other work on the machine, and a virtual machine's slower spells, only ever add time,
# and shuffling spreads a slow spell over different networks in each pass instead of onto the networks timed during
# it. On this 2-core VM, in one pass with nothing else running, ten subnetworks of one regime (predicted within 1 %)
# measured 16.7 ms six in a row and 19.5-21.4 ms the next four, every timing's IQR/median under 5 %; two sessions'
# timings of the same rows did not correlate. The latency model's timings (``nps latency-model``) keep the least of
# three passes too.
DEFAULT_PASSES = 3
# One intra-op thread on the CPU, as the run steps each cohort member: small pruned convolutions scale poorly over
# cores, and on cores shared with other processes OpenMP's barriers wait for descheduled threads (on this 2-core
# machine, under load, the demo's base network took 361 ms per image with 2 threads against 1.4 ms with 1).
DEFAULT_CPU_THREADS = 1


def device_name(device) -> str:
    """What the device is: the GPU's name, or the CPU's model name."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical cores)"


def library_versions(device) -> dict:
    import torch
    import torchvision

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "torchvision": torchvision.__version__, "numpy": np.__version__, "nps": NPS_VERSION}
    if torch.device(device).type == "cuda":
        versions.update(cuda=torch.version.cuda, cudnn=str(torch.backends.cudnn.version()))
    else:
        versions["mkldnn"] = bool(torch.backends.mkldnn.is_available())
    return versions


def _synchronizer(device) -> Callable[[], None]:
    """What waits for ``device``'s queued work before the clock is read (nothing on the CPU)."""
    import torch

    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


def _ready(model, x, sync, warmup: int, min_run_s: float) -> int:
    """``warmup`` forwards (at least one), then how many back-to-back forwards make a run of ``min_run_s``."""
    for _ in range(max(1, warmup)):
        model(x)
    sync()
    t0 = time.perf_counter()
    model(x)
    sync()
    return max(1, math.ceil(min_run_s / max(time.perf_counter() - t0, 1e-7)))


def _run(model, x, sync, inner: int) -> float:
    """Seconds per forward over one run of ``inner`` back-to-back forwards."""
    t0 = time.perf_counter()
    for _ in range(inner):
        model(x)
    sync()
    return (time.perf_counter() - t0) / inner


def _quartiles(samples) -> tuple[float, float, float]:
    q25, median, q75 = np.percentile(samples, [25, 50, 75])
    return float(median), float(q25), float(q75)


def time_forward(model, x, *, device, amp_dtype=None, warmup: int = DEFAULT_WARMUP, runs: int = DEFAULT_RUNS,
                 min_run_s: float = DEFAULT_MIN_RUN_S) -> Timing:
    """Time ``model(x)`` (eval mode, no_grad, autocast ``amp_dtype``): see the module docstring. The heap is made
    steady first (:func:`~nps.pipeline.deploy.allocator.steady_heap`): no run pays page faults for memory an
    earlier forward gave back."""
    import torch

    from nps.pipeline.training.schedule import autocast_context

    steady_heap()
    sync = _synchronizer(device)
    model.eval()
    with torch.no_grad(), autocast_context(torch.device(device), amp_dtype):
        inner = _ready(model, x, sync, warmup, min_run_s)
        samples = np.array([_run(model, x, sync, inner) for _ in range(max(1, runs))])
    return Timing(*_quartiles(samples), int(samples.size), int(inner))


def time_pair(base, model, x, *, device, amp_dtype=None, warmup: int = DEFAULT_WARMUP, runs: int = DEFAULT_RUNS,
              min_run_s: float = DEFAULT_MIN_RUN_S) -> PairedTiming:
    """Time ``model(x)`` interleaved with ``base(x)``: ``runs`` runs of each, alternating (base then model, then
    model then base, ...), each of the model's runs divided by the base's run beside it. A slower spell of the machine
    (a virtual machine's, other work's) lengthens both runs of a pair alike, so their ratio keeps the network's
    latency relative to the base where the two medians, or timings taken apart, do not. The heap is made steady
    first, as for :func:`time_forward`."""
    import torch

    from nps.pipeline.training.schedule import autocast_context

    steady_heap()
    sync = _synchronizer(device)
    base.eval()
    model.eval()
    n = max(1, runs)
    a, b = np.empty(n), np.empty(n)
    with torch.no_grad(), autocast_context(torch.device(device), amp_dtype):
        inner_a = _ready(base, x, sync, warmup, min_run_s)
        inner_b = _ready(model, x, sync, warmup, min_run_s)
        for i in range(n):
            if i % 2 == 0:
                a[i] = _run(base, x, sync, inner_a)
                b[i] = _run(model, x, sync, inner_b)
            else:
                b[i] = _run(model, x, sync, inner_b)
                a[i] = _run(base, x, sync, inner_a)
    return PairedTiming(Timing(*_quartiles(b), n, int(inner_b)), Timing(*_quartiles(a), n, int(inner_a)),
                        *_quartiles(b / a))


def _on_device(model, table, batch: int, device, channels_last: bool):
    """``model`` on ``device`` in eval mode (channels_last if asked), and a random batch of ``batch`` images of
    ``table``'s input shape to time it on."""
    import torch

    model = model.to(device).eval()
    x = torch.randn(batch, int(table.in_channels), int(table.resolution), int(table.resolution), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return model, x


def time_network(model, table, batch: int, *, device, channels_last: bool, amp_dtype=None, **kwargs) -> Timing:
    """Time ``model`` (moved to ``device``, eval mode, channels_last if asked) on a random batch of ``batch`` images
    of ``table``'s input shape (:func:`time_forward`'s keyword arguments pass through)."""
    model, x = _on_device(model, table, batch, device, channels_last)
    return time_forward(model, x, device=device, amp_dtype=amp_dtype, **kwargs)


def time_network_pair(base, model, table, batch: int, *, device, channels_last: bool, amp_dtype=None,
                      **kwargs) -> PairedTiming:
    """:func:`time_pair` of ``model`` against ``base`` as :func:`time_network` sets them up."""
    base, x = _on_device(base, table, batch, device, channels_last)
    model, _ = _on_device(model, table, batch, device, channels_last)
    return time_pair(base, model, x, device=device, amp_dtype=amp_dtype, **kwargs)


@dataclass
class Target:
    """One network to time: the base (``row == -1``) or a row of a space, with its keep vector."""

    space: str
    row: int
    keep: np.ndarray | None
    weights: str | None = None  # path of kept fine-tuned weights


def _targets(reader, results_path, spaces: Iterable[str] | None, all_rows: bool,
             skip: set) -> tuple[list[Target], list[str], list[str]]:
    """(the rows to time, the filter spaces chosen, the weight spaces chosen: not timed)."""
    from nps.pipeline.network.pruning_kind import kind_of
    from nps.pipeline.results.weights_files import resolve_space, saved_weight_rows, weights_path
    from nps.pipeline.results.reader import DONE

    groups = reader.spaces()
    chosen = [resolve_space(groups, s) for s in spaces] if spaces else groups
    out, timed, untimed = [], [], []
    for space in dict.fromkeys(chosen):
        if not kind_of(space).timed:  # masks on the base's dense layers: the base's latency, nothing to time
            untimed.append(space)
            continue
        timed.append(space)
        cols = reader.read(space, ["status", "keep"])
        kept = set(saved_weight_rows(results_path, space))
        for row in np.flatnonzero(np.ones_like(cols["status"], bool) if all_rows else cols["status"] == DONE):
            if (space, int(row)) in skip:
                continue
            w = str(weights_path(results_path, space, int(row))) if int(row) in kept else None
            out.append(Target(space, int(row), cols["keep"][row].astype(np.int64), w))
    if spaces and not timed:
        named = ", ".join(dict.fromkeys(spaces))
        raise NpsError(f"--space {named}: weight spaces are not timed: their masked weights run at the dense base "
                       "network's speed (dense kernels skip no zero weight); give a filter space")
    return out, timed, untimed


@dataclass(frozen=True)
class TimingOptions:
    """How a session times each network: at ``batches``, ``runs`` timed runs of at least ``min_run_s`` after
    ``warmup`` forwards, on ``threads`` intra-op threads. None: the module's default (:data:`DEFAULT_BATCHES`,
    :data:`DEFAULT_RUNS`, ...; threads: :data:`DEFAULT_CPU_THREADS` on the CPU, 0 for torch's default), read when
    the session starts."""

    batches: tuple[int, ...] | None = None
    warmup: int | None = None
    runs: int | None = None
    min_run_s: float | None = None
    threads: int | None = None
    retry_above: float | None = None  # a timing noisier than this (IQR / median) is taken again ...
    retries: int | None = None        # ... at most this many times, the least noisy kept
    passes: int | None = None         # passes over all networks (the first in file order, the others shuffled)
    paired: bool | None = None        # each row timed interleaved with the base network (time_pair; default True)

    def resolved(self, device_type: str) -> "TimingOptions":
        """Every value set: the defaults filled in (for ``device_type``'s threads)."""
        cpu_threads = DEFAULT_CPU_THREADS if device_type == "cpu" else 0
        return TimingOptions(tuple(self.batches or DEFAULT_BATCHES),
                             DEFAULT_WARMUP if self.warmup is None else int(self.warmup),
                             DEFAULT_RUNS if self.runs is None else int(self.runs),
                             DEFAULT_MIN_RUN_S if self.min_run_s is None else float(self.min_run_s),
                             cpu_threads if self.threads is None else int(self.threads),
                             RETRY_ABOVE if self.retry_above is None else float(self.retry_above),
                             DEFAULT_RETRIES if self.retries is None else int(self.retries),
                             DEFAULT_PASSES if self.passes is None else int(self.passes),
                             True if self.paired is None else bool(self.paired))


def time_in_passes(model_of: Callable[[int], Any], n: int, table, batches, kw: dict, *, passes: int,
                   retry_above: float, retries: int, paired: bool, rng=None, on_step=None) -> dict:
    """``{(t, batch): [(timing, attempts, paired timing or None) per pass]}`` for the networks ``model_of(t)``,
    ``t`` in ``range(n)``, ``t = 0`` the base network: ``passes`` passes over them all (the first in order, each
    further one in an order of ``rng``'s, or in order again without it), each network at every batch timed by
    :func:`time_network` (the base, and every network unpaired) or :func:`time_network_pair` against the base,
    again while noisier than ``retry_above`` (:func:`timed_quietly`). ``kw``: their keyword arguments;
    ``on_step(pass, step, t)`` before each network. Each network's timings run in a child process forked for them
    where :func:`~nps.pipeline.deploy.isolation.isolation` allows (the CPU, one thread): every network starts from
    this process's state, not from what the networks timed before it left behind."""
    base = model_of(0)

    def timed(t: int) -> list:
        model = base if t == 0 else model_of(t)
        out = []
        for batch in batches:
            if paired and t > 0:
                pair, attempts = timed_quietly(lambda: time_network_pair(base, model, table, batch, **kw),
                                               retry_above, retries)
                out.append((pair.row, attempts, pair))
            else:
                timing, attempts = timed_quietly(lambda: time_network(model, table, batch, **kw), retry_above,
                                                 retries)
                out.append((timing, attempts, None))
        return out

    taken: dict[tuple[int, int], list] = {(t, b): [] for t in range(n) for b in batches}
    for p in range(passes):
        order = np.arange(n) if p == 0 or rng is None else rng.permutation(n)
        for step, t in enumerate(order.tolist()):
            if on_step is not None:
                on_step(p, step, t)
            what = "the base network" if t == 0 else f"network {t} of {n - 1}"
            for batch, got in zip(batches, process_isolation.run_isolated(lambda: timed(t), what, kw["device"])):
                taken[t, batch].append(got)
    return taken


def best_of_passes(timings: list) -> tuple:
    """(the least median, attempts in all, the middle paired timing or None) of one network's passes at one batch
    (:func:`time_in_passes`): other work only adds time to a timing, while a ratio has no one-sided error to drop."""
    pairs = [pair for _, _, pair in timings if pair is not None]
    return (min((timing for timing, _, _ in timings), key=lambda tm: tm.median_s), sum(a for _, a, _ in timings),
            middle_pair(pairs) if pairs else None)


def middle_pair(pairs: list[PairedTiming]) -> PairedTiming:
    """Of one network's paired timings (its passes), the one whose ratio is the middle one (the lower of the two
    middle ones for an even count): a ratio has no one-sided error to drop, a slow spell lengthens both of a pair's
    runs."""
    return sorted(pairs, key=lambda pair: pair.ratio)[(len(pairs) - 1) // 2]


def timed_quietly(once: Callable[[], Any], retry_above: float, retries: int):
    """(timing, attempts): ``once()``, taken again while its noise (IQR / median) is above ``retry_above``, at most
    ``retries`` more times, keeping the least noisy: a timing disturbed by other work on the machine says little
    about the network, a quieter one of the same network more."""
    timing, attempts = once(), 1
    while timing.noise > retry_above and attempts <= retries:
        again = once()
        attempts += 1
        if again.noise < timing.noise:
            timing = again
    return timing, attempts


def measure_results(results_path: str | os.PathLike, *, spaces: Iterable[str] | None = None, device: str = "cpu",
                    options: TimingOptions | None = None, all_rows: bool = False, only_missing: bool = False,
                    progress: Callable[[int, int, Target], None] | None = None) -> dict:
    """Time the base network and the rows of a results file in one session; returns the session (not stored: see
    :func:`store_latency`; :func:`noise_warning` words its noisy timings).

    Rows: the finished rows of ``spaces`` (all spaces when None), every row with ``all_rows``; with
    ``only_missing`` the rows this device has no measurement of yet (none: no session, no records).
    Returns ``{"device", "settings", "records", "spaces", "untimed"}``, records as ``{"space", "row", "batch",
    "timing", "weights"}``, ``spaces`` the filter spaces chosen, ``untimed`` the weight spaces chosen (not timed:
    their rows run at the base network's speed; ``spaces`` naming weight spaces only is refused in one NpsError
    line).
    """
    from nps.pipeline.results import h5file
    from nps.pipeline.training.devices import parse_device

    results_path = os.fspath(results_path)
    pid = h5file.writer_pid(results_path)
    if pid is not None:
        raise NpsError(f"{results_path} is being written by a run (pid {pid}); measure latency after it ends, or "
                       "set [output] latency = true to measure at the end of the run")
    dev = parse_device(device)
    table, amp_name, targets, timed, untimed = _read_targets(results_path, dev, spaces, all_rows, only_missing)
    if only_missing and not targets:  # everything timed already: no new session (not even the base network)
        return {"device": dev.type, "settings": {}, "records": [], "spaces": timed, "untimed": untimed}
    settings, records = _time_targets(table, amp_name, dev, targets, (options or TimingOptions()).resolved(dev.type),
                                      progress)
    return {"device": dev.type, "settings": settings, "records": records, "spaces": timed, "untimed": untimed}


def _read_targets(results_path: str, dev, spaces, all_rows: bool, only_missing: bool):
    """(layer table, the run's amp setting, targets, timed spaces, untimed spaces) from the results file."""
    from nps.pipeline.deploy.run_config import config_section, parse_config
    from nps.pipeline.network.table import LayerTable
    from nps.pipeline.results.reader import open_readonly

    with open_readonly(results_path) as reader:
        try:
            table = LayerTable.from_hdf5(reader.layers)
        except Exception as error:
            raise NpsError(f"{results_path}: no usable layer table in /layers ({error}); cannot rebuild the "
                           "architecture") from None
        cfg = parse_config(str(reader.attrs.get("config", "")), results_path)
        skip = set()
        if only_missing:
            done = read_latency(reader).get(dev.type)
            skip = {(s, r) for s, r in zip(done["space"], done["row"])} if done else set()
        targets, timed, untimed = _targets(reader, results_path, spaces, all_rows, skip)
    return table, str(config_section(cfg, "retrain").get("amp", "auto")), targets, timed, untimed


def _time_targets(table, amp_name: str, dev, targets: list[Target], o: TimingOptions, progress):
    """(settings, records): the base network, then every target, timed in this process as ``o`` says: ``o.passes``
    passes over them all (the first in this order, each further pass in its own shuffled order, seeded), each network
    and batch keeping the timing with the least median of its passes (:data:`DEFAULT_PASSES`); with ``o.paired`` each
    target timed interleaved with the base (:func:`time_pair`), keeping the pass whose ratio is the median one
    (a ratio has no one-sided error to drop: a slow spell lengthens both of a pair's runs)."""
    import torch

    from nps.pipeline.network.checkpoints import load_tensors
    from nps.pipeline.network.models import build_model
    from nps.pipeline.network.prune import prune_model
    from nps.pipeline.training.devices import resolve_amp, resolve_channels_last

    saved_threads = torch.get_num_threads()
    if o.threads:
        torch.set_num_threads(o.threads)
    try:
        torch.manual_seed(0)
        base = build_model(table.model, num_classes=int(table.num_classes), in_channels=int(table.in_channels))
        amp_dtype = resolve_amp(amp_name, dev, [base])
        nhwc = resolve_channels_last("auto", dev)
        settings = {"device_name": device_name(dev), "versions": library_versions(dev),
                    "threads": int(torch.get_num_threads()), "channels_last": bool(nhwc),
                    "amp": str(amp_dtype).removeprefix("torch.") if amp_dtype is not None else "off",
                    "batches": list(o.batches), "warmup": int(o.warmup), "runs": int(o.runs),
                    "min_run_s": float(o.min_run_s), "noise_limit": NOISE_LIMIT,
                    "retry_above": float(o.retry_above), "retries": int(o.retries), "passes": int(o.passes),
                    "paired": bool(o.paired), "allocator": steady_heap(), "isolation": process_isolation.isolation(dev),
                    "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        everything = [Target(BASE, -1, None)] + targets

        def model_of(t: int):
            target = everything[t]
            model = base if target.keep is None else prune_model(base, table, target.keep)
            if target.weights:
                model.load_state_dict(load_tensors(target.weights, f"the weights of row {target.row} of "
                                                                   f"{target.space!r}", "measure without them"))
            return model

        passes = max(1, o.passes)
        on_step = None if progress is None else \
            (lambda p, step, t: progress(p * len(everything) + step, passes * len(everything), everything[t]))
        kw = dict(device=dev, channels_last=nhwc, amp_dtype=amp_dtype, warmup=o.warmup, runs=o.runs,
                  min_run_s=o.min_run_s)
        taken = time_in_passes(model_of, len(everything), table, o.batches, kw, passes=passes,
                               retry_above=o.retry_above, retries=o.retries, paired=o.paired,
                               rng=np.random.default_rng(0), on_step=on_step)
        records = []
        for (t, batch), timings in taken.items():
            timing, attempts, pair = best_of_passes(timings)
            records.append({"space": everything[t].space, "row": everything[t].row, "batch": batch,
                            "timing": timing, "paired": pair, "weights": everything[t].weights is not None,
                            "attempts": attempts})
    finally:
        torch.set_num_threads(saved_threads)
    return settings, records
