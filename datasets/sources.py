"""Readers for the raw dataset formats that ``nps convert`` accepts.

Every reader validates its input strictly and raises :class:`~nps.datasets.errors.DatasetError` with a one-line
message ``"<file>: <problem>"``. A reader returns a :class:`Source`: two indexable splits (``train``, ``val``) whose
items are ``(image, label)`` with ``image`` an ``H x W x 3`` uint8 array (grayscale replicated to three channels,
because FFCV's ``RGBImageField`` stores three channels) and ``label`` an ``int``. Labels are known for the whole split
without decoding any image (``split.labels``), so they are range-checked before anything is written.

The readers of array formats (IDX, CIFAR pickles, ``.npz``) live here; the ImageFolder reader, which decodes image
files lazily, lives in :mod:`nps.datasets.imagefolder`. :data:`READERS` maps a ``KIND`` to its reader.
"""
from __future__ import annotations

import gzip
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from nps.datasets.errors import DatasetError
from nps.datasets.kinds import KINDS
from nps.datasets.source import ArraySplit, Source, inferred_classes

FASHION_MNIST_DEFAULT_SRC = "/usr/share/datasets/fashion-mnist/"

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


# --------------------------------------------------------------------------------------------------------- IDX files

_IDX_STEMS = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "val_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "val_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def _find_idx_file(folder: Path, role: str) -> Path:
    for stem in _IDX_STEMS[role]:
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise DatasetError(f"{folder}: missing {_IDX_STEMS[role][0]}[.gz]")


