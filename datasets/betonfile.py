"""Reading a converted .beton back without decoding it: counts, labels, image sizes and the content fingerprint.

The fingerprint is a SHA-256 over what the files store, in dataset order, independent of how FFCV's writer laid the
pages out (its workers allocate pages in whatever order they finish, so the raw file bytes are not reproducible):

    for split in ("train", "val"):
        "<split>:<count>\\n"
        the per-sample header array: label <i8, storage mode <u1 (0 jpg, 1 raw), height <u2, width <u2
        every sample's stored image bytes (raw HxWx3 pixels or the JPEG stream), sample 0 first

So two conversions of the same source with the same options give the same fingerprint, and ``nps convert --verify``
recomputes it from the files alone.
"""
from __future__ import annotations

import hashlib
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Tuple

import numpy as np

from nps.datasets.errors import DatasetError

FINGERPRINT_METHOD = (
    "sha256 over, per split (train, val): '<split>:<count>\\n', then the per-sample headers "
    "(label <i8, mode <u1, height <u2, width <u2), then every sample's stored image bytes in index order"
)

_HEADER = np.dtype([("label", "<i8"), ("mode", "<u1"), ("height", "<u2"), ("width", "<u2")])


@dataclass
class BetonSummary:
    """What one .beton holds, read from its metadata and allocation table."""

    path: str
    count: int
    labels: np.ndarray
    heights: np.ndarray
    widths: np.ndarray
    modes: np.ndarray

    def label_histogram(self, num_classes: int) -> list:
        """Count of each label ``0..num_classes-1``."""
        return np.bincount(self.labels, minlength=num_classes).astype(int).tolist()

    @property
    def constant_shape(self) -> bool:
        """Whether every image has the same height and width."""
        return self.count > 0 and bool((self.heights == self.heights[0]).all() and (self.widths == self.widths[0]).all())


def _open_reader(path: Path):
    from ffcv.reader import Reader

    if not path.is_file():
        raise DatasetError(f"{path}: missing .beton file")
    try:
        reader = Reader(str(path))
    except Exception as exc:  # noqa: BLE001 - a damaged header fails in many ways
        raise DatasetError(f"{path}: not a readable .beton ({type(exc).__name__}: {exc})") from None
    names = list(reader.field_names)
    if names[:2] != ["image", "label"]:
        raise DatasetError(f"{path}: expected fields image, label; found {', '.join(names)}")
    if len(reader.metadata) != reader.num_samples:
        raise DatasetError(f"{path}: truncated metadata ({len(reader.metadata)} of {reader.num_samples} samples)")
    return reader


def _fields(reader) -> Tuple[np.ndarray, np.ndarray]:
    meta = reader.metadata
    return meta[meta.dtype.names[0]], meta[meta.dtype.names[1]]


def read_summary(path: os.PathLike) -> BetonSummary:
    """Counts, labels and image sizes of one .beton (no image is decoded)."""
    path = Path(path)
    reader = _open_reader(path)
    image, label = _fields(reader)
    return BetonSummary(str(path), int(reader.num_samples), np.array(label, dtype=np.int64),
                        np.asarray(image["height"]), np.asarray(image["width"]), np.asarray(image["mode"]))


def _payload_sizes(reader, path: Path, data_ptr: np.ndarray, file_size: int) -> np.ndarray:
    table = reader.alloc_table
    order = np.argsort(table["ptr"], kind="stable")
    ptrs, sizes = table["ptr"][order], table["size"][order]
    where = np.searchsorted(ptrs, data_ptr)
    where_c = np.minimum(where, max(len(ptrs) - 1, 0))
    if len(ptrs) == 0 or not (ptrs[where_c] == data_ptr).all():
        raise DatasetError(f"{path}: allocation table does not cover every image (damaged file)")
    found = sizes[where_c].astype(np.int64)
    if (data_ptr.astype(np.int64) + found > file_size).any():
        raise DatasetError(f"{path}: truncated (image data runs past the end of the file)")
    return found


