"""Checking an export: re-evaluate it on the val split of the run's dataset, the way the run evaluated, and compare
the count of correct images with the stored top-1 (``nps export --verify``)."""
from __future__ import annotations

import math
import os
from pathlib import Path

from nps.pipeline.errors import NpsError
from nps.pipeline.results.export import load_subnetwork, read_subnetwork


def _parse_config(text: str, where: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(text or "")
    except tomllib.TOMLDecodeError as error:
        raise NpsError(f"{where}: the stored config is not valid TOML ({error}); pass --data DIR") from None


def dataset_dir(ckpt: dict, data_dir: str | os.PathLike | None = None) -> Path:
    """The converted dataset the run used: ``data_dir`` if given, else the config's ``[dataset] dir``.

    A relative ``dir`` is looked up from the current directory, then from the results file's directory.
    """
    if data_dir is not None:
        path = Path(data_dir)
        if not path.is_dir():
            raise NpsError(f"--data {path}: no such directory (a dataset converted with nps convert)")
        return path
    cfg = _parse_config(ckpt.get("config", ""), "export")
    entry = cfg.get("dataset", {}).get("dir") if isinstance(cfg.get("dataset"), dict) else None
    if not entry:
        raise NpsError("the export's config has no [dataset] dir; pass --data DIR (the directory written by "
                       "nps convert for the run's dataset)")
    candidates = [Path(entry)]
    if not Path(entry).is_absolute() and ckpt.get("results"):
        candidates.append(Path(ckpt["results"]).parent / entry)
    for path in candidates:
        if path.is_dir():
            return path
    raise NpsError(f"the run's dataset dir {entry!r} is not here (tried {', '.join(map(str, candidates))}); "
                   "pass --data DIR")


def check_dataset_of(ckpt: dict, data: Path, *, given: bool) -> None:
    """``data`` must be the dataset the subnetwork was scored on: its fingerprint (when the export has it), its
    classes and its image shape (the network's resolution, for images stored at their size)."""
    from nps.datasets.errors import DatasetError
    from nps.datasets.meta import load_meta, same_dataset_problem

    where = f"--data {data}" if given else f"the run's dataset {data}"
    try:
        meta = load_meta(data)
    except DatasetError as exc:
        raise NpsError(f"{where}: {exc}") from None
    problem = same_dataset_problem(meta, str(ckpt.get("dataset_fingerprint", "")),
                                   num_classes=ckpt.get("dataset_num_classes") or None,
                                   image_shape=ckpt.get("dataset_image_shape") or None)
    if problem:
        raise NpsError(f"{where} is not the dataset this subnetwork was scored on ({problem}); pass the run's "
                       "dataset with --data")


def _config_section(cfg: dict, name: str) -> dict:
    section = cfg.get(name)
    return section if isinstance(section, dict) else {}


def _check_config_model(cfg: dict, ckpt: dict) -> None:
    """The config's [model] keys, where set, must agree with the layer table the keep counts refer to.

    0 means "from the dataset" / "automatic" for resolution, in_channels and num_classes, and is not compared.
    """
    model = _config_section(cfg, "model")
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

    _check_config_model(_parse_config(ckpt.get("config", ""), where), ckpt)
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

    cfg = _parse_config(ckpt.get("config", ""), where)
    _check_config_model(cfg, ckpt)
    dataset = _config_section(cfg, "dataset")
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
    cfg = _parse_config(ckpt.get("config", ""), str(path))
    dev = torch.device(device)
    amp = amp or str(_config_section(cfg, "retrain").get("amp", "auto"))
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
