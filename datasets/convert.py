"""Convert a raw dataset to ``DIR/train.beton``, ``DIR/val.beton`` and ``DIR/meta.json`` (``nps convert``).

Safety rules:

* every .beton is written to ``DIR/.<split>.beton.tmp`` and renamed only when both splits were written and read back;
  on any failure (bad input, Ctrl-C) the temporary files are removed and existing files are left as they were;
* existing output is refused unless ``force=True``; with ``force`` the old ``meta.json`` is removed before the new
  files are renamed into place, so a directory is never described by a stale ``meta.json``;
* the source is validated before writing (headers, counts, label range); image files that fail to decode inside
  FFCV's writer processes are reported after the split and stop the conversion with the file's name.

FFCV's writer waits for its worker processes to report every sample; a worker killed from outside (OOM killer)
would leave it waiting, which is why no exception may escape a worker (see :class:`_GuardedSplit`).
"""
from __future__ import annotations

import ctypes
import datetime
import logging
import multiprocessing
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Optional
from unittest import mock

import numpy as np

from nps.datasets.betonfile import FINGERPRINT_METHOD, fingerprint
from nps.datasets.errors import DatasetError
from nps.datasets.meta import FORMAT, FORMAT_VERSION, META_NAME, SPLITS, load_meta, nps_version, write_json_atomic
from nps.datasets.sources import read_source

log = logging.getLogger(__name__)

WRITE_MODES = ("raw", "jpg", "smart")
# write_mode="smart": JPEG for images whose raw pixels exceed this many bytes (about 100 x 100 x 3), raw below.
SMART_THRESHOLD = 32 * 1024
PAGE_SIZE = 1 << 23  # FFCV page; no single stored image may be larger than this
MIN_IMAGES_PER_WORKER = 500
_ERROR_BYTES = 2048

ProgressFn = Callable[[str, int, int], None]  # (split, images done, images total)


class _GuardedSplit:
    """Wraps a source split for FFCV's writer processes: errors become a shared message instead of a dead worker.

    FFCV's writer waits for a sample count that a crashed worker never reports, so an exception must not escape
    ``__getitem__``. The first error is stored in shared memory; later items are skipped (a placeholder is written,
    and the temporary file is deleted afterwards). Per-channel sums for ``mean``/``std`` are accumulated too.
    """

    def __init__(self, split, max_bytes: int, max_resolution: Optional[int]):
        self.split = split
        self.max_bytes = max_bytes
        self.max_resolution = max_resolution
        self.failed = multiprocessing.Value(ctypes.c_int, 0)
        self.message = multiprocessing.Array(ctypes.c_char, _ERROR_BYTES)
        self.moments = multiprocessing.Array(ctypes.c_double, 7)  # sum r,g,b; sum of squares r,g,b; pixels

    def __len__(self) -> int:
        return len(self.split)

    def _fail(self, text: str) -> None:
        with self.failed.get_lock():
            if not self.failed.value:
                self.failed.value = 1
                self.message.value = text.encode("utf-8", "replace")[:_ERROR_BYTES - 1]

    def __getitem__(self, index: int):
        placeholder = (np.zeros((8, 8, 3), np.uint8), 0)
        if self.failed.value:
            return placeholder
        try:
            image, label = self.split[index]
        except DatasetError as exc:
            self._fail(str(exc))
            return placeholder
        except Exception as exc:  # noqa: BLE001 - anything else still must not kill the worker
            self._fail(f"{getattr(self.split, 'origin', 'source')}[{index}]: {type(exc).__name__}: {exc}")
            return placeholder
        height, width = image.shape[:2]
        scale = 1.0 if self.max_resolution is None else min(1.0, self.max_resolution / max(height, width))
        if int(height * scale) * int(width * scale) * 3 > self.max_bytes:
            where = self.split.paths[index] if hasattr(self.split, "paths") else f"{self.split.origin}[{index}]"
            self._fail(f"{where}: image of {width}x{height} px is too large to store raw "
                       f"(use --max-resolution or --write-mode jpg)")
            return placeholder
        flat = image.reshape(-1, 3)
        sums = flat.sum(axis=0, dtype=np.int64)
        squares = np.einsum("ij,ij->j", flat, flat, dtype=np.int64)
        with self.moments.get_lock():
            for c in range(3):
                self.moments[c] += float(sums[c])
                self.moments[3 + c] += float(squares[c])
            self.moments[6] += float(len(flat))
        return image, label

    def error(self) -> Optional[str]:
        return self.message.value.decode("utf-8", "replace") if self.failed.value else None

    def mean_std(self):
        m = list(self.moments)
        count = max(m[6], 1.0)
        mean = [m[c] / count for c in range(3)]
        std = [max(m[3 + c] / count - mean[c] ** 2, 0.0) ** 0.5 for c in range(3)]
        return mean, std


