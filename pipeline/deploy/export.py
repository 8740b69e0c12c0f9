"""Trained subnetworks out of a run: the weights kept beside results.h5, a self-contained export, and its check.

Where fine-tuned weights live (the contract with the run driver)::

    <directory of results.h5>/weights/<space>/<row>.pt

``<space>`` is the space's group name in the file (``std-0.05@c_flops=0.25``), ``<row>`` its row index. The file
holds the **state_dict of the physically pruned model** (the keys and shapes of ``prune_model(base, table, keep)``),
on the CPU, contiguous; the run driver writes it with :func:`save_subnetwork_weights` (atomically) when a row
finishes, for at least the best rows of each space. Nothing else is stored there: architecture, keep counts and
scores are in results.h5.

An **export** (:func:`export_subnetwork`, ``nps export``) is one ``torch.save`` file that needs neither results.h5
nor the base checkpoint::

    {"format": "nps-subnetwork-1", "model", "mode", "resolution", "num_classes", "in_channels",
     "channel_multiple", "flops_convention",
     "recipe", "keep", "groups", "channels", "config", "state_dict", "top1", "top5", "acc_drop",
     "base_top1", "c_flops", "c_params", "mcb", "flops", "params", "space", "row", "results",
     "dataset_fingerprint", "dataset_num_classes", "dataset_image_shape", "nps_version", "preprocessing"}

:func:`load_subnetwork` rebuilds it: the registry model, pruned to ``keep`` (weights random at that point, so the
pruning criterion is irrelevant: only the shapes matter), then ``load_state_dict(strict=True)``.

``preprocessing`` (:mod:`nps.pipeline.deploy.preprocessing`) says what the network takes: float32 NCHW images
normalised per channel with the run's dataset's train mean and std on the 0–255 scale, its input size and channel
order. It comes from results.h5 (``dataset_mean``/``dataset_std``, recorded by runs since this version) or else
from the run's converted dataset (config ``[dataset] dir``, or ``data_dir``; its fingerprint checked).
``load_subnetwork(path, with_preprocessing=True)`` returns a module that takes the images as stored (uint8 or
float, 0–255); an export written before the key existed still loads, and :func:`subnetwork_preprocessing` falls
back to the run's dataset for it.

Heavy imports (torch, the model registry) happen inside the functions, so ``import nps.pipeline`` (which exports
:func:`load_subnetwork`) stays cheap.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from nps.pipeline.errors import NpsError
from nps.pipeline.files import atomic_path
from nps.pipeline.results.weights_files import (  # noqa: F401 - where a row's kept weights are, part of this API
    KEEP_WEIGHTS_HINT,
    WEIGHTS_DIR,
    check_row,
    resolve_space,
    saved_weight_rows,
    weights_path,
)

log = logging.getLogger(__name__)

FORMAT = "nps-subnetwork-1"
_META_KEYS = ("model", "mode", "resolution", "num_classes", "in_channels", "channel_multiple", "flops_convention",
              "recipe", "keep", "groups", "channels",
              "config", "top1", "top5", "acc_drop", "base_top1", "c_flops", "c_params", "mcb", "flops", "params",
              "space", "row", "results", "dataset_fingerprint", "dataset_num_classes", "dataset_image_shape",
              "nps_version", "preprocessing")


# --------------------------------------------------------------------------------------------------------------------
# Weights beside results.h5.


def save_subnetwork_weights(results_path: str | os.PathLike, space: str, row: int, model) -> Path:
    """Keep the fine-tuned weights of one row beside results.h5 (atomically: a temporary file, then a rename).

    ``model`` is the physically pruned ``nn.Module`` (or its state_dict; a ``torch.compile`` wrapper is unwrapped);
    tensors are stored on the CPU, contiguous (a ``channels_last`` model is saved in the default layout). Returns
    the path written.
    """
    import torch

    path = weights_path(results_path, space, row)
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: save the module it wraps
    state = model.state_dict() if hasattr(model, "state_dict") else model
    state = {k.removeprefix("_orig_mod."): v.detach().to("cpu").contiguous() if torch.is_tensor(v) else v
             for k, v in state.items()}
    return save_atomic(state, path)


def save_atomic(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`nps.pipeline.files.atomic_path`: never a half-written file at ``path``."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def load_subnetwork_weights(results_path: str | os.PathLike, space: str, row: int) -> dict:
    """The state_dict kept for one row (see :func:`save_subnetwork_weights`); NpsError if there is none."""
    from nps.pipeline.network.checkpoints import load_tensors

    path = weights_path(results_path, space, row)
    if not path.is_file():
        raise NpsError(f"no weights for row {row} of {space!r} at {path}: {KEEP_WEIGHTS_HINT}")
    return load_tensors(path, f"the weights of row {row} of {space!r}",
                        "export another row (--row I)")


# --------------------------------------------------------------------------------------------------------------------
# Export.


def _pick_row(results_path, space: str, status: np.ndarray, top1: np.ndarray) -> tuple[int, str]:
    """The done row with the highest top-1 whose weights are kept, and a note when a better row has none."""
    from nps.pipeline.results.reader import DONE

    done = np.flatnonzero((status == DONE) & np.isfinite(top1))
    if done.size == 0:
        raise NpsError(f"space {space!r} has no finished rows yet; wait for the run, or pick another space")
    order = done[np.lexsort((done, -top1[done]))]  # best top-1 first, lower row first among ties
    kept = set(saved_weight_rows(results_path, space))
    for rank, row in enumerate(order):
        if int(row) in kept:
            note = ""
            if rank:
                note = (f"the {rank} better finished row(s) of {space!r} (best: row {order[0]}, top-1 "
                        f"{top1[order[0]]:.2f} %) have no kept weights; exported row {row} (top-1 {top1[row]:.2f} %)")
            return int(row), note
    raise NpsError(f"no fine-tuned weights kept for any finished row of {space!r} (looked in "
                   f"{weights_path(results_path, space, 0).parent}): {KEEP_WEIGHTS_HINT}")


def export_subnetwork(results_path: str | os.PathLike, space: str, out: str | os.PathLike, *,
                      row: int | None = None, best: bool = False, data_dir: str | os.PathLike | None = None) -> dict:
    """Write one trained subnetwork of a results file as a self-contained checkpoint (module docstring).

    Exactly one of ``row`` and ``best``: ``best`` picks the finished row with the highest top-1 whose weights are
    kept. ``data_dir``: the run's converted dataset, read only when results.h5 does not record its mean and std.
    Returns the export's metadata (everything but the state_dict) plus ``note`` (non-empty when a better row had
    no weights) and ``out``.
    """
    ckpt, note = subnetwork_checkpoint(results_path, space, row=row, best=best, data_dir=data_dir)
    return export_info(ckpt, note, save_atomic(ckpt, out))


def export_info(ckpt: dict, note: str = "", out: str | os.PathLike | None = None) -> dict:
    """An export's metadata (everything but the state_dict), its ``note`` and where it was written (``out``)."""
    info = {k: ckpt[k] for k in _META_KEYS}
    info.update(note=note, out=None if out is None else str(out))
    return info


