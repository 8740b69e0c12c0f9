"""The ImageNet-style tree reader: ``SRC/train/<class>/*.jpg`` and ``SRC/val/<class>/*.jpg``.

Classes are the sub-directories of ``train/`` sorted by name (as ``torchvision.datasets.ImageFolder`` sorts them);
``val/`` may hold a subset of them and its labels use the train index. Files are listed like torchvision lists them
(recursive walk in sorted order, extensions matched case-insensitively), so item ``i`` here is item ``i`` there.
Images are decoded lazily with Pillow, one per ``__getitem__``, in the writer's worker processes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from nps.datasets.errors import DatasetError
from nps.datasets.source import Source

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageFolderSplit:
    """One split of an image tree: file paths and labels, images decoded on access.

    Parameters
    ----------
    paths : list of str
        Image files, in dataset order.
    labels : np.ndarray
        The class index of each file.
    origin : str
        The split's folder (used in error messages).
    """

    channels = 3
    image_shape = None  # unknown until decoded; images may differ in size

    def __init__(self, paths: List[str], labels: np.ndarray, origin: str):
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.origin = origin

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tuple[np.ndarray, int]:
        from PIL import Image

        path = self.paths[index]
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for a bad file
            raise DatasetError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from None
        if pixels.ndim != 3 or pixels.shape[0] == 0 or pixels.shape[1] == 0:
            raise DatasetError(f"{path}: unreadable image (decoded shape {pixels.shape})")
        return np.ascontiguousarray(pixels), int(self.labels[index])

    def head(self, limit: Optional[int]) -> "ImageFolderSplit":
        """The first ``limit`` items (all of them when ``limit`` is None)."""
        if limit is None:
            return self
        return ImageFolderSplit(self.paths[:limit], self.labels[:limit], self.origin)


def _list_images(class_dir: Path) -> List[str]:
    found = []
    for root, _, files in sorted(os.walk(class_dir, followlinks=True)):
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.join(root, name))
    return found


def _scan_split(split_dir: Path, classes: Optional[List[str]]) -> Tuple[List[str], List[str], np.ndarray]:
    if not split_dir.is_dir():
        raise DatasetError(f"{split_dir}: missing split directory")
    names = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    if not names:
        raise DatasetError(f"{split_dir}: no class directories")
    if classes is None:
        classes = names
    index = {name: i for i, name in enumerate(classes)}
    paths: List[str] = []
    labels: List[int] = []
    for name in names:
        if name not in index:
            raise DatasetError(f"{split_dir / name}: class '{name}' is not a class of train/ "
                               f"(label outside the class range)")
        files = _list_images(split_dir / name)
        if not files:
            raise DatasetError(f"{split_dir / name}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
        paths.extend(files)
        labels.extend([index[name]] * len(files))
    return classes, paths, np.asarray(labels, dtype=np.int64)


def read_imagefolder(src: str, *, kind: str = "imagefolder") -> Source:
    """Read the tree ``src/train/<class>/...`` and ``src/val/<class>/...``."""
    root = Path(src)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory")
    classes, train_paths, train_labels = _scan_split(root / "train", None)
    _, val_paths, val_labels = _scan_split(root / "val", classes)
    train = ImageFolderSplit(train_paths, train_labels, str(root / "train"))
    val = ImageFolderSplit(val_paths, val_labels, str(root / "val"))
    return Source(kind, str(root), train, val, list(classes), [str(root / "train"), str(root / "val")])
