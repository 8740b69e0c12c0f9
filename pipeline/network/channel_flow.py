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
    ChannelGraph, ChannelTensors, ModuleCall, Seg, TensorInfo, UnsupportedPattern, WeightLayer, _shape,
)


# ---------------------------------------------------------------------------------------------------------------------
# Operation tables.

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.GELU,
                nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity,
                nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.AlphaDropout, nn.Tanhshrink, nn.Softsign, nn.LogSigmoid)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample, nn.UpsamplingNearest2d,
          nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)

_UNARY_NAMES = {
    "relu", "relu_", "relu6", "sigmoid", "sigmoid_", "tanh", "hardswish", "hardsigmoid", "silu", "gelu", "leaky_relu",
    "elu", "selu", "mish", "softplus", "hardtanh", "dropout", "dropout2d", "alpha_dropout", "stochastic_depth",
    "clamp", "clamp_", "clamp_min", "clamp_max", "contiguous", "to", "float", "half", "bfloat16", "double", "type",
    "clone", "detach", "neg", "abs", "exp", "sqrt", "rsqrt", "square", "log_softmax_", "hardswish_", "silu_",
    "interpolate", "upsample", "adaptive_avg_pool2d", "adaptive_max_pool2d", "avg_pool2d", "max_pool2d", "pad",
}
_BINARY_NAMES = {"add", "add_", "iadd", "sub", "sub_", "isub", "mul", "mul_", "imul", "truediv", "div", "div_",
                 "itruediv", "radd", "rmul", "rsub"}
_REDUCE_NAMES = {"mean", "sum", "amax", "amin", "std", "var", "logsumexp"}
_SHAPE_NAMES = {"size", "dim", "numel", "shape"}
_PARAM_VIEW_NAMES = {"view", "reshape", "unsqueeze", "squeeze", "expand", "expand_as", "view_as"}


def _target_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    name = getattr(target, "__name__", str(target))
    return name.strip("_") if name.startswith("__") else name


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


