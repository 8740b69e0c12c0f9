"""Everything before any work starts: an experiment checked against the files it names, resolved into a :class:`Plan`.

:func:`validate` adds to :func:`nps.pipeline.experiment.config.check_config` (which touches no file) what needs the disk and
the model: the dataset directory is converted and complete, ``in_channels``/``num_classes``/``resolution`` resolve
from it, the layer table builds, every sampled space's target is reachable (the samplers' ``check_feasible``), and
the checkpoint fits the model. Every error is one :class:`NpsError` line naming the key.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from nps.pipeline.errors import NpsError
from nps.pipeline.experiment.checks import _need, check_config
from nps.pipeline.experiment.config import Config, expand_spaces
from nps.pipeline.network.checkpoints import check_checkpoint
from nps.pipeline.network.pruning_kind import WEIGHTS, kind_of


@dataclass
class Plan:
    """What :func:`validate` resolved: the dataset, the base network, the spaces to run."""

    config: Config
    meta: dict
    table: Any  # LayerTable
    resolution: int
    in_channels: int
    num_classes: int
    spaces: list  # [PlannedSpace]: every space of the experiment, in order
    checkpoint: str  # "" or a path to load the base weights from
    results_path: str
    base_path: str
    weight_table: Any = None  # the weight table (pipeline.network.weight_table) when a space prunes weights
    latency_model: Any = None  # model.latency_model's LatencyModel (its form is in table.latency)

    def table_for(self, key: str):
        """The table a space's keep vectors count in: the weight table for a weight space, else the layer table."""
        return kind_of(key).table(self.table, self.weight_table)


def default_resolution(meta: dict) -> int:
    from nps.datasets.loaders import DEFAULT_LARGE_RESOLUTION, SMALL_IMAGE_MAX_SIDE

    shape = meta.get("image_shape")
    return max(shape) if shape and max(shape) <= SMALL_IMAGE_MAX_SIDE else DEFAULT_LARGE_RESOLUTION


def converted_dataset(directory: str) -> dict:
    """The meta of the converted dataset at ``directory`` (``dataset.dir``), its split files checked; one NpsError
    line naming the key otherwise."""
    from nps.datasets.errors import DatasetError
    from nps.datasets.meta import META_NAME, load_meta

    if not os.path.isdir(directory):
        raise NpsError(f"dataset.dir: {directory} does not exist; convert a dataset first, e.g. "
                       f"nps convert fashion-mnist --out {directory}")
    if not os.path.isfile(os.path.join(directory, META_NAME)):
        raise NpsError(f"dataset.dir: {directory} is not a converted dataset (no {META_NAME}); run "
                       f"nps convert KIND --out {directory}")
    try:
        meta = load_meta(directory)
    except DatasetError as exc:
        raise NpsError(f"dataset.dir: {exc}") from None
    for split in ("train", "val"):
        if not os.path.isfile(os.path.join(directory, meta["files"][split])):
            raise NpsError(f"dataset.dir: {directory} lacks {meta['files'][split]}; re-run nps convert")
    return meta


def _weight_table(m, spaces, resolution: int, num_classes: int, in_channels: int):
    """The weight table when a space prunes weights, else None."""
    if not any(p.kind == "sampled" and kind_of(p.key) is WEIGHTS for p in spaces):
        return None
    from nps.pipeline.network.weight_table import build_weight_table

    return build_weight_table(m.name, resolution, num_classes, in_channels, flops=m.flops)


