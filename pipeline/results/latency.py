"""Measured latency of the subnetworks of a results file (``nps latency``, ``[output] latency = true``).

A subnetwork's architecture is fully given by its row's keep vector, so any row can be timed without its weights: a
freshly initialised base network pruned to ``keep`` (:func:`nps.pipeline.network.prune.prune_model`); rows whose
fine-tuned weights are kept beside the file are timed with them (``weights`` says which). Every forward runs in eval
mode under ``no_grad``, in the run's memory format (channels_last on the CPU and on GPUs, as the cohort trains) and
precision (``[retrain] amp`` resolved on the device, as the run evaluated), on random input of the network's
resolution, on the CPU with :data:`DEFAULT_CPU_THREADS` intra-op thread unless told otherwise. Rows of weight-pruning
spaces (masks on the base's dense layers) are not timed: their network is the base network.

A measurement is ``runs`` timed runs after ``warmup`` forwards; a run is ``inner`` back-to-back forwards (``inner``
chosen so that a run lasts at least ``min_run_s``, which keeps the clock's resolution and one-off stalls out of short
forwards) and its time per forward is one sample; the median and the interquartile range (q75 − q25) of the
samples are stored. The base network is measured in the same session, first, so a row's speed-up (base median /
row median, at the same batch) is a ratio of two numbers from one process, one thread count and one machine state.

A measurement's **noise** is its IQR over its median. A quiet core gives a few per cent; cores shared with other
work, or more threads than free cores, give tens of per cent, and then a speed-up says more about the machine than
about the network (on shared cores a batch-1 speed-up measured 0.62-0.91x where a quiet core gives 1.39-1.58x, with
an IQR of 22.4 ms on a 42.8 ms median). :data:`NOISE_LIMIT` is where ``nps latency`` warns.

Stored in the results file, by its one writer (refused while a run holds the file)::

    /latency/<device>     attrs: device_name, versions (JSON: torch, numpy, python, nps, ...), threads,
                          channels_last, amp, batches, warmup, runs, min_run_s, noise_limit, measured, sessions
                          (JSON list: the settings of every session, in order)
        space   S256  space key, "base" for the base network
        row     i8    row index (-1: the base network)
        batch   i4
        median_s, q25_s, q75_s  f8   seconds per forward
        noise   f8    (q75 - q25) / median (noise_limit: where nps latency warns, :data:`NOISE_LIMIT`)
        runs, inner  i4
        weights u1    1 when the row's fine-tuned weights were loaded (timing does not depend on them)
        session i4    index into ``sessions``; a row's speed-up uses its own session's base

Re-measuring appends a session; readers (:func:`read_latency`) take each (space, row, batch)'s latest measurement.
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from nps.pipeline import __version__ as NPS_VERSION
from nps.pipeline.errors import NpsError

log = logging.getLogger(__name__)

GROUP = "latency"
BASE = "base"  # the space name of the base network's measurements (not a space key: no '@')
DEFAULT_BATCHES = (1, 64)
DEFAULT_WARMUP = 5
DEFAULT_RUNS = 20
DEFAULT_MIN_RUN_S = 0.02
# One intra-op thread on the CPU, as the run steps each cohort member: small pruned convolutions scale poorly over
# cores, and on cores shared with other processes OpenMP's barriers wait for descheduled threads (on this 2-core
# machine, under load, the demo's base network took 361 ms per image with 2 threads against 1.4 ms with 1).
DEFAULT_CPU_THREADS = 1
# IQR / median above which a measurement is noisy: one thread on a shared 2-core machine gives 1-6 % (README's table),
# a busy or oversubscribed machine tens of per cent; past 10 % a speed-up's error is as large as the differences
# between subnetworks of one target (1.39-1.58x in README's table).
NOISE_LIMIT = 0.10
_COLUMNS = {"space": "S256", "row": "i8", "batch": "i4", "median_s": "f8", "q25_s": "f8", "q75_s": "f8",
            "runs": "i4", "inner": "i4", "weights": "u1", "session": "i4"}
_DERIVED = {"noise": "f8"}  # stored beside the columns; derived from them for files written before it was stored


@dataclass
class Timing:
    """Seconds per forward: the median and quartiles of ``runs`` timed runs of ``inner`` forwards each."""

    median_s: float
    q25_s: float
    q75_s: float
    runs: int
    inner: int

    @property
    def iqr_s(self) -> float:
        return self.q75_s - self.q25_s

    @property
    def noise(self) -> float:
        """IQR / median: the measurement's spread relative to what it measures (NaN for a zero median)."""
        return self.iqr_s / self.median_s if self.median_s > 0 else math.nan


