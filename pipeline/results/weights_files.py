"""Where a results file's kept weights are: ``<dir of results.h5>/weights/<space key>/<row>.pt`` (written by the run
driver for the rows ``[output] keep_weights`` keeps), and which space a short name means. Paths only: no torch."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

from nps.pipeline.errors import NpsError

WEIGHTS_DIR = "weights"
KEEP_WEIGHTS_HINT = ("the run driver saves fine-tuned weights as weights/<space>/<row>.pt beside results.h5 for the "
                     "best rows of each space (see README, 'Reports and export'); re-run those rows with weight "
                     "saving on")


def _check_space_name(space: str) -> str:
    if not space or "/" in space or "\\" in space or space in (".", "..") or "\0" in space:
        raise NpsError(f"space {space!r} is not a valid space name (a group name of results.h5, without '/')")
    return space


def check_row(row) -> int:
    """A row index: a non-negative integer, else one NpsError line."""
    if isinstance(row, bool) or not isinstance(row, (int, np.integer)) or row < 0:
        raise NpsError(f"row {row!r}: a row index is a non-negative integer")
    return int(row)


def weights_path(results_path: str | os.PathLike, space: str, row: int) -> Path:
    """``<dir of results.h5>/weights/<space>/<row>.pt``: where the fine-tuned weights of one row are kept."""
    return Path(results_path).resolve().parent / WEIGHTS_DIR / _check_space_name(space) / f"{check_row(row)}.pt"


def saved_weight_rows(results_path: str | os.PathLike, space: str) -> list[int]:
    """Rows of ``space`` whose weights are kept, ascending."""
    folder = weights_path(results_path, space, 0).parent
    if not folder.is_dir():
        return []
    return sorted(int(p.stem) for p in folder.glob("*.pt") if p.stem.isdigit())


def resolve_space(spaces: Iterable[str], name: str) -> str:
    """The space key meant by ``name``: itself, or the one key whose space part (``std-0.05#top`` for the two-stage
    space) it is."""
    from nps.kernels.spaces import parse_space_key

    spaces = list(spaces)
    if name in spaces:
        return name
    matches = [s for s in spaces if (k := parse_space_key(s)) is not None and k.label == name]
    if len(matches) == 1:
        return matches[0]
    listing = ", ".join(spaces) or "none"
    if matches:
        raise NpsError(f"--space {name!r} is in several regimes ({', '.join(matches)}); give the full name")
    raise NpsError(f"--space {name!r}: no such space in the file (spaces: {listing})")
