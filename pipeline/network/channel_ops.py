"""The channel rules of functions and tensor methods (``torch.cat``, ``+``, ``x.view``, ``F.layer_norm``...): what a
result's channel axis carries, given its inputs'. The rules of modules (conv, linear, norms) and the pass itself are
in :mod:`nps.pipeline.network.channel_flow`, whose analysis class mixes these in."""
from __future__ import annotations

import math

import torch.fx as fx
from torch import nn

from nps.pipeline.network.channel_graph import Seg, TensorInfo, _shape

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


class FunctionRules:
    """The function and method rules of the channel analysis (mixed into its class, which provides ``tensor``,
    ``fail``, ``join``'s union-find ``g`` and the other helpers these use)."""

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