def subnetwork_checkpoint(results_path: str | os.PathLike, space: str, *, row: int | None = None,
                          best: bool = False, data_dir: str | os.PathLike | None = None) -> tuple[dict, str]:
    """The export of one trained row as a dict (state_dict included, nothing written) and the note of
    :func:`export_subnetwork`."""
    from nps.pipeline.network.layer_table import LayerTable
    from nps.pipeline.results.reader import DONE, STATUS_NAMES, open_readonly

    if (row is None) == (not best):
        raise NpsError("choose the subnetwork with exactly one of --best and --row I")
    with open_readonly(results_path) as reader:
        space = resolve_space(reader.spaces(), space)
        cols = reader.read(space, ["status", "top1", "top5", "acc_drop", "recipe", "keep", "c_flops", "c_params",
                                   "mcb", "flops", "params"])
        attrs = reader.attrs
        try:
            table = LayerTable.from_hdf5(reader.table_group(space))
        except Exception as error:
            raise NpsError(f"{results_path}: no usable layer table for {space} ({error}); cannot rebuild the "
                           "architecture") from None
    n = len(cols["status"])
    note = ""
    if best:
        row, note = _pick_row(results_path, space, cols["status"], cols["top1"].astype(np.float64))
    else:
        row = check_row(row)
        if row >= n:
            raise NpsError(f"--row {row}: space {space!r} has rows 0..{n - 1}")
        if cols["status"][row] != DONE:
            state = STATUS_NAMES.get(int(cols["status"][row]), "?")
            raise NpsError(f"row {row} of {space!r} is {state}: only finished rows have trained weights")
    state_dict = load_subnetwork_weights(results_path, space, row)

    def scalar(name, kind=float):
        return kind(cols[name][row])

    ckpt: dict[str, Any] = {
        "format": FORMAT, "model": table.model, "mode": table.mode, "resolution": int(table.resolution),
        "num_classes": int(table.num_classes), "in_channels": int(table.in_channels),
        "channel_multiple": int(table.channel_multiple), "flops_convention": table.flops_convention,
        "recipe": [float(v) for v in cols["recipe"][row]], "keep": [int(v) for v in cols["keep"][row]],
        "groups": list(table.names), "channels": [int(c) for c in table.channels],
        "config": str(attrs.get("config", "")), "top1": scalar("top1"), "top5": scalar("top5"),
        "acc_drop": scalar("acc_drop"), "base_top1": float(attrs.get("base_top1", math.nan)),
        "c_flops": scalar("c_flops"), "c_params": scalar("c_params"), "mcb": scalar("mcb"),
        "flops": scalar("flops", int), "params": scalar("params", int), "space": space, "row": int(row),
        "results": str(Path(results_path).resolve()),
        "dataset_fingerprint": str(attrs.get("dataset_fingerprint", "")),
        "dataset_num_classes": int(attrs.get("dataset_num_classes", 0) or 0),
        "dataset_image_shape": [int(v) for v in np.atleast_1d(attrs.get("dataset_image_shape", []))],
        "nps_version": str(attrs.get("nps_version", "")),
    }
    model = build_subnetwork(ckpt)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        raise NpsError(f"{weights_path(results_path, space, row)} does not fit row {row} of {space!r} (keep "
                       f"{ckpt['keep']}): {' '.join(first[:2])}") from None
    ckpt["preprocessing"] = _run_preprocessing(ckpt, attrs, data_dir, f"{results_path} does not record its "
                                               "dataset's mean and std (an older run), so they must come from the "
                                               "run's dataset")
    ckpt["state_dict"] = model.state_dict()
    return ckpt, note


