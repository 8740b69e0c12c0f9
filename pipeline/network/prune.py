"""One-shot filter pruning: a physically smaller copy of a CNN keeping the most important channels of every group.

Importance criteria (``CRITERIA``), all computed on the weights in float64 on the CPU:

- ``l2`` (the paper's default, §2.1) and ``l1``: the norm of each filter;
- ``fpgm`` (He et al. 2019, "Filter pruning via geometric median"): the sum of Euclidean distances from a filter to
  every other filter of the layer; filters near the geometric median (small sum) are redundant and go first;
- ``random``: a seeded permutation (the weights are not read, so a meta-device model works).

A group's channels are written by several layers (its *members*: the convs of a residual stream, a depthwise conv
and the squeeze-excitation gate of an inverted residual…); their scores are summed over the members so that all of
them keep the same channel indices. Ties are broken towards the lower index, so the result is deterministic. A group
with a grouped conv on it keeps the same positions in every conv group (scores summed over the groups), as
Torch-Pruning does.

The pruned copy is the same ``nn.Module`` class with smaller tensors: every conv, linear, normalisation layer and
per-channel parameter (ConvNeXt's layer scale) the channel analysis found (:mod:`nps.pipeline.network.channel_graph`) is
sliced, and the layers' size attributes (``in_channels``, ``groups``, ``num_features``, ``normalized_shape``…)
follow. The original model is not modified, and tensors that are pruned are never copied at full size.
"""
from __future__ import annotations

import copy
import weakref
from typing import Callable

import numpy as np
import torch
from torch import nn

from nps.pipeline.catalog import CRITERIA as CRITERIA_NAMES
from nps.pipeline.errors import NpsError
from nps.pipeline.network.channel_graph import ChannelGraph, Seg
from nps.pipeline.network.layer_table import GroupSelection, LayerTable, select_groups
from nps.pipeline.network.trace import analyze

FilterScorer = Callable[[torch.Tensor], torch.Tensor]
"""Filter weights (out, in·k·k) in float64 → one importance score per filter (larger = more important)."""