class _Analysis:
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

    def channel_count(self, info: TensorInfo) -> int:
        return sum(s.length * s.spread for s in info.segs)

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

    # -- functions and methods ---------------------------------------------------------------------------------------

    def call_function(self, node: fx.Node) -> TensorInfo | None:
        name = _target_name(node)
        shape = _shape(node)
        first = self.tensor(node.args[0]) if node.args else None
        if name == "getattr" or name in _SHAPE_NAMES:
            return None
        if name == "getitem":
            return self.getitem(node, first, shape)
        if name in ("split", "chunk", "tensor_split", "unbind", "split_with_sizes") and first is not None:
            dim = _norm_dim(int(_arg(node, 2, "dim", 0 if name != "unbind" else _arg(node, 1, "dim", 0))),
                            len(first.shape))
            where = "the channel axis" if dim == first.axis else f"axis {dim}"
            self.fail(node, f"a {name} along {where}")
        if shape is None:  # a Python value computed from shapes (sizes, dims): no channels involved
            if self.tensors_in(node) and name not in ("floordiv", "mul", "add", "sub"):
                self.fail(node, f"{name} returns something other than a tensor")
            return None
        if first is not None and first.param is not None and first.axis is None:
            return self.param_op(node, name, first, shape)
        if name in ("cat", "concat", "concatenate"):
            return self.cat(node, shape)
        if name in _BINARY_NAMES:
            return self.binary(node, shape)
        if first is None:
            tensors = self.tensors_in(node)
            if not tensors:
                return TensorInfo(shape)  # a new tensor made from nothing (zeros, arange…): no channels
            first = tensors[0]
        if name in _UNARY_NAMES:
            if name in ("adaptive_avg_pool2d", "adaptive_max_pool2d", "avg_pool2d", "max_pool2d", "interpolate",
                        "upsample") and first.axis is not None:
                self.need_axis(node, first, 1)
            if name == "pad" and first.axis is not None:
                pad = _arg(node, 1, "pad", ())
                if len(pad) // 2 > len(first.shape) - 1 - first.axis:
                    self.fail(node, "padding along the channel axis")
            return TensorInfo(shape, first.axis, first.segs)
        if name in ("softmax", "log_softmax"):
            dim = _arg(node, 1, "dim")
            if first.axis is not None and dim is not None and _norm_dim(dim, len(first.shape)) == first.axis:
                self.g.mark_mixed(first.segs)
            return TensorInfo(shape, first.axis, first.segs)
        if name in _REDUCE_NAMES:
            return self.reduce(node, first, shape)
        if name == "flatten":
            return self.flatten(node, first, shape, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
        if name in ("view", "reshape"):
            return self.reshape(node, first, shape)
        if name == "permute":
            dims = node.args[1:] if node.op == "call_method" and not isinstance(node.args[1], (list, tuple)) \
                else _arg(node, 1, "dims")
            return self.permute(node, first, shape, [int(d) for d in dims])
        if name in ("transpose", "swapaxes", "swapdims"):
            a, b = (_norm_dim(int(d), len(first.shape)) for d in (node.args[1], node.args[2]))
            order = list(range(len(first.shape)))
            order[a], order[b] = order[b], order[a]
            return self.permute(node, first, shape, order)
        if name == "layer_norm":
            return self.functional_layer_norm(node, first, shape)
        self.fail(node, f"{name!r} is not an operation nps knows how channels pass through")

    def getitem(self, node, first: TensorInfo | None, shape) -> TensorInfo | None:
        if first is None:
            return None  # indexing a tuple or a size
        if shape is None:
            return None
        if first.axis is None:
            return TensorInfo(shape)
        index = node.args[1]
        index = index if isinstance(index, tuple) else (index,)
        if first.axis < len(index) and index[first.axis] != slice(None) or \
                len(shape) != len(first.shape) or shape[first.axis] != first.shape[first.axis]:
            self.fail(node, "indexing or slicing across the channel axis")
        return TensorInfo(shape, first.axis, first.segs)

    def param_op(self, node, name: str, param: TensorInfo, shape) -> TensorInfo | None:
        """An operation on a parameter itself: views keep track of which parameter dim each dim is."""
        if name in _PARAM_VIEW_NAMES or name == "getitem":
            kept = [d for d, size in zip(param.param_dims, param.shape) if size != 1]
            dims = []
            for size in shape:
                dims.append(kept.pop(0) if size != 1 and kept else None)
            if kept:
                self.fail(node, f"a reshape of parameter {param.param} that nps cannot follow")
            return TensorInfo(shape, None, (), param.param, tuple(dims))
        if name in _BINARY_NAMES:
            return self.binary(node, shape)
        if name in _UNARY_NAMES or name in ("contiguous", "to"):
            return TensorInfo(shape, None, (), param.param, param.param_dims)
        self.fail(node, f"operation {name!r} on parameter {param.param}")

    def cat(self, node, shape) -> TensorInfo:
        items = _arg(node, 0, "tensors")
        dim = _arg(node, 1, "dim", 0)
        infos = [self.tensor(t) for t in items]
        if any(i is None or i.axis is None for i in infos):
            self.fail(node, "concatenating tensors without known channels")
        dim = _norm_dim(int(dim), len(infos[0].shape))
        if any(i.axis != infos[0].axis for i in infos):
            self.fail(node, "concatenating tensors whose channels lie on different axes")
        if dim == infos[0].axis:
            return TensorInfo(shape, dim, tuple(s for i in infos for s in i.segs))
        for other in infos[1:]:
            self.join(node, infos[0].segs, other.segs)
        return TensorInfo(shape, infos[0].axis, infos[0].segs)

    def join(self, node, a: tuple[Seg, ...], b: tuple[Seg, ...]) -> None:
        if [(s.length, s.spread) for s in a] != [(s.length, s.spread) for s in b]:
            self.fail(node, "an elementwise operation joins tensors whose channels are split differently")
        for x, y in zip(a, b):
            self.g.union(x.var, y.var, self.where(node))

    def binary(self, node, shape) -> TensorInfo:
        operands = [self.tensor(a) for a in node.args[:2]]
        tensors = [t for t in operands if t is not None]
        if not tensors:
            return TensorInfo(shape)
        ndim = len(shape)

        def out_axis(t: TensorInfo) -> int | None:
            return None if t.axis is None else t.axis + ndim - len(t.shape)

        chans = [t for t in tensors if t.axis is not None]
        if not chans:
            params = [t for t in tensors if t.param is not None]
            if params and len(tensors) == 2:
                self.fail(node, "an operation between two parameters")
            return TensorInfo(shape, None, (), *(params[0].param, params[0].param_dims) if params else (None, ()))
        main = chans[0]
        axis = out_axis(main)
        if len(chans) == 2:
            other = chans[1]
            if out_axis(other) != axis:
                self.fail(node, "an elementwise operation joins tensors whose channels lie on different axes")
            a_size, b_size = main.shape[main.axis], other.shape[other.axis]
            if a_size == b_size:
                self.join(node, main.segs, other.segs)
                if math.prod(main.shape) != math.prod(other.shape):  # a broadcast operand is a gate
                    gate = main if math.prod(main.shape) < math.prod(other.shape) else other
                    self.g.gates.update(s.var for s in gate.segs)
            elif min(a_size, b_size) != 1:
                self.fail(node, f"an elementwise operation joins {a_size} channels with {b_size}")
            elif a_size == 1:
                main = other
            return TensorInfo(shape, axis, main.segs)
        for t in tensors:
            if t is main:
                continue
            offset = ndim - len(t.shape)
            local = axis - offset
            size = t.shape[local] if 0 <= local < len(t.shape) else 1
            if size == 1:
                continue
            if t.param is None:
                self.fail(node, "a tensor without known channels is combined elementwise with channels")
            param_dim = t.param_dims[local]
            owner, _, attr = t.param.rpartition(".")
            self.add_channel_tensors(node, owner, {attr: param_dim}, main.segs, "param")
        return TensorInfo(shape, axis, main.segs)

    def reduce(self, node, first: TensorInfo, shape) -> TensorInfo:
        dims = _arg(node, 1, "dim")
        keepdim = bool(_arg(node, 2, "keepdim", False))
        ndim = len(first.shape)
        dims = list(range(ndim)) if dims is None else [dims] if isinstance(dims, int) else list(dims)
        dims = [_norm_dim(int(d), ndim) for d in dims]
        if first.axis is None:
            return TensorInfo(shape)
        if first.axis in dims:
            self.g.mark_mixed(first.segs)
            return TensorInfo(shape)
        axis = first.axis if keepdim else first.axis - sum(1 for d in dims if d < first.axis)
        return TensorInfo(shape, axis, first.segs)

    def flatten(self, node, first: TensorInfo, shape, start: int, end: int) -> TensorInfo:
        ndim = len(first.shape)
        start, end = _norm_dim(int(start), ndim), _norm_dim(int(end), ndim)
        axis = first.axis
        if axis is None:
            return TensorInfo(shape)
        if axis < start:
            return TensorInfo(shape, axis, first.segs)
        if axis > end:
            return TensorInfo(shape, axis - (end - start), first.segs)
        if math.prod(first.shape[start:axis]) != 1:
            self.fail(node, "a flatten that interleaves channels with the dims before them")
        spread = math.prod(first.shape[axis + 1:end + 1])
        return TensorInfo(shape, start, tuple(Seg(s.var, s.length, s.spread * spread) for s in first.segs))

    def reshape(self, node, first: TensorInfo, shape) -> TensorInfo:
        if first.axis is None:
            return TensorInfo(shape)
        before = math.prod(first.shape[:first.axis])
        channels = first.shape[first.axis]
        acc = 1
        for j, size in enumerate(shape):
            if acc == before:
                if size == channels:
                    return TensorInfo(shape, j, first.segs)
                tail = math.prod(first.shape[first.axis + 1:])
                if size % channels == 0 and tail % (size // channels) == 0:
                    # channels merged with the (trailing) dims after them, like a flatten
                    return TensorInfo(shape, j, tuple(Seg(s.var, s.length, s.spread * (size // channels))
                                                      for s in first.segs))
                break
            acc *= size
        self.fail(node, "a reshape that splits or mixes the channel axis (a channel shuffle?)")

    def permute(self, node, first: TensorInfo, shape, order: list[int]) -> TensorInfo:
        if first.axis is None:
            return TensorInfo(shape)
        order = [_norm_dim(d, len(first.shape)) for d in order]
        return TensorInfo(shape, order.index(first.axis), first.segs)

    def functional_layer_norm(self, node, first: TensorInfo, shape) -> TensorInfo:
        normalized = _arg(node, 1, "normalized_shape")
        weight, bias = self.tensor(_arg(node, 2, "weight")), self.tensor(_arg(node, 3, "bias"))
        tensors, owner = {}, None
        for t in (weight, bias):
            if t is not None:
                if t.param is None:
                    self.fail(node, "a layer norm whose weight is not a parameter")
                owner, _, attr = t.param.rpartition(".")
                tensors[attr] = 0
        normalized = (normalized,) if isinstance(normalized, int) else tuple(normalized)
        if owner is None:
            owner = f"{node.name}"
        return self.layer_norm(node, first, shape, owner=owner, normalized=normalized, tensors=tensors)



def follow_channels(model: nn.Module, gm: fx.GraphModule) -> ChannelGraph:
    """The channel graph of ``model`` from its traced graph ``gm`` (shapes already recorded on the nodes)."""
    return _Analysis(model, gm).run()
