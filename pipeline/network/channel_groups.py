"""Classes of channels, the candidate groups of a layer table: what they touch, whether they are internal to a
block, their names and their order (see :mod:`nps.pipeline.network.channel_graph`)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from nps.pipeline.network.channel_graph import ChannelGraph

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass
class ChannelClass:
    """One class of the union-find: channels that can only be pruned together."""

    root: int
    size: int
    fixed: str  # why it cannot be pruned ("" if it can)
    structural: int  # prune in multiples of this (grouped convs, GroupNorm)
    mixed: bool  # a layer norm, softmax or reduction mixes its channels' values
    members: list[str]  # conv/linear layers writing these channels (depthwise convs and SE gates included)
    originators: list[str]  # the members that created them (not depthwise convs, not gates)
    touching: list[str]  # every module that reads, writes or rescales them
    internal: bool = False
    name: str = ""
    order: tuple = ()


def _block(graph: ChannelGraph, name: str, *, inclusive: bool) -> str:
    """The nearest module around ``name`` that is not a container ("" for the network itself)."""
    parts = name.split(".") if name else []
    if not inclusive:
        parts = parts[:-1]
    while parts:
        candidate = ".".join(parts)
        if not isinstance(graph.modules.get(candidate), _CONTAINERS):
            return candidate
        parts = parts[:-1]
    return ""


def _common_prefix(names: list[str]) -> list[str]:
    split = [n.split(".") for n in names]
    out = []
    for column in zip(*split):
        if any(c != column[0] for c in column):
            break
        out.append(column[0])
    return out


def _residual_name(producers: list[str]) -> str:
    """A stream written by several blocks: ``<their common module>.residual``; across top-level modules the parts
    joined by ``+`` (ResNet-18's ``conv1+layer1.residual``)."""
    common = _common_prefix(producers)
    if common:
        return ".".join(common) + ".residual"
    by_top: dict[str, list[str]] = {}
    for p in producers:
        by_top.setdefault(p.split(".")[0], []).append(p)
    return "+".join(ps[0] if len(ps) == 1 else _residual_name(ps) for ps in by_top.values())


def classes(graph: ChannelGraph) -> list[ChannelClass]:
    """Every class of channels, ordered as groups are listed: by where the block that first writes them starts (the
    nearest module around the writer that is not a container; a writer outside any block counts for itself), a
    stream crossing blocks before the block's internal channels, then by where the channels are first written.
    For a ResNet: the stem, then per block the stream a shortcut conv starts, then the block's convs."""
    found: dict[int, ChannelClass] = {}

    def get(var: int) -> ChannelClass:
        r = graph.root(var)
        if r not in found:
            found[r] = ChannelClass(r, graph.size(r), graph.fixed_reason(r), graph.structural(r), graph.mixed(r),
                                    [], [], [])
        return found[r]

    for name in graph.weight_order:
        layer = graph.weights[name]
        for seg in layer.out:
            c = get(seg.var)
            if name not in c.members:
                c.members.append(name)
                c.touching.append(name)
                if layer.kind != "depthwise" and seg.var not in graph.gates:
                    c.originators.append(name)
        for seg in layer.inp:
            c = get(seg.var)
            if name not in c.touching:
                c.touching.append(name)
    for tensors in graph.channel_tensors.values():
        for seg in tensors.segs:
            c = get(seg.var)
            if tensors.owner not in c.touching:
                c.touching.append(tensors.owner)
    for c in found.values():
        if not c.originators:
            c.originators = list(c.members)
        if not c.originators:
            c.fixed = c.fixed or "no layer writes these channels"
            continue
        common = ".".join(_common_prefix(c.touching))
        c.internal = _block(graph, common, inclusive=common not in c.touching) != ""
        block = _block(graph, c.originators[0], inclusive=False)
        start = graph.first_node[block] if block else graph.var_node[c.root]
        c.order = (start, c.internal, graph.var_node[c.root])
        c.name = c.originators[0] if len(c.originators) == 1 or c.internal else _residual_name(c.originators)
    ordered = sorted((c for c in found.values() if c.order), key=lambda c: c.order)
    _disambiguate(ordered)
    return ordered + [c for c in found.values() if not c.order]


def _disambiguate(ordered: list[ChannelClass]) -> None:
    """Streams of one container share its name (MobileNetV2's ``features.residual``): add the range of blocks."""
    seen: dict[str, list[ChannelClass]] = {}
    for c in ordered:
        if not c.fixed:
            seen.setdefault(c.name, []).append(c)
    for name, same in seen.items():
        if len(same) < 2 or not name.endswith(".residual"):
            continue
        for c in same:
            common = _common_prefix(c.originators)
            depth = len(common)
            first, last = c.originators[0].split("."), c.originators[-1].split(".")
            if len(first) > depth and len(last) > depth:
                span = first[depth] if first[depth] == last[depth] else f"{first[depth]}-{last[depth]}"
                c.name = ".".join(common + [span, "residual"])
    counts: dict[str, int] = {}
    for c in ordered:
        if c.fixed:
            continue
        counts[c.name] = counts.get(c.name, 0) + 1
        if counts[c.name] > 1:
            c.name = f"{c.name}#{counts[c.name]}"
