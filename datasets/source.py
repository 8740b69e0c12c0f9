"""What a reader of a raw dataset returns: a :class:`Source` of two splits (:class:`ArraySplit` for in-memory
formats), shared by the readers of array formats (:mod:`nps.datasets.sources`) and of ImageFolder trees
(:mod:`nps.datasets.imagefolder`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np

from nps.datasets.errors import DatasetError


class ArraySplit:
    """One split held in memory as ``N x H x W`` or ``N x H x W x C`` uint8 pixels and ``N`` integer labels.

    Parameters
    ----------
    images : np.ndarray
        uint8 pixels, ``N x H x W`` (grayscale) or ``N x H x W x C`` with ``C`` in {1, 3}.
    labels : np.ndarray
        Integer labels, one per image.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if images.ndim == 4 and images.shape[3] == 1:
            images = images[..., 0]
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.channels = 1 if images.ndim == 3 else 3

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Tuple[np.ndarray, int]:
        image = self.images[index]
        if self.channels == 1:
            image = np.repeat(image[:, :, None], 3, axis=2)
        return np.ascontiguousarray(image), int(self.labels[index])

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """``(H, W, C)`` of the source pixels (``C`` = 1 for grayscale)."""
        return (int(self.images.shape[1]), int(self.images.shape[2]), self.channels)

    def head(self, limit: Optional[int]) -> "ArraySplit":
        """The first ``limit`` items (all of them when ``limit`` is None)."""
        if limit is None:
            return self
        return ArraySplit(self.images[:limit], self.labels[:limit])


@dataclass
class Source:
    """A dataset read from its raw format: two splits, the class names and the files it came from."""

    kind: str
    path: str
    train: object
    val: object
    classes: List[str]
    files: List[str] = field(default_factory=list)

    def check_labels(self) -> None:
        """Refuse labels outside ``[0, len(classes))``, naming the offending split."""
        for name, split in (("train", self.train), ("val", self.val)):
            labels = split.labels
            bad = (labels < 0) | (labels >= len(self.classes))
            if bad.any():
                where = int(np.flatnonzero(bad)[0])
                origin = getattr(split, "origin", None) or f"{self.path} ({name})"
                raise DatasetError(
                    f"{origin}: label {int(labels[where])} at index {where} is outside the class range "
                    f"0..{len(self.classes) - 1}"
                )


def inferred_classes(labels: np.ndarray, origin: str) -> List[str]:
    """Class names ``0..K-1`` of a format that does not declare its classes (IDX, npz), K = the largest train label
    + 1, after checking that every one of them has training images: a gap (labels 0..9 and one 200) is a corrupt
    label, not 191 new classes."""
    labels = np.asarray(labels)
    if labels.size and labels.min() < 0:
        raise DatasetError(f"{origin}: label {int(labels.min())} is negative; labels are 0..K-1")
    counts = np.bincount(labels, minlength=1) if labels.size else np.zeros(1, np.int64)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise DatasetError(f"{origin}: labels run 0..{counts.size - 1} but {empty.size} of those {counts.size} classes "
                           f"have no training image (first: {int(empty[0])}); a corrupt label? labels must be 0..K-1 "
                           "with every class present")
    return [str(c) for c in range(counts.size)]