def validate(cfg: Config, devices: list[str] | None = None) -> Plan:
    """Check everything a run needs before it starts; returns the resolved :class:`Plan`.

    On top of :func:`check_config`: the dataset directory is converted, the checkpoint matches the model, each
    space's target is reachable (the samplers' ``check_feasible``), the output directory can be written and has room
    for what the run writes, and one training batch fits in the memory of ``devices`` (default: the experiment's;
    not checked on a Ray cluster, whose devices the driver does not know yet).
    """
    from nps.datasets.errors import DatasetError
    from nps.kernels.errors import SamplerError
    from nps.kernels.spaces import check_feasible
    from nps.pipeline.experiment import preflight
    from nps.pipeline.experiment.sampling import check_plan_memory
    from nps.pipeline.network.layer_table import build_layer_table

    check_config(cfg)
    m = cfg.model
    meta = converted_dataset(cfg.dataset.dir)
    in_channels = m.in_channels or (1 if meta.get("source_channels") == 1 else 3)
    num_classes = m.num_classes or int(meta["num_classes"])
    _need(num_classes >= int(meta["num_classes"]), "model.num_classes",
          f"{num_classes} is fewer than the dataset's {meta['num_classes']} classes")
    resolution = m.resolution or default_resolution(meta)
    if not m.checkpoint or cfg.references:  # the holdout of base and reference training must leave images to train
        from nps.datasets.loaders import resolve_holdout

        try:
            resolve_holdout(cfg.base.holdout_images, int(meta["counts"]["train"]))
        except DatasetError as exc:
            raise NpsError(f"base.holdout_images: {exc}") from None
    try:
        table = build_layer_table(m.name, m.mode, resolution, num_classes, in_channels, flops=m.flops,
                                  channel_multiple=m.channel_multiple)
    except NpsError as exc:
        raise NpsError(f"model.name: {m.name}: {exc}") from None
    latency_model, table = _latency_model(m, table)

    spaces = expand_spaces(cfg)
    for p in spaces:
        _need(p.target != "c_latency" or latency_model is not None, f"spaces[{p.index}].c_latency",
              "needs model.latency_model: measure one with nps latency-model --model "
              f"{m.name} --resolution {resolution} --out FILE and name the file there")
    weight_table = _weight_table(m, spaces, resolution, num_classes, in_channels)
    for p in spaces:
        if p.kind != "sampled":
            continue
        try:
            check_feasible(kind_of(p.key).table(table, weight_table), p.space)
        except SamplerError as exc:
            raise NpsError(f"spaces[{p.index}].{p.target}: {exc}") from None

    out = cfg.experiment.out
    base_path = os.path.join(out, "base.pt")
    checkpoint = m.checkpoint
    if checkpoint:
        if os.path.isdir(checkpoint):
            raise NpsError(f"model.checkpoint: {checkpoint} is a directory; give the checkpoint file (a saved "
                           "state_dict)")
        if not os.path.isfile(checkpoint):
            raise NpsError(f"model.checkpoint: {checkpoint} does not exist")
        check_checkpoint(checkpoint, m.name, num_classes, in_channels)
    if devices is None and not cfg.experiment.ray:
        from nps.pipeline.experiment.checks import parse_devices

        devices = parse_devices(cfg.experiment.devices, key="experiment.devices")
    preflight.check_memory(cfg, num_classes, in_channels, resolution, devices or [])
    preflight.check_output_dir(out)
    preflight.check_pretrained(cfg, num_classes, in_channels, base_done=bool(checkpoint) or os.path.isfile(base_path),
                               references_done=_done_references(os.path.join(out, "results.h5")))
    plan = Plan(cfg, meta, table, resolution, in_channels, num_classes, spaces, checkpoint,
                os.path.join(out, "results.h5"), base_path, weight_table, latency_model)
    check_plan_memory(plan)  # before check_disk, whose estimate walks every row
    preflight.check_disk(plan, _done_rows(plan.results_path))
    return plan


def _latency_model(m, table):
    """(LatencyModel, the table with its form) of ``model.latency_model``, or (None, the table) when it names none;
    one NpsError line naming the key when the file cannot be read or is of another network."""
    if not m.latency_model:
        return None, table
    from nps.pipeline.network.latency_model import LatencyModel
    from nps.pipeline.network.layer_table import with_latency

    try:
        model = LatencyModel.load(m.latency_model)
        return model, with_latency(table, model)
    except NpsError as exc:
        raise NpsError(f"model.latency_model: {exc}") from None


def _done_rows(results_path: str) -> int:
    """Rows an earlier run of this experiment finished (their weights are on disk already)."""
    if not os.path.isfile(results_path):
        return 0
    from nps.pipeline.results.reader import open_readonly

    with open_readonly(results_path) as reader:
        return sum(counts["done"] + counts["failed"] for counts in reader.summary().values())


def _done_references(results_path: str) -> set[str]:
    """References an earlier run of this experiment trained, or failed to (the driver does not retry those): they
    need no pretrained weights any more."""
    if not os.path.isfile(results_path):
        return set()
    from nps.pipeline.results.reader import open_readonly

    with open_readonly(results_path) as reader:
        return set(reader.references())
