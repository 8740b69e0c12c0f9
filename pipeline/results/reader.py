"""Reading a results file: the layout's fields, and a read-only view that is safe while its writer runs.

The file's layout and the rules its one writer follows are in :mod:`nps.pipeline.results.store`. Readers open the
file through :func:`open_readonly` (:mod:`nps.pipeline.results.h5file`: a complete HDF5 file, bounded waits, no
lock) and must read ``status`` *before* the value columns (:meth:`ResultsReader.read` does): a row done in that
snapshot has its values on disk already.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Iterable

import h5py
import numpy as np

from nps.pipeline.errors import NpsError
from nps.pipeline.results import h5file
from nps.pipeline.results.format import check_format
from nps.pipeline.row_status import RowStatus

PENDING, RUNNING, DONE, FAILED = RowStatus  # the codes of the status column
STATUS_NAMES = {status: status.label for status in RowStatus}
ERROR_BYTES = 256

# Row fields given when recipes are sampled: name -> (dtype, has a per-group column axis).
RECIPE_FIELDS: dict[str, tuple[str, bool]] = {
    "recipe": ("f4", True),
    "keep": ("i4", True),
    "flops": ("i8", False),
    "params": ("i8", False),
    "c_flops": ("f4", False),
    "c_params": ("f4", False),
    "mcb": ("f4", False),
    "std": ("f4", False),
    "seed": ("i8", False),
}
# Fields filled in as subnetworks train; float fields start as NaN ("not known yet").
RESULT_FIELDS: dict[str, str] = {
    "status": "u1",
    "top1": "f4",
    "top5": "f4",
    "loss": "f4",
    "acc_drop": "f4",
    "bn_top1": "f4",
    "train_s": "f4",
    "error": f"S{ERROR_BYTES}",
}
WEIGHT_LAYERS = "weight_layers"  # the weight table of weight-pruning spaces (LayerTable with mode "weights")
LATENCY_MODEL = "latency_model"  # the latency model of c_latency regimes (format 4; LatencyModel.write)
REFERENCES = "references"  # /references/<model>: the attrs of a reference network trained beside the population
BASE = "base"  # /base: what the file holds of the base network beyond the root attributes (its curve)
CURVE = "curve"  # /base/curve, /references/<model>/curve: a training's learning curve (format 3)
ROOT_ATTRS = ("base_top1", "base_top5", "base_flops", "base_params", "dataset_fingerprint")


# --------------------------------------------------------------------------------------------------------------------
# Reading (shared by the writer and the SWMR readers).


def _encode_error(message: str) -> bytes:
    raw = str(message).replace("\n", " ").encode("utf-8")
    if len(raw) <= ERROR_BYTES:
        return raw
    return raw[:ERROR_BYTES].decode("utf-8", errors="ignore").encode("utf-8")


def _decode_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _reference_name(attrs, fallback: str) -> str:
    """A reference training's name (``model``, ``model#i``) from its group's attributes: ``name``, or ``model`` in
    files before seeds, else ``fallback``; the key that joins its curve to its metrics."""
    return str(_decode_attr(attrs.get("name", attrs.get("model", fallback))))


class _ResultsFile:
    """What both the writer and the readers can do with an open results file."""

    path: str
    _file: h5py.File
    format: int  # the file's results format (nps.pipeline.results.format)

    @property
    def file(self) -> h5py.File:
        """The underlying :class:`h5py.File` (read it, never write it directly)."""
        return self._file

    @property
    def attrs(self) -> dict[str, Any]:
        return {k: _decode_attr(v) for k, v in self._file.attrs.items()}

    @property
    def layers(self) -> h5py.Group:
        """The ``/layers`` group, for ``LayerTable.from_hdf5``."""
        return self._file["layers"]

    @property
    def weight_layers(self) -> h5py.Group | None:
        """The ``/weight_layers`` group (weight-pruning spaces), or None."""
        return self._file[WEIGHT_LAYERS] if WEIGHT_LAYERS in self._file else None

    def table_group(self, space: str) -> h5py.Group:
        """The table group a space's keep vectors count in: ``/weight_layers`` for a weight space, else
        ``/layers``."""
        from nps.pipeline.network.pruning_kind import kind_of

        group = kind_of(space).table_group  # the kind names its table's group
        if group not in self._file:
            raise NpsError(f"{self.path}: space {space} prunes {kind_of(space).name} but the file has no /{group}")
        return self._file[group]

    def latency_model(self):
        """The latency model the file's c_latency regimes were drawn under (format 4), or None."""
        if LATENCY_MODEL not in self._file:
            return None
        from nps.pipeline.network.latency_model import LatencyModel

        return LatencyModel.read(self._file[LATENCY_MODEL])

    def references(self) -> dict[str, dict[str, Any]]:
        """``{name: attrs}`` of the reference trainings done so far (model, seed, top1, top5, flops, params, train_s,
        ...): ``name`` is the model, or ``model#i`` for its further seeds (files before seeds: the model)."""
        if REFERENCES not in self._file:
            return {}
        refs = ({k: _decode_attr(v) for k, v in g.attrs.items()} for g in self._file[REFERENCES].values())
        return {_reference_name(r, ""): r for r in refs}

    def curves(self) -> list[dict[str, Any]]:
        """The learning curves of the networks nps trained (format 3; older files have none): one dict per network,
        the base first, then the references by name: ``network`` (the model; a reference's training name), ``role``
        (base or reference), the group's attributes (``max_epochs``, ``epochs``, ``plateau_epoch``, ``stopped_by``,
        ``patience``, ``min_delta``, ``cooldown_epochs``, ``holdout_images``, ``train_s``, ``weights_sha256``) and
        one list per series (``train_loss``, ``val_top1``, ``holdout_top1``, ``lr``: a value per epoch trained)."""
        found = []
        if BASE in self._file and CURVE in self._file[BASE]:
            found.append(("base", self.model_info()[0], self._file[BASE][CURVE]))
        if REFERENCES in self._file:
            for group in self._file[REFERENCES].values():
                if CURVE in group:
                    found.append(("reference", _reference_name(group.attrs, group.name), group[CURVE]))
        out = []
        for role, network, group in found:
            curve = {"network": network, "role": role}
            curve.update({k: _decode_attr(v) for k, v in group.attrs.items()})
            curve.update({name: group[name][()].astype(float).tolist() for name in group})
            out.append(curve)
        return out

    def model_info(self) -> tuple[str, int]:
        """(model name, resolution) as ``/layers`` records them."""
        attrs = self._file["layers"].attrs
        return str(_decode_attr(attrs.get("model", "?"))), int(attrs.get("resolution", 0))

    def spaces(self) -> list[str]:
        return list(self._file["spaces"].keys()) if "spaces" in self._file else []

    def _space(self, space: str) -> h5py.Group:
        try:
            return self._file["spaces"][space]
        except KeyError:
            raise NpsError(f"{self.path}: no space {space!r} (spaces: {', '.join(self.spaces()) or 'none'})") from None

    def size(self, space: str) -> int:
        return int(self._space(space)["status"].shape[0])

    def epochs(self, space: str) -> int:
        return int(self._space(space).attrs["epochs"])

    def status(self, space: str) -> np.ndarray:
        return self._space(space)["status"][()]

    def read(self, space: str, fields: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Whole columns of one space as numpy arrays (``error`` as an object array of ``str``)."""
        group = self._space(space)
        names = list(group.keys()) if fields is None else list(fields)
        if "status" in names:  # status first: rows done in this snapshot have their values flushed already
            names.remove("status")
            names.insert(0, "status")
        out: dict[str, np.ndarray] = {}
        for name in names:
            if name not in group:
                raise NpsError(f"{self.path}: space {space!r} has no field {name!r}")
            data = group[name][()]
            if name == "error":
                data = np.array([b.decode("utf-8", errors="replace") for b in data], dtype=object)
            out[name] = data
        return out

    def errors(self, space: str) -> list[str]:
        return list(self.read(space, ["error"])["error"])

    def pending_rows(self, space: str) -> np.ndarray:
        return np.flatnonzero(self.status(space) == PENDING)

    def summary(self) -> dict[str, dict[str, int]]:
        """Per space: total rows and how many are pending / running / done / failed."""
        out = {}
        for space in self.spaces():
            status = self.status(space)
            counts = {"total": int(status.size)}
            for code, name in STATUS_NAMES.items():
                counts[name] = int(np.count_nonzero(status == code))
            out[space] = counts
        return out

    def close(self) -> None:
        if getattr(self, "_file", None) is not None and self._file.id.valid:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _damaged_is_user_error(method):
    """A reader's h5py error as one line naming the file: a damaged file is bad input, not an nps bug."""

    @functools.wraps(method)
    def reading(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except NpsError:
            raise
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise NpsError(f"{self.path}: cannot read it ({first}); the file is damaged, or its writer was "
                           "restructuring it: retry, else restore a complete copy") from exc
    return reading


class ResultsReader(_ResultsFile):
    """A read-only view of a results file, safe while its writer runs (SWMR). Get one from :func:`open_readonly`.

    Its reading methods turn h5py's errors on a damaged file into one NpsError line naming the file."""

    attrs = property(_damaged_is_user_error(_ResultsFile.attrs.fget))
    spaces = _damaged_is_user_error(_ResultsFile.spaces)
    size = _damaged_is_user_error(_ResultsFile.size)
    epochs = _damaged_is_user_error(_ResultsFile.epochs)
    status = _damaged_is_user_error(_ResultsFile.status)
    read = _damaged_is_user_error(_ResultsFile.read)
    summary = _damaged_is_user_error(_ResultsFile.summary)
    model_info = _damaged_is_user_error(_ResultsFile.model_info)
    curves = _damaged_is_user_error(_ResultsFile.curves)
    latency_model = _damaged_is_user_error(_ResultsFile.latency_model)

    def __init__(self, path: str, *, retry_s: float = 5.0):
        self.path = str(path)
        self._retry_s = retry_s
        self.swmr = False
        self._file = self._open()

    def _open(self) -> h5py.File:
        """The one way nps opens a results file to read it (:func:`nps.pipeline.results.h5file.open_readonly`: a complete
        HDF5 file, bounded waits), then a check that it is an nps results file of a format this nps reads
        (:mod:`nps.pipeline.results.format`; ``self.format`` is its format)."""
        f, self.swmr = h5file.open_readonly(self.path, retry_s=self._retry_s,
                                            writer_alive=lambda: h5file.writer_pid(self.path) is not None)
        try:
            # the format first: a newer format is refused as newer, not as "not an nps file"
            self.format = check_format(f.attrs, "read", self.path)
            missing = [name for name in ("layers", "spaces") if name not in f]
        except NpsError:
            f.close()
            raise
        except (OSError, RuntimeError, KeyError) as exc:  # h5py's KeyError: a damaged root object
            f.close()
            raise NpsError(f"{self.path}: cannot read it ({str(exc).splitlines()[0]}); the file is damaged: restore "
                           "a complete copy") from None
        if missing:
            f.close()
            raise NpsError(f"{self.path} is an HDF5 file but not an nps results file (no /{missing[0]}); give a "
                           "results.h5 written by nps run or nps sample")
        return f

    def refresh(self) -> None:
        """See the writer's latest flushed state (reopens: new spaces and resized datasets included)."""
        self.close()
        self._file = self._open()


def open_readonly(path: str | os.PathLike, *, retry_s: float = 5.0) -> ResultsReader:
    """Open a results file read-only; works while a run is writing it (SWMR) and after a run was killed."""
    return ResultsReader(os.fspath(path), retry_s=retry_s)
