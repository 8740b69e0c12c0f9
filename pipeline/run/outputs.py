"""What the driver writes beside results.h5: kept weights, the base network, and the two-stage top-k spaces.

Kept weights (``[output] keep_weights``) arrive with row results, as the bytes of their ``.pt`` file or staged where
the worker made them (:class:`~nps.pipeline.run.protocol.StagedWeights`), and are put at
``weights/<space key>/<row>.pt`` (the layout :mod:`nps.pipeline.deploy.export` reads) by :class:`WeightsKeeper`: bytes are
written, a staged file is moved, an object in a transport's store is fetched (the pool does the moving); weights it
does not keep are released unread. With ``topk`` it keeps a space's ``top_k`` rows by top-1 as results come in: a row outside
the current top-k can never enter it later (only better rows can push rows out), so its weights are never written,
and a row pushed out loses its file at once. A space's end trims once more from the file, which also covers weights
left by an earlier run.

Two-stage (``[two_stage] enabled``): when every row of a space has finished, :func:`top_space_rows` picks its
``top_k`` rows by top-1 (adaptive-BN top-1, then row, break ties) and the driver adds them, recipes and seeds
unchanged, as the space ``<space key>#top`` retrained for ``full_epochs`` by the parent's spec.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from nps.pipeline.files import write_atomic  # noqa: F401 - the driver writes base.pt through outputs.write_atomic
from nps.pipeline.results.reader import DONE, RECIPE_FIELDS
from nps.pipeline.training.spec import SpaceSpec


def _rank_key(top1: float, row: int) -> tuple[float, int]:
    """Sort key of the top-k: higher top-1 first, then the lower row (NaN ranks last)."""
    return (-(top1 if np.isfinite(top1) else -1.0), int(row))


class WeightsKeeper:
    """Writes and removes ``weights/<space>/<row>.pt`` by the ``keep_weights`` policy."""

    def __init__(self, results_path: str, policy: str, top_k: int, pool):
        self.results_path, self.policy, self.top_k = results_path, policy, int(top_k)
        self.pool = pool  # moves (or fetches) the weights it keeps, releases the others
        self._kept: dict[str, dict[int, float]] = {}

    @property
    def wanted(self) -> bool:
        """Whether workers should send weights back at all."""
        return self.policy != "none"

    def threshold(self, space: str) -> float:
        """The top-1 a new row of ``space`` must reach to be kept: with ``topk`` and top_k rows kept already, the
        worst of them (a tie may still win on its lower row number); else -inf. Tasks carry it, so workers send only
        weights that can be kept."""
        kept = self._kept.get(space, {})
        if self.policy != "topk" or len(kept) < self.top_k:
            return float("-inf")
        return min(kept.values())

    def _path(self, space: str, row: int) -> Path:
        from nps.pipeline.results.weights_files import weights_path

        return weights_path(self.results_path, space, row)

    def start_space(self, space: str, status: np.ndarray, top1: np.ndarray) -> None:
        """What an earlier run kept of this space (rows with weights on disk, among its done rows)."""
        from nps.pipeline.results.weights_files import saved_weight_rows

        kept = {}
        for row in saved_weight_rows(self.results_path, space):
            if row < status.size and status[row] == DONE:
                kept[row] = float(top1[row])
        self._kept[space] = kept

    def add(self, space: str, row: int, top1: float, weights) -> bool:
        """A done row's weights (bytes or staged): kept if the policy keeps them (topk: if the row ranks in the top_k
        so far), else released. False when staged weights could not be fetched (the row stays without them)."""
        if weights is None:
            return True
        if self.policy == "none":
            self.pool.release_weights(weights)
            return True
        kept = self._kept.setdefault(space, {})
        top1 = float(np.float32(top1))  # ranked as the file stores it, so the final trim agrees
        pushed_out = []
        if self.policy == "topk":
            ranked = sorted([*kept.items(), (row, top1)], key=lambda rt: _rank_key(rt[1], rt[0]))
            if row not in [r for r, _ in ranked[: self.top_k]]:
                self.pool.release_weights(weights)
                return True
            pushed_out = [r for r, _ in ranked[self.top_k:]]
        if not self.pool.commit_weights(weights, self._path(space, row)):
            return False
        for r in pushed_out:
            self._remove(space, r)
        kept[row] = top1
        return True

    def _remove(self, space: str, row: int) -> None:
        self._kept.get(space, {}).pop(row, None)
        try:
            os.remove(self._path(space, row))
        except OSError:
            pass

    def finish_space(self, space: str, status: np.ndarray, top1: np.ndarray) -> None:
        """``topk``: remove the weights of rows outside the space's final top_k by top-1."""
        if self.policy != "topk":
            return
        from nps.pipeline.results.weights_files import saved_weight_rows

        done = np.flatnonzero(status == DONE)
        keep = set(done[np.argsort(-np.nan_to_num(top1[done], nan=-1), kind="stable")][: self.top_k].tolist())
        for row in saved_weight_rows(self.results_path, space):
            if row not in keep:
                self._remove(space, row)


def top_space_rows(store, space: str, top_k: int) -> tuple[np.ndarray, dict]:
    """(the parent rows chosen, the recipe fields of those rows) for the two-stage space of ``space``."""
    cols = store.read(space, ["status", "top1", "bn_top1"] + list(RECIPE_FIELDS))
    done = np.flatnonzero(cols["status"] == DONE)
    order = done[np.lexsort((-np.nan_to_num(cols["bn_top1"][done], nan=-1),
                             -np.nan_to_num(cols["top1"][done], nan=-1)))]
    chosen = np.sort(order[:top_k])
    return chosen, {k: cols[k][chosen] for k in RECIPE_FIELDS}


def top_space_attrs(store, space: str, chosen: np.ndarray, top_k: int) -> dict:
    """The ``#top`` space's attributes: the parent's constraints, where it came from."""
    attrs = {k: v for k, v in store.file["spaces"][space].attrs.items()
             if k not in ("epochs", "groups", "retrain_spec", "criterion")}
    name = attrs.get("space", space)
    name = name.decode() if isinstance(name, bytes) else str(name)
    from nps.kernels.spaces import TOP_SUFFIX

    attrs.update(space=f"{name}{TOP_SUFFIX}", stage="top", parent=space, parent_rows=chosen.astype(np.int64),
                 top_k=int(top_k))
    return attrs


def top_space_spec(parent: SpaceSpec, full_epochs: int) -> SpaceSpec:
    """The parent's recipe over ``full_epochs``."""
    return SpaceSpec(parent.retrain.with_epochs(full_epochs), parent.criterion)


def start_top_space(ledger, store, weights: WeightsKeeper, space: str, two_stage):
    """The two-stage space of a finished sampled ``space`` (``[two_stage]``): added to the ledger and the file,
    ``(its key, the parent rows chosen)``; the rows are empty when none finished (nothing added). None when there is
    nothing to do (two-stage off, or the space has its top space already)."""
    from nps.kernels.spaces import TOP_SUFFIX

    top = space + TOP_SUFFIX
    if not two_stage.enabled or space.endswith(TOP_SUFFIX) or top in ledger.spaces:
        return None
    chosen, rows = top_space_rows(store, space, two_stage.top_k)
    if chosen.size == 0:
        return top, chosen
    attrs = top_space_attrs(store, space, chosen, two_stage.top_k)
    added = ledger.add_space(top, rows, top_space_spec(ledger.spaces[space].spec, two_stage.full_epochs), attrs)
    weights.start_space(top, added.status, added.top1)
    return top, chosen