def noisy_records(records: list[dict], limit: float | None = None) -> list[dict]:
    """The records of a session whose timing's IQR / median exceeds ``limit`` (:data:`NOISE_LIMIT`), noisiest
    first."""
    limit = NOISE_LIMIT if limit is None else limit
    over = [r for r in records if r["timing"].noise > limit]
    return sorted(over, key=lambda r: -r["timing"].noise)


def noise_warning(session: dict, limit: float | None = None) -> str | None:
    """One line for the CLI when some timings of ``session`` are noisy (IQR / median above ``limit``,
    :data:`NOISE_LIMIT`; None when none is): how many, the worst, and what to do (fewer threads where there are
    several, a quiet machine)."""
    limit = NOISE_LIMIT if limit is None else limit
    records = session["records"]
    over = noisy_records(records, limit)
    if not over:
        return None
    worst = over[0]
    what = "the base network" if worst["row"] < 0 else f"{worst['space']} row {worst['row']}"
    threads = int(session["settings"].get("threads", 1))
    fewer = f"fewer threads (--threads 1; this session ran {threads}) and " if threads > 1 else ""
    return (f"{len(over)} of {len(records)} timings {'is' if len(over) == 1 else 'are'} noisy (IQR/median above "
            f"{100 * limit:g} %; worst {100 * worst['timing'].noise:.0f} %, {what} at batch {worst['batch']}): "
            f"speed-ups are unreliable; time again with {fewer}a quiet machine (no other work on its cores)")


def parse_batches(text: str) -> tuple[int, ...]:
    """``"1,64"`` → (1, 64); one NpsError line for anything else."""
    try:
        batches = tuple(int(b) for b in str(text).split(",") if b.strip())
    except ValueError:
        batches = ()
    if not batches or min(batches) < 1:
        raise NpsError(f"--batch {text!r}: give batch sizes as positive integers, e.g. 1,64")
    return tuple(dict.fromkeys(batches))


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


def time_forward(model, x, *, device, amp_dtype=None, warmup: int = DEFAULT_WARMUP, runs: int = DEFAULT_RUNS,
                 min_run_s: float = DEFAULT_MIN_RUN_S) -> Timing:
    """Time ``model(x)`` (eval mode, no_grad, autocast ``amp_dtype``): see the module docstring."""
    import torch

    from nps.pipeline.training.schedule import autocast_context

    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model.eval()
    with torch.no_grad(), autocast_context(device, amp_dtype):
        for _ in range(max(1, warmup)):
            model(x)
        sync()
        t0 = time.perf_counter()
        model(x)
        sync()
        once = max(time.perf_counter() - t0, 1e-7)
        inner = max(1, math.ceil(min_run_s / once))
        samples = np.empty(max(1, runs))
        for i in range(samples.size):
            t0 = time.perf_counter()
            for _ in range(inner):
                model(x)
            sync()
            samples[i] = (time.perf_counter() - t0) / inner
    q25, median, q75 = np.percentile(samples, [25, 50, 75])
    return Timing(float(median), float(q25), float(q75), int(samples.size), int(inner))


