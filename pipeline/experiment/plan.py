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

from nps.pipeline.experiment.config import Config, _need, check_config, expand_spaces
from nps.pipeline.errors import NpsError



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


def default_resolution(meta: dict) -> int:
    from nps.datasets.loaders import DEFAULT_LARGE_RESOLUTION, SMALL_IMAGE_MAX_SIDE

    shape = meta.get("image_shape")
    return max(shape) if shape and max(shape) <= SMALL_IMAGE_MAX_SIDE else DEFAULT_LARGE_RESOLUTION


def load_state_dict(path: str) -> dict:
    """The state_dict in a checkpoint file: a bare state_dict, or one under ``model``/``state_dict``."""
    from nps.pipeline.network.checkpoints import load_tensors

    obj = load_tensors(path, "model.checkpoint", "save the model's state_dict() with torch.save")
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
        raise NpsError(f"model.checkpoint: {path} holds no state_dict")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}


def checkpoint_mismatch(expected: dict, state: dict) -> str:
    """Why ``state`` cannot be loaded into a model whose state_dict is ``expected`` ("" when it can)."""
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    parts = []
    if shapes:
        parts.append(f"shape mismatch: {', '.join(shapes[:2])}")
    if missing:
        parts.append(f"{len(missing)} missing keys ({', '.join(missing[:2])}, ...)")
    if extra:
        parts.append(f"{len(extra)} unexpected keys ({', '.join(extra[:2])}, ...)")
    return "; ".join(parts)


def check_checkpoint(path: str, model_name: str, num_classes: int, in_channels: int) -> dict:
    """The checkpoint's state_dict, after checking it fits the configured model (NpsError naming model.checkpoint)."""
    from nps.pipeline.network.models import build_model

    model = build_model(model_name, num_classes=num_classes, in_channels=in_channels, device="meta")
    state = load_state_dict(path)
    problem = checkpoint_mismatch(model.state_dict(), state)
    if problem:
        raise NpsError(f"model.checkpoint: {path} does not match {model_name} with {num_classes} classes and "
                       f"{in_channels} input channels ({problem})")
    return state


def validate(cfg: Config, devices: list[str] | None = None) -> Plan:
    """Check everything a run needs before it starts; returns the resolved :class:`Plan`.

    On top of :func:`check_config`: the dataset directory is converted, the checkpoint matches the model, each
    space's target is reachable (the samplers' ``check_feasible``), the output directory can be written and has room
    for what the run writes, and one training batch fits in the memory of ``devices`` (default: the experiment's;
    not checked on a Ray cluster, whose devices the driver does not know yet).
    """
    from nps.pipeline.experiment import preflight

    from nps.datasets.errors import DatasetError
    from nps.datasets.meta import META_NAME, load_meta
    from nps.kernels.errors import SamplerError
    from nps.kernels.spaces import check_feasible
    from nps.pipeline.network.layer_table import build_layer_table

    check_config(cfg)
    d, m = cfg.dataset, cfg.model
    if not os.path.isdir(d.dir):
        raise NpsError(f"dataset.dir: {d.dir} does not exist; convert a dataset first, e.g. "
                       f"nps convert fashion-mnist --out {d.dir}")
    if not os.path.isfile(os.path.join(d.dir, META_NAME)):
        raise NpsError(f"dataset.dir: {d.dir} is not a converted dataset (no {META_NAME}); run "
                       f"nps convert KIND --out {d.dir}")
    try:
        meta = load_meta(d.dir)
    except DatasetError as exc:
        raise NpsError(f"dataset.dir: {exc}") from None
    for split in ("train", "val"):
        if not os.path.isfile(os.path.join(d.dir, meta["files"][split])):
            raise NpsError(f"dataset.dir: {d.dir} lacks {meta['files'][split]}; re-run nps convert")
    in_channels = m.in_channels or (1 if meta.get("source_channels") == 1 else 3)
    num_classes = m.num_classes or int(meta["num_classes"])
    _need(num_classes >= int(meta["num_classes"]), "model.num_classes",
          f"{num_classes} is fewer than the dataset's {meta['num_classes']} classes")
    resolution = m.resolution or default_resolution(meta)
    try:
        table = build_layer_table(m.name, m.mode, resolution, num_classes, in_channels, flops=m.flops,
                                  channel_multiple=m.channel_multiple)
    except NpsError as exc:
        raise NpsError(f"model.name: {m.name}: {exc}") from None

    spaces = expand_spaces(cfg)
    for p in spaces:
        if p.kind != "sampled":
            continue
        try:
            check_feasible(table, p.space)
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
        from nps.pipeline.experiment.config import parse_devices

        devices = parse_devices(cfg.experiment.devices, key="experiment.devices")
    preflight.check_memory(cfg, num_classes, in_channels, resolution, devices or [])
    preflight.check_output_dir(out)
    plan = Plan(cfg, meta, table, resolution, in_channels, num_classes, spaces, checkpoint,
                os.path.join(out, "results.h5"), base_path)
    preflight.check_disk(plan, _done_rows(plan.results_path))
    return plan


def _done_rows(results_path: str) -> int:
    """Rows an earlier run of this experiment finished (their weights are on disk already)."""
    if not os.path.isfile(results_path):
        return 0
    from nps.pipeline.results.store import open_readonly

    with open_readonly(results_path) as reader:
        return sum(counts["done"] + counts["failed"] for counts in reader.summary().values())