def _run_preprocessing(ckpt: dict, attrs, data_dir, unknown: str) -> dict:
    """The export's ``preprocessing``: from results.h5's ``dataset_mean``/``dataset_std`` where the run recorded
    them, else from the run's converted dataset; NpsError ``"<unknown>, and <why the dataset is not usable>"``."""
    from nps.pipeline.deploy.preprocessing import make_preprocessing

    mean, std = attrs.get("dataset_mean"), attrs.get("dataset_std")
    shape = ckpt.get("dataset_image_shape") or None
    if mean is None or std is None:
        try:
            meta = run_dataset_meta(ckpt, data_dir)
        except NpsError as error:
            raise NpsError(f"{unknown}, and {error}") from None
        mean, std, shape = meta["mean"], meta["std"], meta.get("image_shape")
    return make_preprocessing([float(v) for v in np.atleast_1d(mean)], [float(v) for v in np.atleast_1d(std)],
                              shape, resolution=int(ckpt["resolution"]), in_channels=int(ckpt["in_channels"]))


def run_dataset_meta(ckpt: dict, data_dir=None) -> dict:
    """``meta.json`` of the run's converted dataset (``data_dir``, else the config's ``[dataset] dir``), after
    checking it is the dataset the subnetwork was scored on."""
    from nps.datasets.meta import load_meta
    from nps.pipeline.deploy.run_config import check_dataset_of, dataset_dir

    data = dataset_dir(ckpt, data_dir)
    check_dataset_of(ckpt, data, given=data_dir is not None)
    return load_meta(data)


def subnetwork_preprocessing(export: str | os.PathLike | dict, data_dir: str | os.PathLike | None = None, *,
                             where: str | None = None) -> dict:
    """What the exported network takes as input (:mod:`nps.pipeline.deploy.preprocessing`): the export's own
    ``preprocessing``, or for an export written before it existed, the one its run's dataset gives (``data_dir``,
    else the config's ``[dataset] dir``). ``export``: a path or the export's dict (``where`` names it)."""
    ckpt = export if isinstance(export, dict) else read_subnetwork(export)
    if isinstance(ckpt.get("preprocessing"), dict):
        return ckpt["preprocessing"]
    where = where or ("the export" if isinstance(export, dict) else str(export))
    return _run_preprocessing(ckpt, {}, data_dir, f"{where} predates the preprocessing metadata (re-export it "
                                                  "with nps export to add it)")


