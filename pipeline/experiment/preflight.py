"""What the machine must hold, checked before any work: the output directory and its free space, the memory one
training batch of the base network needs, and the pretrained weights the base and references start from.

A run that cannot finish for want of disk or memory should say so in one line before it trains anything, not after
an hour (a full disk) or in a worker that tries to allocate terabytes (an absurd ``model.resolution``). Both checks
are estimates on the safe side of what a run really uses, and name the key to change.
"""
from __future__ import annotations

import os

from nps.pipeline.errors import NpsError, free_bytes

MiB = 2**20
GiB = 2**30
RESULTS_OVERHEAD = 1 * MiB  # /layers, attributes and HDF5's own structures
ROW_BYTES = 400  # a row's fixed fields (recipe-independent columns, the S256 error), without recipe/keep/curve


def _size(n: float) -> str:
    return f"{n / GiB:,.1f} GiB" if n >= GiB else f"{n / MiB:,.1f} MiB"


def check_output_dir(out: str) -> None:
    """``experiment.out`` is a directory nps can create and write (one line naming it if not); creates nothing."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise NpsError(f"experiment.out: {out} exists and is a file; --out names a directory (it will hold "
                       "results.h5, base.pt, weights/ and log.jsonl)")
    existing = os.path.abspath(out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NpsError(f"experiment.out: cannot create {out}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        reason = "Read-only file system" if _read_only(existing) else "Permission denied"
        raise NpsError(f"experiment.out: cannot write {out}: {reason}; choose a writable place (--out)")


def _read_only(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def output_bytes(plan, done_rows: int = 0) -> dict[str, int]:
    """Bytes the run will write into ``experiment.out``, by file: ``results`` (results.h5), ``base`` (base.pt, when
    nps trains it and it is not there yet), ``checkpoint`` (its training's checkpoints, as long as it trains),
    ``weights`` (the kept weights of the rows still to train) and
    ``staging`` (weights a cohort leaves for the driver before it keeps or drops them).

    A subnetwork's weights are estimated as the base network's times its target (c_flops or c_params: the mean
    c_params of a space at a FLOPs target is close to it, since its mCB is about 1), a ratio space's as (1 − r)².
    """
    cfg, table = plan.config, plan.table
    weight_bytes = 4 * int(table.base_params) * 1.05 + 64 * 1024  # fp32 tensors plus BN buffers and the pickle
    groups = len(table.channels)
    rows, kept, largest = 0, 0.0, 0.0
    for p in plan.spaces:
        n = p.rows
        if p.kind == "ratios":
            fractions = [(1 - r) ** 2 for r in p.ratios for _ in range(p.n)]
        else:
            fractions = [float(p.value)] * n
        fractions.sort(reverse=True)
        rows += n
        largest = max(largest, fractions[0])
        keep = cfg.output.keep_weights
        chosen = fractions if keep == "all" else fractions[: cfg.output.top_k] if keep == "topk" else []
        kept += sum(chosen)
        if cfg.two_stage.enabled and p.kind == "sampled":
            rows += cfg.two_stage.top_k
            kept += sum(fractions[: cfg.two_stage.top_k]) if keep != "none" else 0.0
    epochs = max([cfg.retrain.epochs, cfg.two_stage.full_epochs if cfg.two_stage.enabled else 0]
                 + [p.spec.retrain.epochs for p in plan.spaces])
    share = 1.0 - min(done_rows, rows) / max(rows, 1)
    cohort = cfg.retrain.cohort_size if isinstance(cfg.retrain.cohort_size, int) else 32
    out = {
        "results": RESULTS_OVERHEAD + rows * (ROW_BYTES + groups * 8 + epochs * 4),
        "base": 0 if cfg.model.checkpoint or os.path.isfile(plan.base_path) else int(weight_bytes),
        # its training's checkpoint (weights and momentum) and, while the driver moves it in, the next one staged
        "checkpoint": 0 if cfg.model.checkpoint or os.path.isfile(plan.base_path) else int(4 * weight_bytes),
        "weights": int(kept * weight_bytes * share),
        "staging": int(cohort * largest * weight_bytes) if cfg.output.keep_weights != "none" else 0,
    }
    if os.path.isfile(plan.results_path):
        out["results"] = 0
    return out


def check_disk(plan, done_rows: int = 0) -> None:
    """Refuse to start when ``experiment.out``'s filesystem has less free space than :func:`output_bytes`."""
    need = output_bytes(plan, done_rows)
    total = sum(need.values())
    free = free_bytes(plan.config.experiment.out)
    if free is None or free >= total:
        return
    parts = ", ".join(f"{name} {_size(n)}" for name, n in need.items() if n)
    hint = "" if plan.config.output.keep_weights == "none" else " (or keep fewer weights: output.keep_weights)"
    raise NpsError(f"experiment.out: {plan.config.experiment.out} needs about {_size(total)} ({parts}) and its "
                   f"filesystem has {_size(free)} free; free some space or choose another --out{hint}")


# --------------------------------------------------------------------------------------------------------------------
# Memory.


def device_memory(device: str) -> tuple[int, str] | None:
    """(bytes, name) of a device's memory: the machine's RAM for ``cpu``, the GPU's for ``cuda:i``; None if unknown."""
    if device == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "the machine's memory"
        except (ValueError, OSError):
            return None
    try:
        import torch

        props = torch.cuda.get_device_properties(int(device.split(":")[1]))
        return int(props.total_memory), f"{device} ({props.name})"
    except Exception:  # noqa: BLE001 - no CUDA here: the run's own check of its devices says so
        return None


def batch_bytes(cfg, num_classes: int, in_channels: int, resolution: int, batch_size: int) -> int:
    """Bytes to train the base network on one batch (parameters, gradients, momentum and the activations autograd
    keeps: :func:`nps.pipeline.training.devices.estimate_train_bytes`, shapes only, on the meta device)."""
    from nps.pipeline.network.models import build_model
    from nps.pipeline.training.devices import estimate_train_bytes

    model = build_model(cfg.model.name, num_classes=num_classes, in_channels=in_channels, device="meta")
    return estimate_train_bytes(model, (batch_size, in_channels, resolution, resolution))


def check_memory(cfg, num_classes: int, in_channels: int, resolution: int, devices: list[str]) -> None:
    """Refuse a training batch of the base network that cannot fit in the memory of the smallest device."""
    sizes = [m for m in (device_memory(d) for d in devices) if m is not None]
    if not sizes:
        return
    memory, name = min(sizes)
    batch = max(cfg.base.batch_size if not cfg.model.checkpoint else 0, cfg.retrain.batch_size)
    need = batch_bytes(cfg, num_classes, in_channels, resolution, batch)
    if need > memory:
        raise NpsError(f"model.resolution: one training batch of {cfg.model.name} at {resolution} px (batch {batch})"
                       f" needs about {_size(need)}, more than the {_size(memory)} of {name}; lower "
                       "model.resolution or the batch size")



# --------------------------------------------------------------------------------------------------------------------
# Pretrained weights.


def check_pretrained(cfg, num_classes: int, in_channels: int, *, base_done: bool, references_done=()) -> None:
    """Refuse a pretrained start that cannot be had on this machine (a missing or unfitting file, a model without
    library weights, weights neither cached nor reachable), in one line naming the key and how to give a local file.
    The base network (when ``base_done``: its trained weights are on disk) and the references already trained
    need none. Downloads nothing: at most a connection probe of the hub, a few seconds."""
    from nps.pipeline.network.pretrained import weights_problem

    todo = [] if base_done else [("model.pretrained", cfg.model.name, cfg.model.pretrained)]
    todo += [(f"references[{i}].pretrained", ref.model, ref.pretrained) for i, ref in enumerate(cfg.references)
             if ref.model not in references_done]
    for key, name, pretrained in todo:
        problem = weights_problem(name, pretrained, num_classes, in_channels, key)
        if problem:
            raise NpsError(problem)
