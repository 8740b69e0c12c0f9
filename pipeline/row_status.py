"""A row's status: one enum for the engine, the ledger, the results file and the views.

The values are the codes results.h5 stores in each space's ``status`` column (DESIGN.md), so a numpy column compares
with them directly (``status == RowStatus.DONE``).
"""
from __future__ import annotations

import enum


class RowStatus(enum.IntEnum):
    PENDING = 0
    RUNNING = 1
    DONE = 2
    FAILED = 3

    @property
    def label(self) -> str:
        """``pending``, ``running``, ``done`` or ``failed``: how files, logs and views spell it."""
        return self.name.lower()