# --------------------------------------------------------------------------------------------------------------------
# Loading.


def read_subnetwork(path: str | os.PathLike) -> dict:
    """The export as a dict (state_dict included), after checking its format."""
    from nps.pipeline.network.checkpoints import load_tensors

    path = Path(path)
    if not path.is_file():
        raise NpsError(f"{path}: no such file")
    ckpt = load_tensors(path, "export", "give a file written by nps export")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise NpsError(f"{path}: not an nps subnetwork export (format {found!r}, expected {FORMAT!r}); make one "
                       "with nps export")
    missing = [k for k in ("model", "num_classes", "in_channels", "mode", "resolution", "keep", "state_dict")
               if k not in ckpt]
    if missing:
        raise NpsError(f"{path}: the export lacks {', '.join(missing)}; re-export it")
    return ckpt


def build_subnetwork(ckpt: dict):
    """The export's architecture with random weights: the model pruned to ``ckpt["keep"]`` (exports written before
    channel multiples and FLOPs conventions existed have neither: 1 and ``macs``)."""
    from nps.pipeline.network.layer_table import build_layer_table
    from nps.pipeline.network.models import build_model
    from nps.pipeline.network.prune import prune_model

    base = build_model(ckpt["model"], num_classes=int(ckpt["num_classes"]), in_channels=int(ckpt["in_channels"]))
    if ckpt["mode"] == "weights":  # weight pruning: the base's shapes, a mask on every prunable layer
        from nps.pipeline.network.masks import masked_skeleton

        return masked_skeleton(base)
    table = build_layer_table(ckpt["model"], ckpt["mode"], int(ckpt["resolution"]), int(ckpt["num_classes"]),
                              int(ckpt["in_channels"]), flops=str(ckpt.get("flops_convention", "macs")),
                              channel_multiple=int(ckpt.get("channel_multiple", 1)))
    return prune_model(base, table, np.asarray(ckpt["keep"], dtype=np.int64))


def load_subnetwork(path: str | os.PathLike, device: str = "cpu", *, with_preprocessing: bool = False,
                    data_dir: str | os.PathLike | None = None):
    """The exported subnetwork as an ``nn.Module`` in eval mode on ``device`` (no base checkpoint needed).

    The plain module takes what nps's loaders feed it: float32 ``N x C x H x W`` normalised per channel with the
    dataset's mean and std on the 0–255 scale (``read_subnetwork(path)["preprocessing"]``). With
    ``with_preprocessing=True`` it is wrapped in a
    :class:`~nps.pipeline.deploy.preprocessing.PreprocessedSubnetwork` that takes the images themselves (uint8 or
    float 0–255, NCHW) and normalises them exactly as the loaders do; ``data_dir`` gives the run's dataset for an
    export that predates the preprocessing metadata. Example::

        from nps.pipeline import load_subnetwork
        model = load_subnetwork("winner.pt")      # e.g. resnet56 pruned to c_flops 0.25, trained weights
        model = load_subnetwork("winner.pt", with_preprocessing=True)
        logits = model(images_uint8_nchw)

    A weight-pruned export loads as the base architecture with plain weights, the pruned ones exactly 0.0 (its
    file holds ``<layer>.weight_orig`` and ``<layer>.weight_mask``: the weights and the masks).
    """
    ckpt = read_subnetwork(path)
    preprocessing = subnetwork_preprocessing(ckpt, data_dir, where=str(path)) if with_preprocessing else None
    model = build_subnetwork(ckpt)
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as error:
        raise NpsError(f"{path}: its weights do not fit its own keep counts ({str(error).splitlines()[0]}); "
                       "re-export it") from None
    if ckpt["mode"] == "weights":  # plain weights with the pruned ones at 0.0 (the file keeps the masks too)
        from nps.pipeline.network.masks import make_permanent

        make_permanent(model)
    if preprocessing is not None:
        from nps.pipeline.deploy.preprocessing import PreprocessedSubnetwork

        model = PreprocessedSubnetwork(model, preprocessing)
    return model.to(device).eval()
