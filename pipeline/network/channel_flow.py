"""How channels pass through each operation of an fx graph: the one pass that builds a :class:`ChannelGraph`.

Every tensor's channel axis is a list of segments of channel variables (:class:`nps.pipeline.network.channel_graph.Seg`);
the rules here say, operation by operation, which variables a result carries and which it joins (see
:mod:`nps.pipeline.network.channel_graph` for the mechanism). Anything not known raises :class:`UnsupportedPattern`.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch import nn

from nps.pipeline.network.channel_graph import (
    ChannelGraph,
    ChannelTensors,
    ModuleCall,
    Seg,
    TensorInfo,
    UnsupportedPattern,
    WeightLayer,
    _shape,
)
from nps.pipeline.network.channel_ops import _ACTIVATIONS, _POOLS, FunctionRules, _norm_dim, _target_name


class _Analysis(FunctionRules):
    """One pass over the graph in topological order (see the module docstring)."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule):
        self.g = ChannelGraph(model)
        self.gm = gm
        self.info: dict[fx.Node, TensorInfo | None] = {}
        self.position = 0

    # -- helpers -----------------------------------------------------------------------------------------------------

    def where(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"layer {node.target}"
        target = _target_name(node)
        label = node.name if target == node.name.rstrip("_0123456789") else f"{node.name} ({target})"
        return f"operation {label}{self.context(node)}"

    def context(self, node: fx.Node) -> str:
        """The module a function call belongs to: the nearest module call before it in the graph."""
        for previous in reversed(list(self.gm.graph.nodes)[:self.position]):
            if previous.op == "call_module":
                return f" after layer {previous.target}"
        return ""

    def fail(self, node: fx.Node, pattern: str):
        raise UnsupportedPattern(f"{self.where(node)}: {pattern}; nps cannot prune channels across it")

    def tensor(self, value) -> TensorInfo | None:
        return self.info.get(value) if isinstance(value, fx.Node) else None

    def tensors_in(self, node: fx.Node) -> list[TensorInfo]:
        out = []
        for arg in list(node.args) + list(node.kwargs.values()):
            items = arg if isinstance(arg, (list, tuple)) else [arg]
            for item in items:
                info = self.tensor(item)
                if info is not None:
                    out.append(info)
        return out

    def new_segs(self, size: int, fixed: str = "") -> tuple[Seg, ...]:
        return (Seg(self.g.new_var(size, self.position, fixed), int(size)),)

    def note_module(self, name: str) -> None:
        parts = name.split(".")
        for i in range(len(parts) + 1):
            self.g.first_node.setdefault(".".join(parts[:i]), self.position)

    def numel_terms(self, info: TensorInfo | None) -> tuple[tuple[Seg, ...], int, int]:
        """(segs, per-channel, const) with numel = const + per-channel · Σ length·spread (batch excluded)."""
        if info is None:
            return (), 0, 0
        numel = math.prod(info.shape[1:])
        if info.axis is None or not info.segs:
            return (), 0, numel
        return info.segs, numel // info.shape[info.axis], 0

    def record_call(self, node: fx.Node, module: nn.Module, inp: TensorInfo | None, out: TensorInfo | None) -> None:
        in_segs, in_pc, in_c = self.numel_terms(inp)
        out_segs, out_pc, out_c = self.numel_terms(out)
        self.g.calls.append(ModuleCall(node.target, type(module), in_segs, in_pc, in_c, out_segs, out_pc, out_c))

    # -- the pass ----------------------------------------------------------------------------------------------------

    def run(self) -> ChannelGraph:
        for self.position, node in enumerate(self.gm.graph.nodes):
            if node.op == "call_module":
                self.note_module(node.target)
            if node.op == "placeholder":
                shape = _shape(node)
                if shape is None or len(shape) != 4:
                    self.fail(node, "the network's input is not an image batch (N, C, H, W)")
                self.info[node] = TensorInfo(shape, 1, self.new_segs(shape[1], "the image"))
            elif node.op == "get_attr":
                self.info[node] = self.get_attr(node)
            elif node.op == "call_module":
                self.info[node] = self.call_module(node)
            elif node.op in ("call_function", "call_method"):
                self.info[node] = self.call_function(node)
            elif node.op == "output":
                for info in self.tensors_in(node):
                    self.g.fix(info.segs, "the network's output")
        return self.g

    def get_attr(self, node: fx.Node) -> TensorInfo | None:
        value = self.gm
        for part in node.target.split("."):
            value = getattr(value, part)
        if not torch.is_tensor(value):
            return None
        return TensorInfo(tuple(value.shape), None, (), node.target, tuple(range(value.dim())))

    # -- modules -----------------------------------------------------------------------------------------------------

    def call_module(self, node: fx.Node) -> TensorInfo | None:
        module = self.g.modules[node.target]
        inputs = self.tensors_in(node)
        inp = inputs[0] if inputs else None
        shape = _shape(node)
        if inp is None or shape is None:
            self.fail(node, f"a {type(module).__name__} whose input or output is not a tensor")
        if isinstance(module, nn.Conv2d):
            out = self.conv(node, module, inp, shape)
        elif isinstance(module, nn.Linear):
            out = self.linear(node, module, inp, shape)
        elif isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.InstanceNorm2d, nn.GroupNorm)):
            out = self.norm(node, module, inp, shape)
        elif type(module) is nn.LayerNorm:
            out = self.layer_norm(node, inp, shape, owner=node.target, normalized=tuple(module.normalized_shape),
                                  tensors={k: 0 for k in ("weight", "bias") if getattr(module, k, None) is not None})
        elif isinstance(module, nn.PReLU):
            out = TensorInfo(shape, inp.axis, inp.segs)
            if module.num_parameters > 1:
                self.need_axis(node, inp, 1)
                self.g.channel_tensors[node.target] = ChannelTensors(node.target, {"weight": 0}, inp.segs, "prelu")
        elif isinstance(module, _ACTIVATIONS):
            out = TensorInfo(shape, inp.axis, inp.segs)
        elif isinstance(module, _POOLS):
            if inp.axis is not None:
                self.need_axis(node, inp, 1)
            out = TensorInfo(shape, inp.axis, inp.segs)
        elif isinstance(module, nn.Flatten):
            out = self.flatten(node, inp, shape, module.start_dim, module.end_dim)
        elif isinstance(module, (nn.Softmax, nn.LogSoftmax)):
            if inp.axis is not None and _norm_dim(module.dim if module.dim is not None else 1, len(inp.shape)) == \
                    inp.axis:
                self.g.mark_mixed(inp.segs)
            out = TensorInfo(shape, inp.axis, inp.segs)
        else:
            self.fail(node, f"a {type(module).__name__} layer, which nps does not know how to prune")
        self.record_call(node, module, inp, out)
        return out

    def need_axis(self, node: fx.Node, info: TensorInfo, axis: int) -> None:
        if info.axis != axis:
            self.fail(node, f"expects channels on axis {axis} but they are on axis {info.axis}")

    def conv(self, node, conv: nn.Conv2d, inp: TensorInfo, shape) -> TensorInfo:
        self.need_axis(node, inp, 1)
        name, groups = node.target, conv.groups
        positions = shape[2] * shape[3]
        previous = self.g.weights.get(name)
        if groups == 1:
            kind = "conv"
        elif groups == conv.in_channels == conv.out_channels:
            kind = "depthwise"
        elif groups == conv.in_channels:
            self.fail(node, f"a depthwise conv with channel multiplier {conv.out_channels // conv.in_channels}")
        else:
            kind = "grouped"
            if len(inp.segs) != 1 or inp.segs[0].spread != 1:
                self.fail(node, "a grouped conv reading concatenated channels")
        if previous is not None:  # the same layer called again: the same channels on both calls
            for a, b in zip(previous.inp, inp.segs):
                self.g.union(a.var, b.var, f"layer {name} (called twice)")
            previous.positions.append(positions)
            return TensorInfo(shape, 1, previous.out)
        if kind == "depthwise":
            out_segs = inp.segs
        else:
            out_segs = self.new_segs(conv.out_channels)
        if kind == "grouped":
            self.g.require_multiple(inp.segs[0].var, groups)
            self.g.require_multiple(out_segs[0].var, groups)
        layer = WeightLayer(name, kind, inp.segs, out_segs, groups, math.prod(conv.kernel_size), [positions],
                            conv.bias is not None)
        self.g.weights[name] = layer
        self.g.weight_order.append(name)
        return TensorInfo(shape, 1, out_segs)

    def linear(self, node, linear: nn.Linear, inp: TensorInfo, shape) -> TensorInfo:
        name = node.target
        last = len(inp.shape) - 1
        if inp.axis is None:
            in_segs = self.new_segs(linear.in_features, "features without channels")
        elif inp.axis != last:
            self.fail(node, f"a linear layer over axis {last} while the channels are on axis {inp.axis}")
        else:
            in_segs = inp.segs
        positions = math.prod(shape[1:-1])
        previous = self.g.weights.get(name)
        if previous is not None:
            for a, b in zip(previous.inp, in_segs):
                self.g.union(a.var, b.var, f"layer {name} (called twice)")
            previous.positions.append(positions)
            return TensorInfo(shape, last, previous.out)
        out_segs = self.new_segs(linear.out_features)
        self.g.weights[name] = WeightLayer(name, "linear", in_segs, out_segs, 1, 1, [positions],
                                           linear.bias is not None)
        self.g.weight_order.append(name)
        return TensorInfo(shape, last, out_segs)

    def norm(self, node, module, inp: TensorInfo, shape) -> TensorInfo:
        self.need_axis(node, inp, 1)
        tensors = {k: 0 for k in ("weight", "bias", "running_mean", "running_var") if getattr(module, k, None)
                   is not None}
        kind = {nn.GroupNorm: "groupnorm"}.get(type(module), "instancenorm" if isinstance(module, nn.InstanceNorm2d)
                                                else "batchnorm")
        if isinstance(module, nn.GroupNorm):
            if len(inp.segs) != 1:
                self.fail(node, "a GroupNorm over concatenated channels")
            self.g.require_multiple(inp.segs[0].var, module.num_groups)
            self.g.mark_mixed(inp.segs)
        self.add_channel_tensors(node, node.target, tensors, inp.segs, kind)
        return TensorInfo(shape, 1, inp.segs)

    def add_channel_tensors(self, node, owner: str, tensors: dict, segs, kind: str) -> None:
        if not tensors:
            return
        existing = self.g.channel_tensors.get(owner)
        if existing is not None:  # called twice, or a second parameter of the same module
            if existing.segs != segs:
                for a, b in zip(existing.segs, segs):
                    self.g.union(a.var, b.var, f"{self.where(node)} (per-channel parameters used twice)")
            existing.tensors.update(tensors)
            return
        self.g.channel_tensors[owner] = ChannelTensors(owner, dict(tensors), tuple(segs), kind)

    def layer_norm(self, node, inp: TensorInfo, shape, *, owner: str, normalized: tuple, tensors: dict) -> TensorInfo:
        last = len(inp.shape) - 1
        if inp.axis != last or tuple(normalized) != (inp.shape[last],):
            self.fail(node, f"a layer norm over {tuple(normalized)} that is not the channel axis alone")
        self.g.mark_mixed(inp.segs)
        self.add_channel_tensors(node, owner, tensors, inp.segs, "layernorm")
        return TensorInfo(shape, inp.axis, inp.segs)


def follow_channels(model: nn.Module, gm: fx.GraphModule) -> ChannelGraph:
    """The channel graph of ``model`` from its traced graph ``gm`` (shapes already recorded on the nodes)."""
    return _Analysis(model, gm).run()