def _read_bytes(path: Path) -> bytes:
    """The content of ``path``, gunzipped when it starts with the gzip magic."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zipfile.BadZipFile) as exc:
            raise DatasetError(f"{path}: truncated or corrupt gzip stream ({exc})") from None
    return data


def read_idx_file(path: Path, ndim: int) -> np.ndarray:
    """Read one IDX (``ubyte``) file with exactly ``ndim`` dimensions.

    Parameters
    ----------
    path : Path
        The file, raw or gzip-compressed.
    ndim : int
        Expected number of dimensions (3 for images, 1 for labels).

    Returns
    -------
    np.ndarray
        uint8 array of the declared shape.
    """
    data = _read_bytes(path)
    if len(data) < 4:
        raise DatasetError(f"{path}: truncated IDX header ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError(f"{path}: wrong IDX magic {data[:4].hex()} (expected 000008{ndim:02x}, unsigned bytes)")
    if data[3] != ndim:
        raise DatasetError(f"{path}: IDX file has {data[3]} dimensions, expected {ndim}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated IDX header ({len(data)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    found = len(data) - header
    if found != expected:
        problem = "truncated" if found < expected else "trailing bytes"
        raise DatasetError(f"{path}: {problem}: header declares shape {shape} ({expected} bytes), found {found}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_idx(src: str, *, kind: str = "idx") -> Source:
    """Read the four standard MNIST-family IDX files from the folder ``src``."""
    folder = Path(src)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a directory")
    files = {role: _find_idx_file(folder, role) for role in _IDX_STEMS}
    splits = {}
    for name in ("train", "val"):
        images = read_idx_file(files[f"{name}_images"], 3)
        labels = read_idx_file(files[f"{name}_labels"], 1)
        if len(images) != len(labels):
            raise DatasetError(
                f"{files[f'{name}_labels']}: count mismatch: {len(labels)} labels for {len(images)} images "
                f"in {files[f'{name}_images'].name}"
            )
        splits[name] = ArraySplit(images, labels)
        splits[name].origin = str(files[f"{name}_labels"])
    if kind == "fashion-mnist":
        classes = list(FASHION_MNIST_CLASSES)
    else:
        classes = inferred_classes(splits["train"].labels, splits["train"].origin)
    return Source(kind, str(folder), splits["train"], splits["val"], classes, [str(f) for f in files.values()])


# ------------------------------------------------------------------------------------------------- CIFAR pickles

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a CIFAR batch never needs anything else, and refusing other
    globals keeps a hostile pickle from running code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode"), ("__builtin__", "bytes"),
        ("builtins", "bytes"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            obj = _ArrayUnpickler(io.BytesIO(handle.read()), encoding="bytes").load()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise DatasetError(f"{path}: bad pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: bad pickle (expected a dict, found {type(obj).__name__})")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_batch(path: Path, label_key: str) -> Tuple[np.ndarray, np.ndarray]:
    batch = _load_pickle(path)
    for key in ("data", label_key):
        if key not in batch:
            raise DatasetError(f"{path}: bad pickle (no '{key}' entry)")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise DatasetError(f"{path}: 'data' must be an N x 3072 uint8 array, found {type(data).__name__} {shape}")
    try:
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{path}: '{label_key}' is not a list of integers ({exc})") from None
    if labels.ndim != 1 or len(labels) != len(data):
        raise DatasetError(f"{path}: count mismatch: {labels.size} labels for {len(data)} images")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels


def _cifar_names(path: Path, key: str, count: int) -> List[str]:
    if not path.is_file():
        return [str(c) for c in range(count)]
    names = _load_pickle(path).get(key)
    if not isinstance(names, (list, tuple)) or len(names) != count:
        raise DatasetError(f"{path}: '{key}' must list {count} class names")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def read_cifar(src: str, *, kind: str = "cifar10") -> Source:
    """Read CIFAR-10 (``data_batch_1..5``, ``test_batch``) or CIFAR-100 (``train``, ``test``) python pickles.

    ``src`` is the folder holding the batches, or its parent holding ``cifar-10-batches-py`` /
    ``cifar-100-python``. Any number of rows per batch is accepted.
    """
    folder = Path(src)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a directory")
    if kind == "cifar10":
        if (folder / "cifar-10-batches-py").is_dir():
            folder = folder / "cifar-10-batches-py"
        train_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
        val_files = [folder / "test_batch"]
        label_key, num_classes = "labels", 10
        meta_file, names_key = folder / "batches.meta", "label_names"
    else:
        if (folder / "cifar-100-python").is_dir():
            folder = folder / "cifar-100-python"
        train_files, val_files = [folder / "train"], [folder / "test"]
        label_key, num_classes = "fine_labels", 100
        meta_file, names_key = folder / "meta", "fine_label_names"
    for path in train_files + val_files:
        if not path.is_file():
            raise DatasetError(f"{path}: missing {kind} batch")
    splits = {}
    for name, paths in (("train", train_files), ("val", val_files)):
        parts = [_cifar_batch(p, label_key) for p in paths]
        for path, (_, labels) in zip(paths, parts):
            bad = (labels < 0) | (labels >= num_classes)
            if bad.any():
                raise DatasetError(
                    f"{path}: label {int(labels[bad][0])} is outside the class range 0..{num_classes - 1}"
                )
        split = ArraySplit(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        split.origin = str(paths[0]) if len(paths) == 1 else str(folder)
        splits[name] = split
    classes = _cifar_names(meta_file, names_key, num_classes)
    files = [str(p) for p in train_files + val_files]
    return Source(kind, str(folder), splits["train"], splits["val"], classes, files)


# ----------------------------------------------------------------------------------------------------------- npz

def read_npz(src: str, *, kind: str = "npz") -> Source:
    """Read ``x_train, y_train, x_test, y_test`` from one ``.npz`` file (images ``N x H x W`` or ``N x H x W x C``)."""
    path = Path(src)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in archive.files]
            if missing:
                raise DatasetError(f"{path}: missing array(s) {', '.join(missing)}")
            arrays = {k: archive[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except DatasetError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(f"{path}: not a readable .npz archive ({exc})") from None
    splits = {}
    for name, xk, yk in (("train", "x_train", "y_train"), ("val", "x_test", "y_test")):
        x, y = arrays[xk], arrays[yk]
        if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[3] not in (1, 3)):
            raise DatasetError(f"{path}: {xk} must be N x H x W or N x H x W x C (C = 1 or 3) uint8, "
                               f"found {x.dtype} {x.shape}")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise DatasetError(f"{path}: {yk} must be a 1-D integer array, found {y.dtype} {y.shape}")
        if len(x) != len(y):
            raise DatasetError(f"{path}: count mismatch: {len(y)} labels in {yk} for {len(x)} images in {xk}")
        splits[name] = ArraySplit(x, y)
        splits[name].origin = f"{path} ({yk})"
    if splits["train"].image_shape != splits["val"].image_shape:
        raise DatasetError(f"{path}: x_train images are {splits['train'].image_shape}, "
                           f"x_test images are {splits['val'].image_shape}")
    classes = inferred_classes(splits["train"].labels, getattr(splits["train"], "origin", None) or str(path))
    return Source(kind, str(path), splits["train"], splits["val"], classes, [str(path)])


def _read_imagefolder(src: str, *, kind: str = "imagefolder") -> Source:
    from nps.datasets.imagefolder import read_imagefolder  # imports PIL only when needed

    return read_imagefolder(src, kind=kind)


# KIND -> (reader, default --src or None when --src is required); the kinds are listed in nps.datasets.source.KINDS
READERS: Dict[str, Tuple[Callable[..., Source], Optional[str]]] = {
    "idx": (read_idx, None),
    "fashion-mnist": (read_idx, FASHION_MNIST_DEFAULT_SRC),
    "cifar10": (read_cifar, None),
    "cifar100": (read_cifar, None),
    "imagefolder": (_read_imagefolder, None),
    "npz": (read_npz, None),
}


assert tuple(READERS) == KINDS


def read_source(kind: str, src: Optional[str] = None) -> Source:
    """Read the dataset of format ``kind`` from ``src`` (or the kind's default source)."""
    if kind not in READERS:
        raise DatasetError(f"{kind}: unknown dataset kind (choose from {', '.join(READERS)})")
    reader, default = READERS[kind]
    src = src or default
    if src is None:
        raise DatasetError(f"{kind}: --src is required")
    source = reader(os.fspath(src), kind=kind)
    source.check_labels()
    return source

