"""The format of a results file: which layout a results.h5 has, and what this nps does with a file of another one.

A results file names its format in the root attribute ``format_version`` (an integer). Files written before that
attribute existed (nps 0.1.0 up to commit f03adfa) have none and are format 1. Every nps reads every format up to
its own :data:`FORMAT_VERSION` (a later format only adds to what the file holds, so the reader treats what a format
added as optional); a file of a newer format is refused in one line naming both formats and what to do, by every
command that opens one (``nps run`` resuming it, ``status``, ``report``, ``table``, ``export``, ``latency``), before
anything is read from it. docs/results-format.md describes the layout and each format's additions.

A writer (``nps run`` resuming, ``nps latency`` storing timings) records the current format on an older file when it
first writes to it, as far as each newer format allows (:attr:`FormatVersion.restamp`): a format whose additions
the rows written before it do not need. A format that rows must have to be that format (a column every row fills)
has ``restamp`` False: an older file keeps its number, and readers keep reading it as what it is.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from nps.pipeline.errors import NpsError

ATTR = "format_version"
FIRST = 1  # the format of a file without ATTR


@dataclass(frozen=True)
class FormatVersion:
    """One format of results.h5 and what it added to the one before."""

    number: int
    added: str
    restamp: bool  # a writer of this nps may record this format on a file of the format before by writing to it


VERSIONS: tuple[FormatVersion, ...] = (
    FormatVersion(1, "root attrs (config, base_*, dataset_*, experiment, nps_version, created), /layers, "
                     "/spaces/<space key>, /weight_layers, /references/<model>, /latency/<device>", restamp=False),
    FormatVersion(2, f"the root attribute {ATTR}; nothing else changed", restamp=True),
    FormatVersion(3, "the learning curves of the base network and the references nps trains: the groups /base/curve "
                     "and /references/<model>/curve", restamp=True),
    FormatVersion(4, "latency regimes: the latency model (/latency_model: device, batch, threads, precision, per-layer "
                     "coefficients and errors) and its form over the groups in /layers (latency_* datasets, "
                     "base_latency); reference trainings of several seeds (/references/<model>#<i>, attrs name and "
                     "seed)", restamp=True),
)
FORMAT_VERSION = VERSIONS[-1].number  # the format this nps writes, and the newest it reads
PURPOSES = ("read", "write")


def file_format(attrs: Mapping[str, Any], path: str) -> int:
    """The format of the results file ``path`` whose root attributes are ``attrs`` (1 without ``format_version``);
    one NpsError line when the attribute is not a format number."""
    value = attrs.get(ATTR)
    if value is None:
        return FIRST
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= FIRST:
        return int(value)
    shown = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    shown = shown.item() if isinstance(shown, np.generic) else shown
    raise NpsError(f"{path}: its root attribute {ATTR} is {shown!r}, not a results format number (1, 2, ...); the "
                   "file is damaged: restore a complete copy")


def check_format(attrs: Mapping[str, Any], purpose: str, path: str) -> int:
    """The format of the results file ``path`` (root attributes ``attrs``) when this nps can ``purpose`` ("read" or
    "write") it, i.e. any format up to :data:`FORMAT_VERSION`; else one NpsError line naming the file's format, the
    newest this nps reads, and what to do."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    found = file_format(attrs, path)
    if found <= FORMAT_VERSION:
        return found
    writer = attrs.get("nps_version")
    writer = writer.decode("utf-8", "replace") if isinstance(writer, bytes) else writer
    by = f" (written by nps {writer})" if writer else ""
    raise NpsError(f"{path} is results format {found}{by}; this nps reads results formats up to {FORMAT_VERSION}: "
                   f"upgrade nps (pip install -U nps) to {purpose} it")


def format_after_write(found: int) -> int:
    """The format a writer of this nps records on a file of format ``found`` that it writes to: each newer format in
    turn, while that format allows it (:attr:`FormatVersion.restamp`)."""
    number = found
    for version in VERSIONS:
        if version.number == number + 1 and version.restamp:
            number = version.number
    return number
