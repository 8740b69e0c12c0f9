"""``meta.json``: what a converted dataset directory holds, written atomically beside the .beton files.

Keys (all written by :func:`nps.datasets.convert.convert_dataset`):

``format``/``format_version``  ``"nps-beton"``, 1
``kind``, ``source``, ``source_files``  the KIND converted and where it came from
``files``                    ``{"train": "train.beton", "val": "val.beton"}``
``counts``                   images per split
``classes``, ``num_classes`` class names, in label order
``label_histogram``          per split, the count of each label
``image_shape``              ``[H, W]`` of the stored images when all are equal, else null
``min_size``, ``max_size``   smallest / largest stored ``[H, W]``
``source_channels``          1 (grayscale) or 3
``stored_channels``          always 3: grayscale is stored as three equal channels (``grayscale_replicated``)
``mean``, ``std``            per-channel pixel statistics of the train split (0..255 scale, source pixels)
``write_mode``, ``max_resolution``, ``jpeg_quality``, ``limit``  the conversion options
``fingerprint``, ``fingerprint_method``  see :mod:`nps.datasets.betonfile`
``nps_version``, ``created``
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict

from nps.datasets.errors import DatasetError

META_NAME = "meta.json"
SPLITS = ("train", "val")
FORMAT = "nps-beton"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("kind", "counts", "classes", "num_classes", "label_histogram", "fingerprint", "files",
                 "mean", "std", "grayscale_replicated", "image_shape")


def nps_version() -> str:
    """The installed nps distribution's version ("unknown" when running from a bare checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nps")
    except PackageNotFoundError:
        return "unknown"


def write_json_atomic(path: os.PathLike, payload: Dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` through a temporary name and ``os.replace``: readers see old or new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_meta(data_dir: os.PathLike) -> Dict[str, Any]:
    """Read and sanity-check ``DIR/meta.json`` of a converted dataset."""
    path = Path(data_dir) / META_NAME
    if not path.is_file():
        raise DatasetError(f"{path}: missing (convert the dataset first: nps convert KIND --out {data_dir})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DatasetError(f"{path}: not an nps dataset description (format != {FORMAT!r})")
    missing = [key for key in REQUIRED_KEYS if key not in meta]
    if missing:
        raise DatasetError(f"{path}: missing key(s) {', '.join(missing)}")
    return meta


def same_dataset_problem(meta: Dict[str, Any], fingerprint: str, *, num_classes: int | None = None,
                         image_shape=None) -> str:
    """Why the converted dataset ``meta`` is not the one a run was made with ("" when it is): its fingerprint (the
    images and labels), and where known its class count and image shape. Shared by `nps run` (resume, every worker)
    and `nps export --verify`."""
    problems = []
    if fingerprint and meta.get("fingerprint") != fingerprint:
        problems.append(f"fingerprint {str(meta.get('fingerprint'))[:12]}… where the run had {fingerprint[:12]}…")
    if num_classes is not None and int(meta.get("num_classes", -1)) != int(num_classes):
        problems.append(f"{meta.get('num_classes')} classes where the run had {num_classes}")
    shape = meta.get("image_shape")
    if image_shape is not None and shape is not None and list(shape) != list(image_shape):
        problems.append(f"{'x'.join(map(str, shape))} images where the run had {'x'.join(map(str, image_shape))}")
    return "; ".join(problems)
