"""The results file: one HDF5 file per experiment, one writer, any number of SWMR readers.

Layout (docs/results-format.md says what each part holds)::

    /                 attrs: format_version, nps_version, config, base_top1, base_top5, base_flops, base_params,
                      dataset_fingerprint, created
    /layers           the layer table (written by ``layer_table.to_hdf5(group)``)
    /spaces/<name>/   one row per subnetwork; every dataset chunked and resizable along axis 0
    /base/curve, /references/<model>/curve   learning curves of the networks nps trained (format 3)

Rules the writer follows, and why:

Errors: :class:`~nps.pipeline.errors.NpsError` for what a user can fix (a missing file, a file being written by
another process); ``ValueError``/``IndexError`` for a caller's broken promise (rows of the wrong shape, a row out
of range): those are bugs and show their traceback.

- **Exactly one writer.** :class:`ResultsStore` holds an exclusive ``flock`` on a side file ``<path>.lock`` for its
  whole life. The operating system drops that lock when the process dies (even by ``kill -9``), so a later writer
  can tell "the previous writer crashed" from "someone is writing right now".
- **SWMR from the first update on.** HDF5 forbids creating groups, datasets or attributes while a file is in SWMR
  mode. So :meth:`ResultsStore.create` / :meth:`ResultsStore.open` leave the file in normal write mode, where
  :meth:`ResultsStore.add_space` and :meth:`ResultsStore.set_attrs` simply create what they need; the first row
  update (or :meth:`ResultsStore.flush`) switches SWMR on for good. Creating every space before training is the
  normal order. A space added *after* that (or attributes set) makes the writer close the file, reopen it
  normally, make the change and switch SWMR back on: a short window in which new readers cannot open the file
  (:func:`open_readonly` retries) and open readers may fail a read (call :meth:`ResultsReader.refresh`, which
  reopens, and read again).
- **Readers take no file lock.** SWMR reading needs none, and HDF5's shared lock would stop the writer from
  reopening the file for such a change. HDF5's own "open for write" mark in the superblock still keeps readers out
  while the writer is not in SWMR mode.
- **Flush after every update, status last.** A finished row is written as: values, flush, ``status = 2``, flush.
  A process killed at any point leaves either a complete row marked done or a row not marked done. Readers must
  read ``status`` *before* the value columns (:meth:`ResultsReader.read` does): a row done in that snapshot has
  its values on disk already.
- **``error`` is fixed-length bytes** (``S256``, UTF-8, truncated to 256 bytes), not a variable-length string:
  HDF5's variable-length data lives in the global heap, which SWMR does not support (readers of a file being
  written fail on it; h5py issue #1273). :meth:`ResultsReader.errors` decodes it to ``str``.
- **Opening** goes through :mod:`nps.pipeline.results.h5file`: a file shorter than its header says, not HDF5 at all, or
  without ``/layers`` and ``/spaces`` is refused in one line before HDF5 reads it (a truncated file would otherwise
  hang an SWMR reader), and readers' metadata retries are bounded.
- **Its format.** ``format_version`` (:mod:`nps.pipeline.results.format`) says which layout the file has: a file of
  a newer format than this nps's is refused before anything is read or written; an older one is read as it is, and
  the first write (the first flush) records the current format on it where that format allows
  (:func:`~nps.pipeline.results.format.format_after_write`).
- **Crash recovery.** HDF5 marks a file "open for (SWMR) write" in its superblock while a writer has it; after a
  crash the mark stays and HDF5 refuses a normal open ("may use h5clear"). When :meth:`ResultsStore.open` holds the
  writer lock, no writer can be alive, so it clears the mark itself (what ``h5clear -s`` does: zero the
  consistency flags and rewrite the superblock checksum). SWMR readers can open a crashed file without that.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import h5py
import numpy as np

from nps.pipeline import __version__ as NPS_VERSION
from nps.pipeline.errors import NpsError
from nps.pipeline.results import h5file
from nps.pipeline.results.format import ATTR as FORMAT_ATTR
from nps.pipeline.results.format import FORMAT_VERSION, check_format, format_after_write
from nps.pipeline.results.h5file import clear_consistency_flags
from nps.pipeline.results.reader import (  # noqa: F401 - the status codes and open_readonly, for the writer's callers
    DONE,
    BASE,
    CURVE,
    ERROR_BYTES,
    FAILED,
    PENDING,
    RECIPE_FIELDS,
    REFERENCES,
    RESULT_FIELDS,
    ROOT_ATTRS,
    RUNNING,
    STATUS_NAMES,
    WEIGHT_LAYERS,
    LATENCY_MODEL,
    ResultsReader,
    _encode_error,
    _ResultsFile,
    open_readonly,
)
from nps.pipeline.row_status import Result

log = logging.getLogger(__name__)

_ROW_CHUNK = 256  # rows per chunk: one update rewrites one small chunk per dataset


# --------------------------------------------------------------------------------------------------------------------
# Writing.


def _selection(idx: np.ndarray):
    """Sorted unique row indices as h5py selects them fastest: a slice when they are contiguous (a cohort's rows
    usually are), else the index array."""
    if idx.size and int(idx[-1]) - int(idx[0]) + 1 == idx.size:
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


def _check_rows(rows: Mapping[str, Any], groups: int | None) -> tuple[dict[str, np.ndarray], int]:
    missing = [k for k in RECIPE_FIELDS if k not in rows]
    if missing:
        raise ValueError(f"rows lack {', '.join(missing)} (need {', '.join(RECIPE_FIELDS)})")
    extra = [k for k in rows if k not in RECIPE_FIELDS]
    if extra:
        raise ValueError(f"rows have unknown fields {', '.join(extra)}")
    arrays = {}
    n = None
    for name, (dtype, per_group) in RECIPE_FIELDS.items():
        a = np.asarray(rows[name])
        if per_group:
            if a.ndim != 2:
                raise ValueError(f"rows[{name!r}] must be n × groups, got shape {a.shape}")
            if groups is not None and a.shape[1] != groups:
                raise ValueError(f"rows[{name!r}] has {a.shape[1]} groups, the space has {groups}")
            if a.shape[1] < 1:
                raise ValueError(f"rows[{name!r}] has no group columns")
            groups = a.shape[1]
        elif a.ndim != 1:
            raise ValueError(f"rows[{name!r}] must be one value per row, got shape {a.shape}")
        if n is not None and a.shape[0] != n:
            raise ValueError(f"rows[{name!r}] has {a.shape[0]} rows, {next(iter(arrays))!r} has {n}")
        n = a.shape[0]
        arrays[name] = a.astype(dtype)
    return arrays, int(n)


class ResultsStore(_ResultsFile):
    """The one writer of a results file. Make one with :meth:`create` or :meth:`open`.

    Every update is flushed before the method returns; see the module docstring for the SWMR rules.
    """

    def __init__(self, path: str, lock_fd: int):
        # Use create() / open(); this only wires up an already locked path.
        self.path = path
        self._lock_fd = lock_fd
        self._file = None  # type: ignore[assignment]
        self._swmr = False
        self.format = FORMAT_VERSION  # the file's format (open() reads it); the first flush records the current one
        # Open dataset handles and row counts per space: h5py's lookups cost a fraction of a millisecond each, which a
        # driver recording hundreds of results a second pays many times per result (tools/bench_dispatch.py).
        self._handles: dict[tuple[str, str], h5py.Dataset] = {}
        self._sizes: dict[str, int] = {}

    # -- lifetime ------------------------------------------------------------------------------------------------

    @staticmethod
    def _lock(path: str) -> int:
        return h5file.acquire_writer_lock(path)

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        layer_table: Any,
        config_text: str,
        attrs: Mapping[str, Any] | None = None,
        *,
        overwrite: bool = False,
        weight_table: Any = None,
        latency_model: Any = None,
    ) -> "ResultsStore":
        """Create a results file: root attrs, ``/layers`` (via ``layer_table.to_hdf5(group)``), ``/weight_layers``
        (the weight table, when a space prunes weights), ``/latency_model`` (the latency model of c_latency
        regimes, when given), empty ``/spaces``.

        ``attrs`` gives ``base_top1``, ``base_top5``, ``base_flops``, ``base_params``, ``dataset_fingerprint``
        (missing ones are stored as NaN / empty) and any extra root attributes.
        """
        path = os.fspath(path)
        if os.path.exists(path) and not overwrite:
            raise NpsError(f"{path} exists; open it to resume, or pass overwrite=True")
        store = cls(path, cls._lock(path))
        try:
            f = h5py.File(path, "w", libver="latest")
            store._file = f
            attrs = dict(attrs or {})
            f.attrs[FORMAT_ATTR] = FORMAT_VERSION
            f.attrs["nps_version"] = NPS_VERSION
            f.attrs["config"] = str(config_text)
            f.attrs["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            for key in ROOT_ATTRS:
                value = attrs.pop(key, "" if key == "dataset_fingerprint" else math.nan)
                f.attrs[key] = value
            for key, value in attrs.items():
                f.attrs[key] = value
            layers = f.create_group("layers")
            if layer_table is not None:
                layer_table.to_hdf5(layers)
            if weight_table is not None:
                weight_table.to_hdf5(f.create_group(WEIGHT_LAYERS))
            if latency_model is not None:  # the model of c_latency regimes (its form is in /layers)
                latency_model.write(f.create_group(LATENCY_MODEL))
            f.create_group("spaces")
            f.flush()
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r+"):
        """Open an existing results file: ``"r+"`` as its one writer (recovering from a crashed writer),
        ``"r"`` read-only (same as :func:`open_readonly`)."""
        path = os.fspath(path)
        if mode == "r":
            return open_readonly(path)
        if mode != "r+":
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        if not os.path.exists(path):
            raise NpsError(f"{path}: no such results file; create it first")
        store = cls(path, cls._lock(path))
        try:
            h5file.check_file(path)  # complete, and HDF5 at all: never an OSError from deep inside h5py
            clear_consistency_flags(path)  # we hold the lock: any writer mark is a dead writer's
            try:
                store._file = h5py.File(path, "r+", libver="latest")
            except OSError as exc:
                raise NpsError(f"{path}: cannot open the results file ({str(exc).splitlines()[0]}); the file is "
                               "damaged: start again with another --out") from None
            # the format first: a newer format is refused as newer (and unchanged), not as "not an nps file"
            try:
                store.format = check_format(store._file.attrs, "write", path)
            except (OSError, RuntimeError, KeyError) as exc:  # h5py's KeyError: a damaged root object
                raise NpsError(f"{path}: cannot read the results file ({str(exc).splitlines()[0]}); the file is "
                               "damaged: start again with another --out") from None
            missing = [name for name in ("layers", "spaces") if name not in store._file]
            if missing:
                raise NpsError(f"{path} is an HDF5 file but not an nps results file (no /{missing[0]}); give "
                               "another --out")
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        try:
            super().close()
        finally:
            if getattr(self, "_lock_fd", None) is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    @property
    def swmr(self) -> bool:
        """Whether the file is in SWMR mode (readers can open it) — true from the first update on."""
        return self._swmr

    def flush(self) -> None:
        """Write everything to the file and make it readable by SWMR readers (the first flush of a file of an older
        format records the format it has from now on)."""
        if not self._swmr:
            self._record_format()
            self._file.swmr_mode = True
            self._swmr = True
        self._file.flush()

    def _record_format(self) -> None:
        """An older file this nps writes to becomes the current format where the formats between allow it
        (attributes can be written only outside SWMR mode, hence at the first flush)."""
        after = format_after_write(self.format)
        if after != self.format:
            self._file.attrs[FORMAT_ATTR] = after
            log.info("%s: results format %d, now %d (written by nps %s)", self.path, self.format, after, NPS_VERSION)
            self.format = after

    def _ds(self, space: str, field: str) -> h5py.Dataset:
        """A space's dataset, its handle kept open (dropped whenever the file is reopened)."""
        ds = self._handles.get((space, field))
        if ds is None:
            ds = self._handles[(space, field)] = self._space(space)[field]
        return ds

    def size(self, space: str) -> int:
        n = self._sizes.get(space)
        if n is None:
            n = self._sizes[space] = super().size(space)
        return n

    @contextlib.contextmanager
    def _restructure(self):
        """Objects can be created only outside SWMR mode: leave it (close, reopen) and come back after."""
        self._handles.clear()
        self._sizes.clear()
        was_swmr = self._swmr
        if was_swmr:
            self._file.close()
            self._file = h5py.File(self.path, "r+", libver="latest")
            self._swmr = False
        try:
            yield self._file
        finally:
            if was_swmr:
                self.flush()
            else:
                self._record_format()
                self._file.flush()

    def editing(self):
        """Context manager yielding the ``h5py.File`` for creating groups and datasets of one's own (e.g.
        ``/latency``): HDF5 creates objects only outside SWMR mode, which this leaves and re-enters."""
        return self._restructure()

    def set_attrs(self, **attrs: Any) -> None:
        """Set root attributes (e.g. ``base_top1`` once the base network is evaluated)."""
        with self._restructure() as f:
            for key, value in attrs.items():
                f.attrs[key] = value

    def set_reference(self, key: str, /, curve: tuple[Mapping, Mapping] | None = None, **attrs: Any) -> None:
        """Record a reference training's metrics as ``/references/<key>`` attrs (replacing earlier ones), and with
        ``curve`` (series, attrs: see :meth:`set_curve`) its learning curve in the same change."""
        with self._restructure() as f:
            group = f.require_group(REFERENCES).require_group(key.replace("/", "|"))
            if curve is not None:
                self._write_curve(group, *curve)
            for attr, value in attrs.items():
                group.attrs[attr] = value

    def set_curve(self, series: Mapping[str, Sequence[float]], attrs: Mapping[str, Any]) -> None:
        """Record the base network's learning curve (format 3) as ``/base/curve``: ``series`` (name → one value per
        epoch: ``train_loss``, ``val_top1``, ``holdout_top1``, ``lr``) as f4 datasets and ``attrs`` (where and why it
        stopped) on the group; an earlier curve is replaced. A reference's goes with its metrics
        (:meth:`set_reference`)."""
        with self._restructure() as f:
            self._write_curve(f.require_group(BASE), series, attrs)

    @staticmethod
    def _write_curve(parent, series: Mapping[str, Sequence[float]], attrs: Mapping[str, Any]) -> None:
        if CURVE in parent:
            del parent[CURVE]
        group = parent.create_group(CURVE)
        for name, values in series.items():
            group.create_dataset(name, data=np.asarray(values, dtype="f4"))
        for key, value in attrs.items():
            group.attrs[key] = value

    # -- rows ----------------------------------------------------------------------------------------------------

    def add_space(
        self, name: str, rows: Mapping[str, Any], epochs: int, attrs: Mapping[str, Any] | None = None
    ) -> None:
        """Create ``/spaces/<name>`` holding ``rows`` (status 0 = pending, results NaN).

        ``rows`` maps each of recipe (n × N), keep (n × N), flops, params, c_flops, c_params, mcb, std, seed to an
        array; ``epochs`` sets the width of ``curve``; ``attrs`` (the space's constraints) go on the group.
        """
        if "/" in name or not name:
            raise ValueError(f"space name {name!r} must be non-empty and contain no '/'")
        if name in self.spaces():
            raise ValueError(f"{self.path} already has a space {name!r}; use append_rows")
        if epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {epochs}")
        arrays, n = _check_rows(rows, None)
        groups = arrays["recipe"].shape[1]
        width = max(int(epochs), 1)
        with self._restructure() as f:
            g = f["spaces"].create_group(name)
            g.attrs["epochs"] = int(epochs)
            g.attrs["groups"] = int(groups)
            for key, value in (attrs or {}).items():
                g.attrs[key] = value
            for field, (dtype, per_group) in RECIPE_FIELDS.items():
                cols = (groups,) if per_group else ()
                g.create_dataset(field, data=arrays[field], dtype=dtype, maxshape=(None, *cols),
                                 chunks=(_ROW_CHUNK, *cols))
            # Written out now (not left to HDF5's fill values): every chunk a row's result will land in exists from
            # the start, so recording results never grows the file, and a run that meets a full disk can still
            # put its rows in flight back to pending and close the file.
            for field, dtype in RESULT_FIELDS.items():
                if dtype.startswith("f"):
                    g.create_dataset(field, data=np.full(n, np.nan, dtype=dtype), maxshape=(None,),
                                     chunks=(_ROW_CHUNK,), fillvalue=np.nan)
                else:  # status 0 = pending, error empty
                    g.create_dataset(field, data=np.zeros(n, dtype=dtype), maxshape=(None,), chunks=(_ROW_CHUNK,))
            g.create_dataset("curve", data=np.full((n, width), np.nan, dtype="f4"), maxshape=(None, width),
                             chunks=(max(1, min(_ROW_CHUNK, 65536 // width)), width), fillvalue=np.nan)

    def append_rows(self, space: str, rows: Mapping[str, Any]) -> np.ndarray:
        """Add pending rows to an existing space (allowed in SWMR mode); returns their indices."""
        g = self._space(space)
        arrays, n = _check_rows(rows, int(g.attrs["groups"]))
        start = self.size(space)
        stop = start + n
        self._sizes.pop(space, None)
        for field in list(RECIPE_FIELDS) + list(RESULT_FIELDS) + ["curve"]:
            ds = self._ds(space, field)
            ds.resize(stop, axis=0)
            if field in arrays:
                ds[start:stop] = arrays[field]
            elif field == "curve":
                ds[start:stop] = np.nan
            elif field == "error":
                ds[start:stop] = b""
            elif field == "status":
                ds[start:stop] = PENDING
            else:
                ds[start:stop] = np.nan
        self.flush()
        return np.arange(start, stop)

    def _rows(self, space: str, rows: Iterable[int] | int) -> np.ndarray:
        idx = np.unique(np.atleast_1d(np.asarray(rows, dtype=np.int64)))
        n = self.size(space)
        if idx.size and (idx[0] < 0 or idx[-1] >= n):
            raise IndexError(f"space {space!r} has rows 0..{n - 1}; got {idx[0]}..{idx[-1]}")
        return idx

    def _set_status(self, space: str, rows: np.ndarray, code: int, *, flush: bool = True) -> None:
        if rows.size:
            self._ds(space, "status")[_selection(rows)] = np.full(rows.size, code, dtype="u1")
        if flush:
            self.flush()

    def mark_running(self, space: str, rows: Iterable[int] | int, *, flush: bool = True) -> None:
        """Rows handed to a worker. ``flush=False`` leaves the flush to the caller (the driver flushes once after
        handing out all its cohorts): "running" only informs readers, and a run that dies before the flush leaves
        the rows pending, which is what a resume makes of running rows anyway."""
        self._set_status(space, self._rows(space, rows), RUNNING, flush=flush)

    def mark_pending(self, space: str, rows: Iterable[int] | int) -> None:
        """Rows whose training was abandoned (a worker died, a stop request) go back to pending."""
        self._set_status(space, self._rows(space, rows), PENDING)

    def record(self, space: str, rows: Iterable[int], results: Sequence[Result]) -> None:
        """Store the results of several rows of one space: the one way a row's outcome reaches the file.

        ``results[i]`` (a :class:`~nps.pipeline.row_status.Result`, done or failed) is row ``rows[i]``'s. Two
        flushes for all of them (values, then status), so the file holds either a row's whole result or none of it;
        ``acc_drop`` = base_top1 − top1 (percentage points); failed rows keep NaN scores and get their error (stored
        UTF-8, at most 256 bytes)."""
        idx = np.asarray(list(rows), dtype=np.int64)
        results = list(results)
        if idx.size != len(results):
            raise ValueError(f"record: {idx.size} rows of {space!r} but {len(results)} results")
        if idx.size == 0:
            return
        if np.unique(idx).size != idx.size:
            raise ValueError(f"record: rows of {space!r} repeat: {idx.tolist()}")
        order = np.argsort(idx, kind="stable")
        idx, results = idx[order], [results[i] for i in order]
        self._rows(space, idx)  # range check
        sel = _selection(idx)
        done = np.array([r.ok for r in results], dtype=bool)
        base_top1 = float(self._file.attrs.get("base_top1", math.nan))
        scores = {name: np.array([getattr(r, name) for r in results], dtype=np.float64)
                  for name in ("top1", "top5", "loss", "bn_top1", "train_s")}
        for name in ("top1", "top5", "loss"):
            scores[name][~done] = np.nan
        scores["acc_drop"] = base_top1 - scores["top1"]
        for name, values in scores.items():
            self._ds(space, name)[sel] = values.astype("f4")
        curve = self._ds(space, "curve")
        lines = np.full((idx.size, curve.shape[1]), np.nan, dtype="f4")
        for i, r in enumerate(results):
            if r.ok and r.curve is not None:
                values = np.asarray(list(r.curve), dtype="f4")[: curve.shape[1]]
                lines[i, : values.size] = values
        curve[sel] = lines
        self._ds(space, "error")[sel] = np.array([b"" if r.ok else _encode_error(r.error) for r in results],
                                                 dtype=f"S{ERROR_BYTES}")
        self.flush()  # values reach the file before the status says they are there
        self._ds(space, "status")[sel] = np.where(done, DONE, FAILED).astype("u1")
        self.flush()

    def reset_running(self, space: str) -> np.ndarray:
        """On resume: rows left running by a dead writer go back to pending; returns all pending rows."""
        status = self.status(space)
        self._set_status(space, np.flatnonzero(status == RUNNING), PENDING)
        return self.pending_rows(space)

    def reset_failed(self, space: str) -> np.ndarray:
        """Put failed rows back to pending (to retry them); returns all pending rows."""
        rows = np.flatnonzero(self.status(space) == FAILED)
        if rows.size:
            self._space(space)["error"][rows] = np.full(rows.size, b"", dtype=f"S{ERROR_BYTES}")
        self._set_status(space, rows, PENDING)
        return self.pending_rows(space)