def _stored(path: Path):
    """(reader-derived summary, per-sample payload sizes) of one .beton."""
    reader = _open_reader(path)
    image, label = _fields(reader)
    count = int(reader.num_samples)
    summary = BetonSummary(str(path), count, np.array(label, dtype=np.int64), np.asarray(image["height"]),
                           np.asarray(image["width"]), np.asarray(image["mode"]))
    data_ptr = np.asarray(image["data_ptr"], dtype=np.uint64)
    sizes = _payload_sizes(reader, path, data_ptr, path.stat().st_size) if count else np.zeros(0, np.int64)
    return summary, data_ptr, sizes


def iter_payloads(path: os.PathLike) -> Iterator[memoryview]:
    """Each sample's stored image bytes in index order (raw ``H x W x 3`` pixels or a JPEG stream).

    The views are only valid during the iteration step that yields them.
    """
    path = Path(path)
    summary, data_ptr, sizes = _stored(path)
    if not summary.count:
        return
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        piece = None
        try:
            for ptr, size in zip(data_ptr.tolist(), sizes.tolist()):
                piece = view[ptr:ptr + size]
                yield piece
                piece.release()
        finally:
            if piece is not None:
                piece.release()  # also when the caller stops early: the mmap cannot close while a view lives
            view.release()


def read_raw_images(path: os.PathLike) -> Tuple[List[np.ndarray], np.ndarray]:
    """The stored images of a raw-mode .beton as ``H x W x 3`` arrays (any sizes), and the labels."""
    path = Path(path)
    summary = read_summary(path)
    if (summary.modes != 1).any():
        raise DatasetError(f"{path}: holds JPEG images; decode them with a loader instead")
    images = [np.frombuffer(bytes(piece), dtype=np.uint8).reshape(int(h), int(w), 3)
              for piece, h, w in zip(iter_payloads(path), summary.heights, summary.widths)]
    return images, summary.labels


def read_raw_array(path: os.PathLike) -> Tuple[np.ndarray, np.ndarray]:
    """All images of a raw-mode .beton whose images share one size, as one ``N x H x W x 3`` uint8 array.

    No decoding and no JIT compilation: the stored bytes are the pixels. Raises :class:`DatasetError` when the file
    holds JPEG images or images of different sizes.
    """
    path = Path(path)
    summary = read_summary(path)
    if (summary.modes != 1).any():
        raise DatasetError(f"{path}: holds JPEG images; decode them with a loader instead")
    if summary.count and not summary.constant_shape:
        raise DatasetError(f"{path}: images differ in size")
    height = int(summary.heights[0]) if summary.count else 0
    width = int(summary.widths[0]) if summary.count else 0
    images = np.empty((summary.count, height, width, 3), dtype=np.uint8)
    flat = images.reshape(summary.count, -1)
    for i, piece in enumerate(iter_payloads(path)):
        flat[i] = np.frombuffer(piece, dtype=np.uint8)
    return images, summary.labels


def update_fingerprint(hasher, split: str, path: os.PathLike) -> BetonSummary:
    """Feed one split's stored content into ``hasher`` (see the module docstring) and return its summary."""
    path = Path(path)
    summary, _, _ = _stored(path)
    headers = np.zeros(summary.count, dtype=_HEADER)
    headers["label"], headers["mode"] = summary.labels, summary.modes
    headers["height"], headers["width"] = summary.heights, summary.widths
    hasher.update(f"{split}:{summary.count}\n".encode())
    hasher.update(headers.tobytes())
    for piece in iter_payloads(path):
        hasher.update(piece)
    return summary


def fingerprint(paths: Iterable[Tuple[str, os.PathLike]]) -> Tuple[str, Dict[str, BetonSummary]]:
    """SHA-256 hex digest over the splits ``[(name, path), ...]`` and each split's summary."""
    hasher = hashlib.sha256()
    summaries = {name: update_fingerprint(hasher, name, path) for name, path in paths}
    return hasher.hexdigest(), summaries
