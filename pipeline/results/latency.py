"""Measured latency in a results file: how it is stored and read back (torch-free; the measuring itself is
:mod:`nps.pipeline.deploy.latency`, ``nps latency``, ``[output] latency = true``).

A subnetwork's architecture is fully given by its row's keep vector, so any row can be timed without its weights: a
freshly initialised base network pruned to ``keep`` (:func:`nps.pipeline.network.prune.prune_model`); rows whose
fine-tuned weights are kept beside the file are timed with them (``weights`` says which). Every forward runs in eval
mode under ``no_grad``, in the run's memory format (channels_last on the CPU and on GPUs, as the cohort trains) and
precision (``[retrain] amp`` resolved on the device, as the run evaluated), on random input of the network's
resolution, on the CPU with :data:`nps.pipeline.deploy.latency.DEFAULT_CPU_THREADS` intra-op thread unless told otherwise. Rows of weight-pruning
spaces (masks on the base's dense layers) are not timed: their network is the base network.

A measurement is ``runs`` timed runs after ``warmup`` forwards; a run is ``inner`` back-to-back forwards (``inner``
chosen so that a run lasts at least ``min_run_s``, which keeps the clock's resolution and one-off stalls out of short
forwards) and its time per forward is one sample; the median and the interquartile range (q75 − q25) of the
samples are stored. The base network is measured in the same session, first. By default each row is also timed
**paired**: its runs interleaved with runs of the base network (base, row, row, base, ...), each run of the row
divided by the base's run beside it; the median of these ratios is the row's latency relative to the base
(``paired_c``) and its speed-up is its reciprocal. A virtual machine's speed can move by a third within minutes (the
latency study, docs/study-latency.md): timings taken apart, even in one session, carry it into their ratio, the
pairs' ratios cancel it. Unpaired (``--unpaired``), a row's speed-up is the base median over the row median, two
numbers from one process, one thread count and one session.

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
        paired_c, paired_c_q25, paired_c_q75  f8   a paired timing's ratio (row run / base run beside it): median
                      and quartiles; the row's speed-up is 1 / paired_c. NaN: the base network, an unpaired
                      timing (--unpaired), or a file measured before pairing

Re-measuring appends a session; readers (:func:`read_latency`) take each (space, row, batch)'s latest measurement.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass

import numpy as np

from nps.pipeline.errors import NpsError

log = logging.getLogger(__name__)

GROUP = "latency"
BASE = "base"  # the space name of the base network's measurements (not a space key: no '@')
# IQR / median above which a measurement is noisy: one thread on a shared 2-core machine gives 1-6 % (README's table),
# a busy or oversubscribed machine tens of per cent; past 10 % a speed-up's error is as large as the differences
# between subnetworks of one target (1.39-1.58x in README's table).
NOISE_LIMIT = 0.10
_COLUMNS = {"space": "S256", "row": "i8", "batch": "i4", "median_s": "f8", "q25_s": "f8", "q75_s": "f8",
            "runs": "i4", "inner": "i4", "weights": "u1", "session": "i4"}
_DERIVED = {"noise": "f8"}  # stored beside the columns; derived from them for files written before it was stored
# Paired timings (PairedTiming; NaN for the base network, for unpaired timings and in files written before them)
_PAIRED = {"paired_c": "f8", "paired_c_q25": "f8", "paired_c_q75": "f8"}


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


@dataclass
class PairedTiming:
    """A network timed interleaved with the base network (``nps latency``'s default): its own :class:`Timing`, the
    base's over the runs beside it, and the quartiles of the per-pair ratio (network run / base run beside it), its
    latency relative to the base: c_measured, the reciprocal of its speed-up."""

    row: Timing
    base: Timing
    ratio: float
    ratio_q25: float
    ratio_q75: float

    @property
    def noise(self) -> float:
        """The ratio's IQR / median: how well the pairs agree on the relative latency (what is taken again while
        above ``retry_above``; the network's own timing keeps its :attr:`Timing.noise`)."""
        return (self.ratio_q75 - self.ratio_q25) / self.ratio if self.ratio > 0 else math.nan


def speedup_noise(record: dict) -> float:
    """The IQR / median a record's speed-up rests on: its paired ratio's, or unpaired its timing's."""
    pair = record.get("paired")
    return pair.noise if pair is not None else record["timing"].noise


def noisy_records(records: list[dict], limit: float | None = None) -> list[dict]:
    """The records of a session whose speed-up's IQR / median (:func:`speedup_noise`) exceeds ``limit``
    (:data:`NOISE_LIMIT`), noisiest first."""
    limit = NOISE_LIMIT if limit is None else limit
    over = [r for r in records if speedup_noise(r) > limit]
    return sorted(over, key=lambda r: -speedup_noise(r))


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
    paired = " (a paired row's: of its ratio to the base)" if any(r.get("paired") for r in records) else ""
    return (f"{len(over)} of {len(records)} timings {'is' if len(over) == 1 else 'are'} noisy (IQR/median above "
            f"{100 * limit:g} %{paired}; worst {100 * speedup_noise(worst):.0f} %, {what} at batch {worst['batch']}): "
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
            pairs = [r.get("paired") for r in records]
            for name, field in (("paired_c", "ratio"), ("paired_c_q25", "ratio_q25"), ("paired_c_q75", "ratio_q75")):
                values[name] = [math.nan if pair is None else getattr(pair, field) for pair in pairs]
            if "paired_c" not in g and "row" in g:  # a group written before pairing: its rows have none
                for name in _PAIRED:
                    g.create_dataset(name, data=np.full(g["row"].shape[0], np.nan), maxshape=(None,), chunks=(256,))
            if "noise" not in g and "row" in g:  # a group written before noise was stored: derive its rows' first
                g.create_dataset("noise", data=_noise(g["median_s"][()], g["q25_s"][()], g["q75_s"][()]),
                                 maxshape=(None,), chunks=(256,))
            for name, dtype in {**_COLUMNS, **_DERIVED, **_PAIRED}.items():
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
    ``paired_c``, ``paired_c_q25``, ``paired_c_q75`` and ``paired_noise`` (the ratio's IQR / median; all NaN where
    not paired), ``speedup``: 1 / ``paired_c`` for a paired timing, else the base median of the same session and
    batch over the row's, ``speedup_noise``: the IQR / median the speed-up rests on, ``paired_noise`` or else the
    timing's ``noise``), plus ``attrs`` (the latest
    session's settings, ``noise_limit``) and ``sessions``.
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
        for name in _PAIRED:
            paired = g[name][()] if name in g else np.empty(0)
            cols[name] = paired if paired.size == cols["row"].size else np.full(cols["row"].size, np.nan)
        cols["space"] = np.array([s.decode("utf-8", errors="replace") for s in cols["space"]], dtype=object)
        latest: dict[tuple, int] = {}
        for i, key in enumerate(zip(cols["space"], cols["row"].tolist(), cols["batch"].tolist())):
            latest[key] = i  # later rows are later sessions
        pick = np.array(sorted(latest.values()), dtype=np.int64)
        base = {(int(cols["session"][i]), int(cols["batch"][i])): float(cols["median_s"][i])
                for i in range(cols["row"].size) if cols["space"][i] == BASE}
        sel = {name: c[pick] for name, c in cols.items()}
        sel["iqr_s"] = sel["q75_s"] - sel["q25_s"]
        sel["paired_noise"] = _noise(sel["paired_c"], sel["paired_c_q25"], sel["paired_c_q75"])  # NaN unpaired
        # what a speed-up rests on: the pair's ratio, or the timing
        sel["speedup_noise"] = np.where(np.isfinite(sel["paired_noise"]), sel["paired_noise"], sel["noise"])
        sel["speedup"] = np.array([1.0 / c if math.isfinite(c) and c > 0 else base.get((int(s), int(b)), math.nan) / m
                                   for s, b, m, c in zip(sel["session"], sel["batch"], sel["median_s"],
                                                         sel["paired_c"])])
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

