"""The fused module's parts (:mod:`nps.pipeline.training.fuse` builds it): where each member's channels sit on a
fused axis (:class:`ClassLayout`), the layers that act per member (a batched linear, a LayerNorm over each member's
own channels, a member-wise concatenation) and :class:`FusedNetwork`, the module with its padding masks, that loads
the members' weights in and writes them back out.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from nps.pipeline.network.channel_graph import ChannelGraph, Seg

# --------------------------------------------------------------------------------------------------------------------
# Where each member's channels sit on a fused axis.


@dataclass(frozen=True)
class ClassLayout:
    """One channel class (a group of the table, or a class nps does not prune) across the K members."""

    counts: tuple[int, ...]  # member m keeps counts[m] channels of the class
    blocks: int  # the class is kept in this many equal blocks (the groups of grouped convs it feeds or leaves)
    padded: int  # its width on the fused axis, per member

    def positions(self, m: int) -> np.ndarray:
        """Where member m's kept channels (in its pruned order, block by block) sit in its padded range."""
        per_block, padded_block = self.counts[m] // self.blocks, self.padded // self.blocks
        j = np.arange(self.counts[m])
        return (j // per_block) * padded_block + j % per_block


def class_layouts(graph: ChannelGraph, selection, keeps: np.ndarray) -> dict[int, ClassLayout]:
    """The layout of every channel class of ``graph`` for members keeping ``keeps`` (K × groups)."""
    keeps = np.asarray(keeps, dtype=np.int64)
    pruned = {cls.root: (keeps[:, i], cls.structural) for i, cls in enumerate(selection.classes)}
    roots = {graph.root(s.var) for layer in graph.weights.values() for s in (*layer.inp, *layer.out)}
    roots |= {graph.root(s.var) for t in graph.channel_tensors.values() for s in t.segs}
    out = {}
    for root in roots:
        if root in pruned:
            counts, blocks = pruned[root]
            padded = blocks * int(max(c // blocks for c in counts))
            out[root] = ClassLayout(tuple(int(c) for c in counts), int(blocks), padded)
        else:
            size = graph.size(root)
            out[root] = ClassLayout((size,) * len(keeps), 1, size)
    return out


def axis_layout(graph: ChannelGraph, layouts: dict[int, ClassLayout], segs: tuple[Seg, ...], m: int):
    """(positions of member m's elements on a fused axis made of ``segs``, the per-member padded width)."""
    parts, offset = [], 0
    for seg in segs:
        lay = layouts[graph.root(seg.var)]
        pos = lay.positions(m)
        if seg.spread > 1:  # a flattened channel: its spread elements side by side
            pos = (pos[:, None] * seg.spread + np.arange(seg.spread)[None, :]).reshape(-1)
        parts.append(pos + offset)
        offset += lay.padded * seg.spread
    return np.concatenate(parts), offset


def _flat_index(fused_shape: tuple[int, ...], axis_maps: dict[int, np.ndarray], member_shape) -> torch.Tensor:
    """Flat positions in a fused tensor of every element of a member's tensor (row-major), given where each member
    index lands along the mapped axes (the other axes map to themselves)."""
    grids = [axis_maps.get(a, np.arange(n)) for a, n in enumerate(member_shape)]
    index = np.ix_(*grids)
    return torch.as_tensor(np.ravel_multi_index(index, fused_shape).reshape(-1), dtype=torch.long)


# --------------------------------------------------------------------------------------------------------------------
# Fused layers.


class FusedLinear(nn.Module):
    """K members' linear layers: ``[..., K·P_in] -> [..., K·P_out]``, a batched matmul per member."""

    def __init__(self, k: int, p_in: int, p_out: int, bias: bool, like: torch.Tensor):
        super().__init__()
        self.k, self.p_in, self.p_out = k, p_in, p_out
        self.weight = nn.Parameter(torch.zeros(k, p_out, p_in, dtype=like.dtype, device=like.device))
        self.bias = nn.Parameter(torch.zeros(k, p_out, dtype=like.dtype, device=like.device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch.einsum("...ki,koi->...ko", x.reshape(*lead, self.k, self.p_in), self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.k * self.p_out)


def member_layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, mask: torch.Tensor,
                      counts: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last axis of ``[..., K·P]``, each member over its own channels (``mask``: K × P, 1 where
    the member has a channel; ``counts``: K × 1)."""
    k, p = mask.shape
    lead = x.shape[:-1]
    v = x.reshape(*lead, k, p)
    mean = (v * mask).sum(-1, keepdim=True) / counts
    centred = (v - mean) * mask
    var = (centred * centred).sum(-1, keepdim=True) / counts
    y = (centred * torch.rsqrt(var + eps)).reshape(*lead, k * p)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


class FusedLayerNorm(nn.Module):
    """``nn.LayerNorm`` over channels (the last axis) for K members, each over its own."""

    def __init__(self, module: nn.LayerNorm, mask: torch.Tensor, counts: torch.Tensor, like: torch.Tensor):
        super().__init__()
        self.eps = module.eps
        n = mask.numel()
        self.weight = nn.Parameter(torch.zeros(n, dtype=like.dtype, device=like.device)) \
            if module.weight is not None else None
        self.bias = nn.Parameter(torch.zeros(n, dtype=like.dtype, device=like.device)) \
            if module.bias is not None else None
        self.register_buffer("mask", mask.to(like.device, like.dtype))
        self.register_buffer("counts", counts.to(like.device, like.dtype))

    def forward(self, x):
        return member_layer_norm(x, self.weight, self.bias, self.mask, self.counts, self.eps)


def member_cat(tensors, dim: int, k: int) -> torch.Tensor:
    """``torch.cat`` along the fused channel axis, member by member (each member's segments side by side)."""
    first = tensors[0]
    dim = dim % first.dim()
    parts = [t.reshape(*t.shape[:dim], k, t.shape[dim] // k, *t.shape[dim + 1:]) for t in tensors]
    out = torch.cat(parts, dim=dim + 1)
    return out.reshape(*out.shape[:dim], -1, *out.shape[dim + 2:])


def _functional_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, ln_mask, ln_counts):
    return member_layer_norm(x, weight, bias, ln_mask, ln_counts, eps)


# --------------------------------------------------------------------------------------------------------------------
# The fused network.


@dataclass
class _Param:
    """A fused tensor and, per member, where that member's tensor of the same role lands in it."""

    fused: torch.Tensor
    member_name: str  # qualified name in the member modules
    index: list[torch.Tensor]  # per member: flat (row-major) positions of its elements

    def at(self, m: int) -> tuple[torch.Tensor, ...]:
        """Member m's elements as an index of the fused tensor: by position, so whatever its memory format."""
        cached = getattr(self, "_at", None)
        if cached is None:
            cached = self._at = {}
        if m not in cached:
            flat = self.index[m].numpy()
            cached[m] = tuple(torch.as_tensor(a, device=self.fused.device)
                              for a in np.unravel_index(flat, tuple(self.fused.shape)))
        return cached[m]


class FusedNetwork(nn.Module):
    """The fused module (see the module docstring): ``forward(x) -> [B, K, classes]``."""

    def __init__(self, gm: fx.GraphModule, k: int, params: list[_Param], members: list[nn.Module]):
        super().__init__()
        self.gm, self.k = gm, k
        self._params = params
        self._members = members
        self._masks: dict[int, torch.Tensor] = {}
        for p in params:
            mask = torch.zeros(p.fused.numel(), dtype=torch.bool)
            for index in p.index:
                mask[index] = True
            if not bool(mask.all()):
                self._masks[id(p.fused)] = mask.view(p.fused.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.gm(x)
        return out.reshape(out.shape[0], self.k, -1)

    # -- padding and members -----------------------------------------------------------------------------------------

    def tensors(self) -> list[torch.Tensor]:
        """Every fused parameter and buffer a member has a share of, in a fixed order."""
        return [p.fused for p in self._params]

    def padding_masks(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(parameter, its float mask: 1 on the members' elements, 0 on the padding) for every fused parameter
        that has padding."""
        out = []
        for p in self._params:
            mask = self._masks.get(id(p.fused))
            if mask is not None and isinstance(p.fused, nn.Parameter):
                out.append((p.fused, mask.to(p.fused.device, p.fused.dtype)))
        return out

    def load_members(self, members: list[nn.Module] | None = None) -> None:
        """Copy every member's tensors into their places (padding zero; running variances of padding one)."""
        members = members or self._members
        with torch.no_grad():
            for p in self._params:
                p.fused.fill_(1.0 if p.member_name.endswith("running_var") else 0.0)
                for m, member in enumerate(members):
                    src = _get(member, p.member_name)
                    p.fused[p.at(m)] = src.detach().reshape(-1).to(p.fused.device, p.fused.dtype)

    def write_back(self, members: list[nn.Module] | None = None) -> None:
        """Copy each member's tensors out of the fused ones into its own (pruned) module."""
        members = members or self._members
        with torch.no_grad():
            for p in self._params:
                for m, member in enumerate(members):
                    dst = _get(member, p.member_name)
                    dst.copy_(p.fused[p.at(m)].view(dst.shape).to(dst.device, dst.dtype))

    def zero_member(self, m: int, extra: list[torch.Tensor | None] = ()) -> None:
        """Member m stops: its parameters and buffers become zero, NaNs included, and so do its entries of
        ``extra`` (one tensor or None per fused tensor, in :meth:`tensors` order: e.g. momentum buffers)."""
        with torch.no_grad():
            for p in self._params:
                p.fused[p.at(m)] = 0
            for p, buf in zip(self._params, extra):
                if buf is not None:
                    buf[p.at(m)] = 0



def _get(module: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, attr)


def _set(module: nn.Module, name: str, value) -> None:
    owner, _, attr = name.rpartition(".")
    target = module.get_submodule(owner) if owner else module
    if isinstance(value, nn.Parameter) or name in dict(target.named_parameters(recurse=False)):
        setattr(target, attr, value if isinstance(value, nn.Parameter) else nn.Parameter(value))
    else:
        setattr(target, attr, value)
