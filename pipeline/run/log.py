"""``out/log.jsonl``: one JSON line per event of a run (start, ready, base, dispatch, done, failed, requeue,
worker_lost, two_stage, base_done, task_error, task_environment, weights_lost, end), appended across resumes: which
row was trained when and where.

A row's line is its :class:`~nps.pipeline.run.state.RowFinished`, the same object the views print. A write that
fails (a full disk) turns the log off and is reported once through :attr:`RunLog.failure`; the run stops on it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

from nps.pipeline.errors import environment_error
from nps.pipeline.run.state import RowFinished

LOG_NAME = "log.jsonl"


class RunLog:
    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, LOG_NAME)
        self._file = open(self.path, "a", encoding="utf-8")
        self.failure: str | None = None

    def write(self, event: str, **fields) -> None:
        if self._file is None:
            return
        try:
            self._file.write(json.dumps({"t": round(time.time(), 3), "event": event, **fields}, default=float) + "\n")
            self._file.flush()
        except OSError as exc:  # a full disk: the run stops on `failure`; the log stays as it was
            self.failure = environment_error(exc, self.path) or f"{self.path}: {exc}"
            self._close()

    def row(self, row: RowFinished) -> None:
        fields = {k: v for k, v in dataclasses.asdict(row).items() if k != "status"}
        if row.status.label == "failed":
            for name in ("top1", "top5", "bn_top1", "acc_drop", "train_s"):
                fields.pop(name)
        else:
            fields.pop("error")
        self.write(row.status.label, **fields)

    def _close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None

    def close(self) -> None:
        self._close()