def time_network(model, table, batch: int, *, device, channels_last: bool, amp_dtype=None, **kwargs) -> Timing:
    """Time ``model`` (moved to ``device``, eval mode, channels_last if asked) on a random batch of ``batch`` images
    of ``table``'s input shape (:func:`time_forward`'s keyword arguments pass through)."""
    import torch

    model = model.to(device).eval()
    x = torch.randn(batch, int(table.in_channels), int(table.resolution), int(table.resolution), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return time_forward(model, x, device=device, amp_dtype=amp_dtype, **kwargs)


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
    from nps.kernels.spaces import pruning_of
    from nps.pipeline.results.export import resolve_space, saved_weight_rows, weights_path
    from nps.pipeline.results.reader import DONE

    groups = reader.spaces()
    chosen = [resolve_space(groups, s) for s in spaces] if spaces else groups
    out, timed, untimed = [], [], []
    for space in dict.fromkeys(chosen):
        if pruning_of(space) == "weights":  # masks on the base's dense layers: the base's latency, nothing to time
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


def measure_results(results_path: str | os.PathLike, *, spaces: Iterable[str] | None = None, device: str = "cpu",
                    batches: Iterable[int] | None = None, threads: int | None = None, all_rows: bool = False,
                    only_missing: bool = False, warmup: int | None = None, runs: int | None = None,
                    min_run_s: float | None = None,
                    progress: Callable[[int, int, Target], None] | None = None) -> dict:
    """Time the base network and the rows of a results file in one session; returns the session (not stored: see
    :func:`store_latency`; :func:`noise_warning` words its noisy timings).

    Rows: the finished rows of ``spaces`` (all spaces when None), every row with ``all_rows``; with
    ``only_missing`` the rows this device has no measurement of yet (none: no session, no records). ``threads``:
    torch's intra-op threads for the session (None: :data:`DEFAULT_CPU_THREADS` on the CPU; 0: torch's default).
    Returns ``{"device", "settings", "records", "spaces", "untimed"}``, records as ``{"space", "row", "batch",
    "timing", "weights"}``, ``spaces`` the filter spaces chosen, ``untimed`` the weight spaces chosen (not timed:
    their rows run at the base network's speed; ``spaces`` naming weight spaces only is refused in one NpsError
    line).
    ``batches``, ``warmup``, ``runs`` and ``min_run_s`` default to :data:`DEFAULT_BATCHES`, :data:`DEFAULT_WARMUP`,
    :data:`DEFAULT_RUNS` and :data:`DEFAULT_MIN_RUN_S`.
    """
    import torch

    from nps.pipeline.network.checkpoints import load_tensors
    from nps.pipeline.network.layer_table import LayerTable
    from nps.pipeline.network.models import build_model
    from nps.pipeline.network.prune import prune_model
    from nps.pipeline.results import h5file
    from nps.pipeline.results.reader import open_readonly
    from nps.pipeline.results.verify import _config_section, _parse_config
    from nps.pipeline.training.devices import resolve_amp, resolve_channels_last

    results_path = os.fspath(results_path)
    pid = h5file.writer_pid(results_path)
    if pid is not None:
        raise NpsError(f"{results_path} is being written by a run (pid {pid}); measure latency after it ends, or "
                       "set [output] latency = true to measure at the end of the run")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise NpsError(f"--device {device!r}: use cpu or cuda (cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NpsError(f"--device {device}: no CUDA device here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise NpsError(f"--device {device!r}: use cpu or cuda")
    batches = tuple(int(b) for b in (DEFAULT_BATCHES if batches is None else batches))
    warmup = DEFAULT_WARMUP if warmup is None else int(warmup)
    runs = DEFAULT_RUNS if runs is None else int(runs)
    min_run_s = DEFAULT_MIN_RUN_S if min_run_s is None else float(min_run_s)
    with open_readonly(results_path) as reader:
        try:
            table = LayerTable.from_hdf5(reader.layers)
        except Exception as error:
            raise NpsError(f"{results_path}: no usable layer table in /layers ({error}); cannot rebuild the "
                           "architecture") from None
        cfg = _parse_config(str(reader.attrs.get("config", "")), results_path)
        skip = set()
        if only_missing:
            done = read_latency(reader).get(dev.type)
            skip = {(s, r) for s, r in zip(done["space"], done["row"])} if done else set()
        targets, timed, untimed = _targets(reader, results_path, spaces, all_rows, skip)
    if only_missing and not targets:  # everything timed already: no new session (not even the base network)
        return {"device": dev.type, "settings": {}, "records": [], "spaces": timed, "untimed": untimed}
    saved_threads = torch.get_num_threads()
    if threads is None and dev.type == "cpu":
        threads = DEFAULT_CPU_THREADS
    if threads:
        torch.set_num_threads(int(threads))
    try:
        torch.manual_seed(0)
        base = build_model(table.model, num_classes=int(table.num_classes), in_channels=int(table.in_channels))
        amp_name = str(_config_section(cfg, "retrain").get("amp", "auto"))
        amp_dtype = resolve_amp(amp_name, dev, [base])
        nhwc = resolve_channels_last("auto", dev)
        settings = {"device_name": device_name(dev), "versions": library_versions(dev),
                    "threads": int(torch.get_num_threads()), "channels_last": bool(nhwc),
                    "amp": str(amp_dtype).removeprefix("torch.") if amp_dtype is not None else "off",
                    "batches": list(batches), "warmup": int(warmup), "runs": int(runs), "min_run_s": float(min_run_s),
                    "noise_limit": NOISE_LIMIT,
                    "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        records = []
        everything = [Target(BASE, -1, None)] + targets
        for i, target in enumerate(everything):
            if progress is not None:
                progress(i, len(everything), target)
            model = base if target.keep is None else prune_model(base, table, target.keep)
            if target.weights:
                model.load_state_dict(load_tensors(target.weights, f"the weights of row {target.row} of "
                                                                   f"{target.space!r}", "measure without them"))
            for batch in batches:
                timing = time_network(model, table, batch, device=dev, channels_last=nhwc, amp_dtype=amp_dtype,
                                      warmup=warmup, runs=runs, min_run_s=min_run_s)
                records.append({"space": target.space, "row": target.row, "batch": batch, "timing": timing,
                                "weights": target.weights is not None})
    finally:
        torch.set_num_threads(saved_threads)
    return {"device": dev.type, "settings": settings, "records": records, "spaces": timed, "untimed": untimed}


# --------------------------------------------------------------------------------------------------------------------
# The results file.


def store_latency(results_path: str | os.PathLike, session: dict) -> None:
    """Append a session's measurements to ``/latency/<device>`` as the file's one writer (one NpsError line while
    another process, a run, holds the file)."""
    from nps.pipeline.results.store import ResultsStore

    records = session["records"]
    if not records:
        return
    store = ResultsStore.open(os.fspath(results_path))
    try:
        with store.editing() as f:
            root = f.require_group(GROUP)
            g = root.require_group(session["device"])
            sessions = json.loads(g.attrs.get("sessions", "[]"))
            index = len(sessions)
            sessions.append(session["settings"])
            values = {"space": [r["space"].encode() for r in records], "row": [r["row"] for r in records],
                      "batch": [r["batch"] for r in records],
                      "median_s": [r["timing"].median_s for r in records],
                      "q25_s": [r["timing"].q25_s for r in records], "q75_s": [r["timing"].q75_s for r in records],
                      "runs": [r["timing"].runs for r in records], "inner": [r["timing"].inner for r in records],
                      "weights": [int(r["weights"]) for r in records], "session": [index] * len(records),
                      "noise": [r["timing"].noise for r in records]}
            if "noise" not in g and "row" in g:  # a group written before noise was stored: derive its rows' first
                g.create_dataset("noise", data=_noise(g["median_s"][()], g["q25_s"][()], g["q75_s"][()]),
                                 maxshape=(None,), chunks=(256,))
            for name, dtype in {**_COLUMNS, **_DERIVED}.items():
                data = np.asarray(values[name], dtype=dtype)
                if name not in g:
                    g.create_dataset(name, data=data, maxshape=(None,), chunks=(256,))
                else:
                    ds = g[name]
                    start = ds.shape[0]
                    ds.resize(start + data.size, axis=0)
                    ds[start:] = data
            for key, value in session["settings"].items():
                g.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
            g.attrs["sessions"] = json.dumps(sessions)
    finally:
        store.close()


def _noise(median, q25, q75) -> np.ndarray:
    median = np.asarray(median, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(median > 0, (np.asarray(q75) - np.asarray(q25)) / median, np.nan)


def read_latency(reader) -> dict[str, dict]:
    """Per device: the latest measurement of every (space, row, batch) as columns (``space``, ``row``, ``batch``,
    ``median_s``, ``q25_s``, ``q75_s``, ``iqr_s``, ``noise`` (IQR / median), ``runs``, ``weights``, ``session``,
    ``speedup``: the base median of the same session and batch over the row's), plus ``attrs`` (the latest session's
    settings, ``noise_limit``) and ``sessions``.
    A file never measured gives ``{}``."""
    f = reader.file
    if GROUP not in f:
        return {}
    out = {}
    for device, g in f[GROUP].items():
        cols = {name: g[name][()] for name in _COLUMNS if name in g}
        if len(cols) != len(_COLUMNS) or not cols["row"].size:
            continue
        noise = g["noise"][()] if "noise" in g else np.empty(0)
        cols["noise"] = noise if noise.size == cols["row"].size else _noise(cols["median_s"], cols["q25_s"],
                                                                            cols["q75_s"])
        cols["space"] = np.array([s.decode("utf-8", errors="replace") for s in cols["space"]], dtype=object)
        latest: dict[tuple, int] = {}
        for i, key in enumerate(zip(cols["space"], cols["row"].tolist(), cols["batch"].tolist())):
            latest[key] = i  # later rows are later sessions
        pick = np.array(sorted(latest.values()), dtype=np.int64)
        base = {(int(cols["session"][i]), int(cols["batch"][i])): float(cols["median_s"][i])
                for i in range(cols["row"].size) if cols["space"][i] == BASE}
        sel = {name: c[pick] for name, c in cols.items()}
        sel["iqr_s"] = sel["q75_s"] - sel["q25_s"]
        sel["speedup"] = np.array([base.get((int(s), int(b)), math.nan) / m
                                   for s, b, m in zip(sel["session"], sel["batch"], sel["median_s"])])
        attrs = {}
        for key, value in g.attrs.items():
            value = value.decode() if isinstance(value, bytes) else value
            if key in ("versions", "batches", "sessions") and isinstance(value, str):
                value = json.loads(value)
            attrs[key] = value.item() if isinstance(value, np.generic) else value
        attrs.setdefault("noise_limit", NOISE_LIMIT)  # sessions measured before the limit was stored
        sel["attrs"] = attrs
        out[str(device)] = sel
    return out


def latency_columns(measured: dict) -> tuple[list[str], dict[tuple[str, int], dict[str, float]]]:
    """The columns ``nps table`` adds for the rows measured: their names, per device and batch
    ``latency_<device>_b<batch>_ms`` (median), ``latency_iqr_<device>_b<batch>_ms`` and ``speedup_<device>_b<batch>``,
    and ``{(space, row): {name: value}}``."""
    names, out = [], {}
    for device, cols in sorted(measured.items()):
        for b in sorted({int(b) for b in cols["batch"]}):
            names += [f"latency_{device}_b{b}_ms", f"latency_iqr_{device}_b{b}_ms", f"speedup_{device}_b{b}"]
        for space, row, batch, median, iqr, speedup in zip(cols["space"], cols["row"], cols["batch"],
                                                           cols["median_s"], cols["iqr_s"], cols["speedup"]):
            entry = out.setdefault((str(space), int(row)), {})
            entry[f"latency_{device}_b{batch}_ms"] = 1e3 * float(median)
            entry[f"latency_iqr_{device}_b{batch}_ms"] = 1e3 * float(iqr)
            entry[f"speedup_{device}_b{batch}"] = float(speedup)
    return names, out