class _ProgressShim:
    """Stands in for the tqdm bar inside ``ffcv.writer`` so the caller owns the terminal."""

    def __init__(self, split: str, progress: Optional[ProgressFn], total: int = 0, **_):
        self.split, self.progress, self.total, self.done = split, progress, int(total), 0
        if progress:
            progress(split, 0, self.total)

    def update(self, n: int = 1) -> None:
        self.done += int(n)
        if self.progress:
            self.progress(self.split, self.done, self.total)

    def close(self) -> None:
        pass


@contextmanager
def _ffcv_progress(split: str, progress: Optional[ProgressFn]):
    import ffcv.writer

    if not hasattr(ffcv.writer, "tqdm"):  # a newer ffcv without the module-level tqdm: no progress, still works
        yield
        return
    with mock.patch.object(ffcv.writer, "tqdm", lambda *a, **k: _ProgressShim(split, progress, *a, **k)):
        yield


def _write_split(split_name: str, guarded: _GuardedSplit, tmp: Path, *, write_mode: str, max_resolution,
                 jpeg_quality: int, workers: int, progress: Optional[ProgressFn]) -> None:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    image_field = RGBImageField(write_mode=write_mode, max_resolution=max_resolution, jpeg_quality=jpeg_quality,
                                smart_threshold=SMART_THRESHOLD if write_mode == "smart" else None)
    # Starting a writer process costs about a second here (fork of a process holding torch and numba), so
    # small splits get fewer of them.
    workers = max(1, min(workers, len(guarded) // MIN_IMAGES_PER_WORKER))
    writer = DatasetWriter(str(tmp), {"image": image_field, "label": IntField()}, page_size=PAGE_SIZE,
                           num_workers=workers)
    # Small chunks keep both workers busy on small splits and make the progress bar move.
    chunksize = max(1, min(100, len(guarded) // (4 * workers) or 1))
    with _ffcv_progress(split_name, progress):
        writer.from_indexed_dataset(guarded, chunksize=chunksize)


def _check_options(write_mode, max_resolution, jpeg_quality, workers, limit) -> None:
    if write_mode not in WRITE_MODES:
        raise DatasetError(f"--write-mode {write_mode}: choose from {', '.join(WRITE_MODES)}")
    if max_resolution is not None and max_resolution < 8:
        raise DatasetError(f"--max-resolution {max_resolution}: must be at least 8")
    if not 1 <= jpeg_quality <= 100:
        raise DatasetError(f"--jpeg-quality {jpeg_quality}: must be in 1..100")
    if workers < 1:
        raise DatasetError(f"--workers {workers}: must be at least 1")
    if limit is not None and limit < 1:
        raise DatasetError(f"--limit {limit}: must be at least 1")


def default_workers() -> int:
    """Writer processes by default: the CPUs this process may use, at most 8."""
    return max(1, min(8, len(os.sched_getaffinity(0))))


def convert_dataset(kind: str, out: os.PathLike, *, src: Optional[os.PathLike] = None, write_mode: str = "raw",
                    max_resolution: Optional[int] = None, jpeg_quality: int = 90, workers: Optional[int] = None,
                    limit: Optional[int] = None, force: bool = False,
                    progress: Optional[ProgressFn] = None) -> Dict:
    """Convert the dataset ``kind`` at ``src`` into ``out/{train,val}.beton`` and ``out/meta.json``.

    Parameters
    ----------
    kind : str
        One of :data:`nps.datasets.sources.READERS` (``idx``, ``fashion-mnist``, ``cifar10``, ``cifar100``,
        ``imagefolder``, ``npz``).
    out : path
        Output directory (created if missing).
    src : path, optional
        Source folder or file; ``fashion-mnist`` defaults to Debian's ``/usr/share/datasets/fashion-mnist/``.
    write_mode : str
        ``raw`` (uint8 pixels), ``jpg`` (JPEG at ``jpeg_quality``) or ``smart`` (JPEG above 32 KiB of pixels).
    max_resolution : int, optional
        Downscale images whose longer side exceeds this (aspect kept), before storing.
    jpeg_quality : int
        JPEG quality for ``jpg``/``smart``.
    workers : int, optional
        Writer processes (default: available CPUs, at most 8).
    limit : int, optional
        Keep only the first ``limit`` images of each split (quick trials).
    force : bool
        Overwrite existing output.
    progress : callable, optional
        ``progress(split, done, total)``, called from this process as images are written.

    Returns
    -------
    dict
        The ``meta.json`` content.
    """
    workers = default_workers() if workers is None else int(workers)
    _check_options(write_mode, max_resolution, jpeg_quality, workers, limit)
    out = Path(out)
    finals = {split: out / f"{split}.beton" for split in SPLITS}
    if not force:
        for path in [*finals.values(), out / META_NAME]:
            if path.exists():
                raise DatasetError(f"{path}: already exists (use --force to overwrite)")
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out}: exists and is not a directory")

    source = read_source(kind, src)
    splits = {"train": source.train.head(limit), "val": source.val.head(limit)}
    for name, split in splits.items():
        if len(split) == 0:
            raise DatasetError(f"{getattr(split, 'origin', source.path)}: the {name} split is empty")
    log.info("read %s from %s: %d train, %d val images, %d classes", kind, source.path, len(splits["train"]),
             len(splits["val"]), len(source.classes))

    created = [p for p in (out, *out.parents) if not p.exists()]  # removed again if the conversion fails
    out.mkdir(parents=True, exist_ok=True)
    tmps = {split: out / f".{split}.beton.tmp" for split in SPLITS}
    stats = {}
    try:
        for name in SPLITS:
            tmps[name].unlink(missing_ok=True)
            guarded = _GuardedSplit(splits[name], PAGE_SIZE if write_mode == "raw" else 1 << 62, max_resolution)
            _write_split(name, guarded, tmps[name], write_mode=write_mode, max_resolution=max_resolution,
                         jpeg_quality=jpeg_quality, workers=workers, progress=progress)
            if guarded.error():
                raise DatasetError(guarded.error())
            stats[name] = guarded.mean_std()
        digest, summaries = fingerprint((name, tmps[name]) for name in SPLITS)
        for name in SPLITS:
            summary = summaries[name]
            if summary.count != len(splits[name]) or not np.array_equal(summary.labels, splits[name].labels):
                raise DatasetError(f"{tmps[name]}: read back {summary.count} samples whose labels differ from the "
                                   f"{len(splits[name])} written (writer failure)")
    except BaseException:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
        for made in created:  # nearest first: a directory this call made, left empty, goes again
            try:
                made.rmdir()
            except OSError:
                break
        raise

    train, val = summaries["train"], summaries["val"]
    heights = np.concatenate([train.heights, val.heights])
    widths = np.concatenate([train.widths, val.widths])
    constant = bool((heights == heights[0]).all() and (widths == widths[0]).all())
    source_channels = int(getattr(source.train, "channels", 3))
    mean, std = stats["train"]
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "kind": kind, "source": os.path.abspath(source.path), "source_files": source.files,
        "files": {name: finals[name].name for name in SPLITS},
        "counts": {name: summaries[name].count for name in SPLITS},
        "classes": source.classes, "num_classes": len(source.classes),
        "label_histogram": {name: summaries[name].label_histogram(len(source.classes)) for name in SPLITS},
        "image_shape": [int(heights[0]), int(widths[0])] if constant else None,
        "min_size": [int(heights.min()), int(widths.min())], "max_size": [int(heights.max()), int(widths.max())],
        "source_channels": source_channels, "stored_channels": 3, "grayscale_replicated": source_channels == 1,
        "mean": [round(v, 4) for v in mean], "std": [round(v, 4) for v in std],
        "write_mode": write_mode, "max_resolution": max_resolution, "jpeg_quality": jpeg_quality, "limit": limit,
        "stored_modes": {name: {"raw": int((summaries[name].modes == 1).sum()),
                                "jpg": int((summaries[name].modes == 0).sum())} for name in SPLITS},
        "fingerprint": digest, "fingerprint_method": FINGERPRINT_METHOD,
        "nps_version": nps_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (out / META_NAME).unlink(missing_ok=True)
    for name in SPLITS:
        os.replace(tmps[name], finals[name])
    write_json_atomic(out / META_NAME, meta)
    log.info("wrote %s (fingerprint %s)", out, digest[:16])
    return meta


def verify_dataset(data_dir: os.PathLike) -> Dict:
    """Re-read ``data_dir`` and check counts, label histograms and the fingerprint against ``meta.json``.

    Returns
    -------
    dict
        ``{"counts": ..., "fingerprint": ..., "ok": True}``; a mismatch raises :class:`DatasetError`.
    """
    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    paths = [(name, data_dir / meta["files"].get(name, f"{name}.beton")) for name in SPLITS]
    digest, summaries = fingerprint(paths)
    for name, path in paths:
        summary = summaries[name]
        if summary.count != meta["counts"].get(name):
            raise DatasetError(f"{path}: holds {summary.count} images, meta.json says {meta['counts'].get(name)}")
        if summary.count and (int(summary.labels.max()) >= meta["num_classes"] or int(summary.labels.min()) < 0):
            raise DatasetError(f"{path}: label outside the class range 0..{meta['num_classes'] - 1}")
        histogram = summary.label_histogram(meta["num_classes"])
        if histogram != meta["label_histogram"].get(name):
            raise DatasetError(f"{path}: label histogram {histogram} differs from meta.json")
    if digest != meta["fingerprint"]:
        raise DatasetError(f"{data_dir}: fingerprint {digest[:16]}... differs from meta.json "
                           f"({str(meta['fingerprint'])[:16]}...): the files changed since conversion")
    return {"counts": {n: s.count for n, s in summaries.items()}, "fingerprint": digest, "ok": True}