def _l2_scores(filters: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(filters, ord=2, dim=1)


def _l1_scores(filters: torch.Tensor) -> torch.Tensor:
    return filters.abs().sum(dim=1)


def _fpgm_scores(filters: torch.Tensor) -> torch.Tensor:
    # Pairwise distances through the Gram matrix (float64 keeps the cancellation harmless): one matmul instead
    # of an (out × out × in·k·k) difference tensor.
    squares = (filters * filters).sum(dim=1)
    distances = (squares[:, None] + squares[None, :] - 2.0 * filters @ filters.T).clamp_min_(0.0).sqrt_()
    distances.fill_diagonal_(0.0)
    return distances.sum(dim=1)


CRITERIA: dict[str, FilterScorer | None] = {"l2": _l2_scores, "l1": _l1_scores, "fpgm": _fpgm_scores, "random": None}
"""Filter-importance criteria by name; ``random`` has no scorer (it draws a seeded permutation)."""
assert tuple(CRITERIA) == CRITERIA_NAMES

# The channel analysis of each model object, per table layout: a worker prunes many subnetworks of one base, and
# tracing it again for each would cost more than the pruning.
_PLANS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _check_criterion(criterion: str) -> None:
    if criterion not in CRITERIA:
        raise NpsError(f"unknown pruning criterion {criterion!r}; known criteria: {', '.join(CRITERIA)}")


def pruning_plan(model: nn.Module, table: LayerTable) -> tuple[ChannelGraph, GroupSelection]:
    """The channel analysis of ``model`` and its groups as ``table`` lists them (cached per model object);
    NpsError when the model does not match the table."""
    key = (table.mode, table.resolution, table.in_channels, table.channel_multiple)
    plans = _PLANS.setdefault(model, {})
    if key not in plans:
        hint = f"the model does not match the layer table of {table.model} ({table.mode} mode)"
        try:
            graph, gm = analyze(model, table.resolution, table.in_channels)
        except NpsError as exc:
            raise NpsError(f"{hint}: {exc}") from None
        selection = select_groups(graph, table.mode, table.channel_multiple)
        outputs = [n for n in gm.graph.nodes if n.op == "output"]
        out_shape = _output_shape(outputs[0]) if outputs else None
        if [c.name for c in selection.classes] != list(table.names) or \
                [c.size for c in selection.classes] != [int(c) for c in table.channels] or \
                [c.members for c in selection.classes] != list(table.members) or \
                list(selection.granularity) != [int(g) for g in table.granularity] or \
                (out_shape is not None and out_shape[-1] != table.num_classes):
            raise NpsError(hint)
        plans[key] = (graph, selection)
    return plans[key]


def _output_shape(node) -> tuple | None:
    value = node.args[0]
    return value.meta.get("nps_shape") if hasattr(value, "meta") else None


def _member_rows(graph: ChannelGraph, name: str, root: int) -> list[tuple[int, int]]:
    """(start, stop) rows of layer ``name``'s weight that hold the channels of class ``root``."""
    rows, offset = [], 0
    for seg in graph.weights[name].out:
        if graph.root(seg.var) == root:
            rows.append((offset, offset + seg.length))
        offset += seg.length
    return rows


def _group_indices(graph: ChannelGraph, selection: GroupSelection, keep: np.ndarray, criterion: str,
                   seed: int) -> list[np.ndarray]:
    scorer = CRITERIA[criterion]
    rng = np.random.default_rng(seed)
    kept = []
    for group, cls in enumerate(selection.classes):
        count, size, blocks = int(keep[group]), cls.size, cls.structural
        width = size // blocks  # channels per conv group: the same positions are kept in each
        if scorer is None:
            local = np.sort(rng.permutation(width)[:count // blocks])
        else:
            score = torch.zeros(size, dtype=torch.float64)
            for name in cls.members:
                weight = graph.modules[name].weight.detach()
                if weight.is_meta:
                    raise NpsError(f"criterion {criterion!r} needs real weights; {name} is on the meta device")
                for start, stop in _member_rows(graph, name, cls.root):
                    rows = weight[start:stop].to("cpu", torch.float64).reshape(stop - start, -1)
                    score += scorer(rows)
            per_position = score.reshape(blocks, width).sum(dim=0).numpy()
            # Stable sort of -score: equal scores keep the lower channel index first.
            local = np.sort(np.argsort(-per_position, kind="stable")[:count // blocks])
        kept.append((np.arange(blocks)[:, None] * width + local[None, :]).reshape(-1).astype(np.int64))
    return kept


def _checked_keep(table: LayerTable, keep) -> np.ndarray:
    keep = table.check_keep(keep)
    if keep.ndim != 1:
        raise NpsError(f"prune one keep vector at a time, got shape {keep.shape}")
    return keep


def channel_indices(model: nn.Module, table: LayerTable, keep, criterion: str = "l2",
                    seed: int = 0) -> list[np.ndarray]:
    """Indices (ascending int64) of the channels each group keeps.

    Parameters
    ----------
    model : nn.Module
        The base network the table describes (same architecture, mode and channel counts).
    table : LayerTable
        Its layer table.
    keep : array of int, shape (G,)
        Kept channels per group, 1 <= keep[i] <= table.channels[i], multiples of the group's granularity.
    criterion : str
        One of ``CRITERIA``.
    seed : int
        Seed of the ``random`` criterion (ignored by the others).
    """
    _check_criterion(criterion)
    keep = _checked_keep(table, keep)
    graph, selection = pruning_plan(model, table)
    return _group_indices(graph, selection, keep, criterion, seed)


def _slice(tensor: torch.Tensor, axis: int, indices: np.ndarray) -> torch.Tensor:
    new = tensor.detach().index_select(axis, torch.as_tensor(indices, device=tensor.device))
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(new, requires_grad=tensor.requires_grad)
    return new


def _size_attributes(module: nn.Module, n: int) -> dict:
    """The attributes that state a per-channel module's width."""
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.InstanceNorm2d)):
        return {"num_features": n}
    if isinstance(module, nn.GroupNorm):
        return {"num_channels": n}
    if isinstance(module, nn.LayerNorm):
        return {"normalized_shape": (n,)}
    if isinstance(module, nn.PReLU):
        return {"num_parameters": n}
    return {}


def prune_model(model: nn.Module, table: LayerTable, keep, criterion: str = "l2", seed: int = 0) -> nn.Module:
    """A physically smaller copy of ``model`` keeping ``keep[i]`` channels of every group ``i``.

    Parameters are as in ``channel_indices``. The copy has the same class, device, dtype, training mode and
    ``requires_grad`` flags as the original; the original is left untouched. Its FLOPs and params equal
    ``table.flops_of(keep)`` and ``table.params_of(keep)`` exactly. New weights are contiguous (NCHW): convert the
    copy to ``channels_last`` after pruning if the training loop wants it.

    Raises
    ------
    NpsError
        Unknown criterion, a keep vector of the wrong length, with a count outside [1, channels] or off the group's
        granularity, or a model that does not match the table.
    """
    _check_criterion(criterion)
    keep = _checked_keep(table, keep)
    graph, selection = pruning_plan(model, table)
    kept = {cls.root: idx for cls, idx in zip(selection.classes,
                                                _group_indices(graph, selection, keep, criterion, seed))}

    def indices(segs: tuple[Seg, ...]) -> np.ndarray | None:
        """Kept positions along a tensor's channel axis (None: all of them)."""
        parts, offset, changed = [], 0, False
        for seg in segs:
            idx = kept.get(graph.root(seg.var))
            changed |= idx is not None
            idx = np.arange(seg.length) if idx is None else idx
            if seg.spread > 1:
                idx = (idx[:, None] * seg.spread + np.arange(seg.spread)[None, :]).reshape(-1)
            parts.append(idx + offset)
            offset += seg.length * seg.spread
        return np.concatenate(parts) if changed else None

    memo: dict[int, torch.Tensor] = {}
    sizes: dict[str, dict] = {}
    for name in graph.weight_order:
        layer, module = graph.weights[name], graph.modules[name]
        in_idx, out_idx = indices(layer.inp), indices(layer.out)
        if in_idx is None and out_idx is None:
            continue
        weight = module.weight
        if layer.kind == "depthwise":
            n = len(out_idx)
            new = _slice(weight, 0, out_idx)
            sizes[name] = {"in_channels": n, "out_channels": n, "groups": n}
        else:
            new = weight if out_idx is None else _slice(weight, 0, out_idx)
            if in_idx is not None:
                # a grouped conv keeps the same positions in every group: the first group's are the local ones
                local = in_idx[:len(in_idx) // layer.groups] if layer.kind == "grouped" else in_idx
                new = _slice(new, 1, local)
            n_in = len(in_idx) if in_idx is not None else sum(s.length * s.spread for s in layer.inp)
            n_out = len(out_idx) if out_idx is not None else sum(s.length for s in layer.out)
            sizes[name] = ({"in_features": n_in, "out_features": n_out} if layer.kind == "linear"
                           else {"in_channels": n_in, "out_channels": n_out})
        memo[id(weight)] = new
        if module.bias is not None and out_idx is not None:
            memo[id(module.bias)] = _slice(module.bias, 0, out_idx)
    for tensors in graph.channel_tensors.values():
        idx = indices(tensors.segs)
        if idx is None:
            continue
        owner = graph.modules[tensors.owner]
        for attr, axis in tensors.tensors.items():
            value = getattr(owner, attr)
            memo[id(value)] = _slice(value, axis, idx)
        sizes.setdefault(tensors.owner, {}).update(_size_attributes(owner, len(idx)))
    pruned = copy.deepcopy(model, memo)
    for name, attributes in sizes.items():
        module = pruned.get_submodule(name)
        for attr, value in attributes.items():
            setattr(module, attr, value)
    return pruned
