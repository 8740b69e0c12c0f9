"""One-shot filter pruning: a physically smaller copy of a ResNet with the most important filters of every group.

Importance criteria (``CRITERIA``), all computed on the conv weights in float64 on the CPU:

- ``l2`` (the paper's default, §2.1) and ``l1``: the norm of each filter;
- ``fpgm`` (He et al. 2019, "Filter pruning via geometric median"): the sum of Euclidean distances from a filter to
  every other filter of the layer; filters near the geometric median (small sum) are redundant and go first;
- ``random``: a seeded permutation (the weights are not read, so a meta-device model works).

A residual group ties several convs (every block's last conv and the shortcut of a stage); their scores are summed
over those members so that all of them keep the same channel indices. Ties are broken towards the lower index, so
the result is deterministic. The pruned copy is built from new, smaller ``Conv2d``/``BatchNorm2d``/``Linear`` modules
holding the surviving weights (BN running statistics included); the input channels of every consumer are sliced to
match. The original model is not modified.
"""
from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn.utils import skip_init

from nps.pipeline.errors import NpsError
from nps.pipeline.graph import FIXED, LayerTable, resnet_layout

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


def _checked_layout(model: nn.Module, table: LayerTable):
    layout = resnet_layout(model, table.mode)
    if layout.names != table.names or layout.members != table.members or \
            not np.array_equal(layout.channels, table.channels) or \
            model.fc.out_features != table.num_classes or model.conv1.in_channels != table.in_channels:
        raise NpsError(f"the model does not match the layer table of {table.model} ({table.mode} mode)")
    return layout


def _check_criterion(criterion: str) -> None:
    if criterion not in CRITERIA:
        raise NpsError(f"unknown pruning criterion {criterion!r}; known criteria: {', '.join(CRITERIA)}")


def _group_indices(model: nn.Module, table: LayerTable, keep: np.ndarray, criterion: str,
                   seed: int) -> list[np.ndarray]:
    modules = dict(model.named_modules())
    scorer = CRITERIA[criterion]
    rng = np.random.default_rng(seed)
    kept = []
    for group, members in enumerate(table.members):
        count = int(keep[group])
        if scorer is None:
            order = rng.permutation(int(table.channels[group]))
        else:
            score = None
            for name in members:
                weight = modules[name].weight.detach()
                if weight.is_meta:
                    raise NpsError(f"criterion {criterion!r} needs real weights; {name} is on the meta device")
                member_score = scorer(weight.to("cpu", torch.float64).reshape(weight.shape[0], -1))
                score = member_score if score is None else score + member_score
            # Stable sort of -score: equal scores keep the lower channel index first.
            order = np.argsort(-score.numpy(), kind="stable")
        kept.append(np.sort(order[:count]).astype(np.int64))
    return kept


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
        Kept channels per group, 1 <= keep[i] <= table.channels[i].
    criterion : str
        One of ``CRITERIA``.
    seed : int
        Seed of the ``random`` criterion (ignored by the others).
    """
    _check_criterion(criterion)
    keep = table.check_keep(keep)
    if keep.ndim != 1:
        raise NpsError(f"prune one keep vector at a time, got shape {keep.shape}")
    _checked_layout(model, table)
    return _group_indices(model, table, keep, criterion, seed)


def _index(tensor: torch.Tensor, dim: int, indices: np.ndarray | None) -> torch.Tensor:
    if indices is None:
        return tensor
    return tensor.index_select(dim, torch.as_tensor(indices, device=tensor.device))


def _copy_into(new: nn.Module, old: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    with torch.no_grad():
        for name, value in tensors.items():
            getattr(new, name).copy_(value)
    for name, param in new.named_parameters():
        param.requires_grad_(getattr(old, name).requires_grad)
    return new.train(old.training)


def _smaller_conv(conv: nn.Conv2d, in_idx, out_idx) -> nn.Conv2d:
    weight = _index(_index(conv.weight, 0, out_idx), 1, in_idx)
    new = skip_init(nn.Conv2d, weight.shape[1], weight.shape[0], conv.kernel_size, stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                    padding_mode=conv.padding_mode, device=weight.device, dtype=weight.dtype)
    tensors = {"weight": weight}
    if conv.bias is not None:
        tensors["bias"] = _index(conv.bias, 0, out_idx)
    return _copy_into(new, conv, tensors)


def _smaller_linear(linear: nn.Linear, in_idx) -> nn.Linear:
    weight = _index(linear.weight, 1, in_idx)
    new = skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
    tensors = {"weight": weight}
    if linear.bias is not None:
        tensors["bias"] = linear.bias
    return _copy_into(new, linear, tensors)


def _smaller_bn(bn: nn.BatchNorm2d, out_idx) -> nn.BatchNorm2d:
    reference = bn.weight if bn.affine else bn.running_mean
    new = skip_init(nn.BatchNorm2d, len(out_idx), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                    track_running_stats=bn.track_running_stats, device=reference.device, dtype=reference.dtype)
    tensors = {}
    for name in ("weight", "bias", "running_mean", "running_var"):
        if getattr(bn, name, None) is not None:
            tensors[name] = _index(getattr(bn, name), 0, out_idx)
    if bn.track_running_stats:
        tensors["num_batches_tracked"] = bn.num_batches_tracked
    return _copy_into(new, bn, tensors)


def prune_model(model: nn.Module, table: LayerTable, keep, criterion: str = "l2", seed: int = 0) -> nn.Module:
    """A physically smaller copy of ``model`` keeping ``keep[i]`` channels of every group ``i``.

    Parameters are as in ``channel_indices``. The copy has the same device, dtype, training mode and
    ``requires_grad`` flags as the original; the original is left untouched. Its FLOPs and params equal
    ``table.flops(keep)`` and ``table.params(keep)`` exactly. New weights are contiguous (NCHW): convert the copy
    to ``channels_last`` after pruning if the training loop wants it.

    Raises
    ------
    NpsError
        Unknown criterion, a keep vector of the wrong length or with a count outside [1, channels], or a model that
        does not match the table.
    """
    _check_criterion(criterion)
    keep = table.check_keep(keep)
    if keep.ndim != 1:
        raise NpsError(f"prune one keep vector at a time, got shape {keep.shape}")
    layout = _checked_layout(model, table)
    kept = _group_indices(model, table, keep, criterion, seed)
    modules = dict(model.named_modules())

    def indices(group: int):
        return None if group == FIXED else kept[group]

    # deepcopy with a memo that maps each replaced module to its smaller version: unpruned layers are copied,
    # pruned ones are never copied at full size.
    replacements: dict[int, nn.Module] = {}
    for slot in layout.slots:
        in_idx, out_idx = indices(slot.in_group), indices(slot.out_group)
        if in_idx is None and out_idx is None:
            continue
        layer = modules[slot.conv]
        if isinstance(layer, nn.Linear):
            replacements[id(layer)] = _smaller_linear(layer, in_idx)
        else:
            replacements[id(layer)] = _smaller_conv(layer, in_idx, out_idx)
        if slot.bn is not None and out_idx is not None:
            bn = modules[slot.bn]
            replacements[id(bn)] = _smaller_bn(bn, out_idx)
    return copy.deepcopy(model, memo=dict(replacements))
