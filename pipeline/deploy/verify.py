"""Checking an export: re-evaluate it on the val split of the run's dataset, the way the run evaluated, and compare
the count of correct images with the stored top-1 (``nps export --verify``)."""
from __future__ import annotations

import math
import os
from pathlib import Path

from nps.pipeline.deploy.export import load_subnetwork, read_subnetwork
from nps.pipeline.deploy.run_config import check_dataset_of, config_section, dataset_dir, parse_config
from nps.pipeline.errors import NpsError


def _check_config_model(cfg: dict, ckpt: dict) -> None:
    """The config's [model] keys, where set, must agree with the layer table the keep counts refer to.

    0 means "from the dataset" / "automatic" for resolution, in_channels and num_classes, and is not compared.
    """
    model = config_section(cfg, "model")
    for key, ours in (("name", ckpt["model"]), ("mode", ckpt["mode"]), ("resolution", ckpt["resolution"]),
                      ("in_channels", ckpt["in_channels"]), ("num_classes", ckpt["num_classes"])):
        value = model.get(key)
        if value in (None, 0, "") or (key == "mode" and ours == "weights"):  # a weight space has no channel mode
            continue
        if value != ours:
            raise NpsError(f"the export's config says [model] {key} = {value!r} but its layer table says "
                           f"{ours!r}; the results file is inconsistent, re-export from the right file")


class _EvalLoader:
    """The val batches as the run evaluated them: the first ``images`` only (0: all; the last batch cut), NCHW-
    contiguous on the CPU; counts the images (the denominator of top-1)."""

    def __init__(self, loader, images: int = 0, contiguous: bool = False):
        self.loader, self.limit, self.contiguous = loader, int(images or 0), contiguous
        self.images = 0

    def __iter__(self):
        self.images = 0
        for x, y in self.loader:
            if self.limit and self.images >= self.limit:
                break
            if self.limit and self.images + int(y.shape[0]) > self.limit:
                cut = self.limit - self.images
                x, y = x[:cut], y[:cut]
            self.images += int(y.shape[0])
            yield (x.contiguous() if self.contiguous else x), y


def check_verifiable(ckpt: dict, data_dir=None, *, where: str = "export") -> Path:
    """Everything a check of ``ckpt`` (an export's fields) needs before it evaluates, and nothing written: the
    stored config agrees with the layer table, the run's dataset (``data_dir``, else the config's ``[dataset]
    dir``) is here, is the dataset the subnetwork was scored on, and has its .beton files. Returns its directory.
    ``nps export --verify`` calls it before it writes the export, so a missing dataset leaves no file behind."""
    from nps.datasets.meta import load_meta

    _check_config_model(parse_config(ckpt.get("config", ""), where), ckpt)
    data = dataset_dir(ckpt, data_dir)
    check_dataset_of(ckpt, data, given=data_dir is not None)
    files = load_meta(data)["files"]
    missing = [str(path) for path in (data / files[split] for split in ("train", "val")) if not path.is_file()]
    if missing:
        raise NpsError(f"{' and '.join(missing)} missing; re-run nps convert, or pass another --data DIR")
    return data


def val_split(ckpt: dict, *, data_dir=None, device="cpu", batch_size: int | None = None, val_loader=None,
              where: str = "export") -> tuple[_EvalLoader, Path | None]:
    """The val batches the run evaluated a subnetwork on (its config's dataset, ``val_images``,
    ``val_batch_size`` and ``on_device``; ``batch_size`` overrides the batch size, ``val_loader`` the loader) and
    the dataset directory (None with ``val_loader``), after checking the config against ``ckpt`` (an export's
    fields) and the dataset against its fingerprint (:func:`check_verifiable`)."""
    import torch

    cfg = parse_config(ckpt.get("config", ""), where)
    _check_config_model(cfg, ckpt)
    dataset = config_section(cfg, "dataset")
    dev = torch.device(device)
    data = None
    if val_loader is None:
        from nps.datasets.loaders import make_loaders

        data = check_verifiable(ckpt, data_dir, where=where)
        batch = batch_size or int(dataset.get("val_batch_size", 0) or 256)
        _, val_loader, _ = make_loaders(data, batch_size=batch, resolution=int(ckpt["resolution"]),
                                        device=dev, in_channels=int(ckpt["in_channels"]), augment=False,
                                        order="sequential", drop_last=False, val_batch_size=batch,
                                        on_device=dataset.get("on_device", "auto"))
    return _EvalLoader(val_loader, int(dataset.get("val_images", 0) or 0), contiguous=dev.type == "cpu"), data


def verify_subnetwork(path: str | os.PathLike, *, data_dir: str | os.PathLike | None = None, device: str = "cpu",
                      batch_size: int | None = None, val_loader=None, tolerance: float | None = None,
                      amp: str | None = None) -> dict:
    """Re-evaluate an export on the val split and compare with the top-1 stored in results.h5.

    The evaluation follows the run's config where it says how the run evaluated: ``[dataset] val_images`` (the
    first N val images), ``val_batch_size`` and ``on_device``, and ``[retrain] amp`` (``auto`` resolves as the run
    resolved it on that device, :func:`~nps.pipeline.training.devices.resolve_amp`: bf16 on a CPU with native bf16
    instructions unless the network has depthwise convs, else off; bf16, or fp16 without bf16 support, on a GPU);
    ``batch_size`` and ``amp`` override them.

    Top-1 is ``100 · correct / N``, so two evaluations of the same weights on the same images differ by a multiple
    of ``100 / N``. With the default ``tolerance`` (half an image, ``50 / N`` points, plus float32 rounding of the
    stored value) the check passes exactly when the count of correct images is the same. On the CPU in float32 the
    evaluation is deterministic, so a run that evaluated that way is reproduced exactly; a GPU run under autocast
    is reproduced on the same kind of GPU (``device="cuda"``), up to the nondeterminism of its kernels: pass a
    ``tolerance`` in percentage points for a cross-device check.

    ``val_loader`` replaces the loader built from the dataset (tests). Returns ``{"top1", "top5", "loss",
    "stored_top1", "diff", "images", "diff_images", "tolerance", "ok", "data", "amp"}``.
    """
    import torch

    from nps.pipeline.training.devices import resolve_amp
    from nps.pipeline.training.evaluation import evaluate

    ckpt = read_subnetwork(path)
    cfg = parse_config(ckpt.get("config", ""), str(path))
    dev = torch.device(device)
    amp = amp or str(config_section(cfg, "retrain").get("amp", "auto"))
    loader, data = val_split(ckpt, data_dir=data_dir, device=dev, batch_size=batch_size, val_loader=val_loader,
                             where=str(path))
    model = load_subnetwork(path, device=device)
    top1, top5, loss = evaluate(model, loader, dev, amp_dtype=resolve_amp(amp, dev, [model]))
    images = loader.images
    stored = float(ckpt.get("top1", math.nan))
    # float32 storage of a percentage: relative error 2^-24, i.e. < 1e-5 points below 100 %.
    tol = 50.0 / images + 1e-4 if tolerance is None else float(tolerance)
    diff = top1 - stored
    return {"top1": top1, "top5": top5, "loss": loss, "stored_top1": stored, "diff": diff, "images": images,
            "diff_images": int(round(diff * images / 100.0)) if math.isfinite(diff) else None, "tolerance": tol,
            "ok": bool(math.isfinite(diff) and abs(diff) <= tol), "data": None if data is None else str(data),
            "amp": amp}
