"""How a member of a cohort is built from the base network, per kind of pruning (a registry: kind -> builder).

A filter member is the base network physically pruned to its keep counts (:func:`nps.pipeline.network.prune.
prune_model`, channels ranked by the space's criterion); a weight member is a copy of the base network whose
smallest weights per layer are masked (:func:`nps.pipeline.network.masks.masked_copy`).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from nps.pipeline.network.masks import masked_copy
from nps.pipeline.network.prune import prune_model
from nps.pipeline.network.pruning_kind import FILTERS, WEIGHTS, PruningKind


def _filter_member(model, table, keep, criterion: str, seed: int):
    return prune_model(model, table, keep, criterion, int(seed))


def _weight_member(model, table, keep, criterion: str, seed: int):  # magnitude masks: no criterion, no seed
    return masked_copy(model, table, keep)


BUILDERS: dict[PruningKind, Callable[..., Any]] = {FILTERS: _filter_member, WEIGHTS: _weight_member}


def member_factory(kind: PruningKind, model, table, keep, criterion: str, seed: int) -> Callable[[], Any]:
    """A function that builds one member (an ``nn.Module``) of ``kind`` from the base ``model`` for ``keep``
    (counted in ``table``: the kind's own table)."""
    build, keep = BUILDERS[kind], np.asarray(keep)
    return lambda: build(model, table, keep, criterion, seed)
