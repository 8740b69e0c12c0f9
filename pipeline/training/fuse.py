"""A fused cohort: K pruned subnetworks of one base network as ONE module, one kernel per layer for the whole cohort.

The members of a cohort are the same network at different widths. Every tensor of the fused module carries all K
members on its channel axis, member-major: member ``m``'s channels of a group of the layer table occupy
``[m·P, (m+1)·P)``, where ``P`` is the group's width padded to the cohort's widest member (for a group that feeds
or leaves a grouped conv, each conv group is padded to the widest, so the conv's groups line up). Then:

- a conv is a grouped conv over the members (``groups = K × its own groups``; a depthwise conv stays depthwise over
  ``K·P`` channels); the first conv reads the one shared input batch (``groups`` its own, ``K·P`` outputs);
- BatchNorm runs over the ``K·P`` channels: its statistics are per channel, so per member, and train-mode BN is
  exact; a LayerNorm over channels normalises each member over its own channels only (a mask leaves the padding
  out); a per-channel parameter (ConvNeXt's layer scale) is ``K·P`` long;
- a linear layer is a per-member batched matmul (``einsum`` over ``[..., K, P_in]``); concatenation along the
  channels (DenseNet) is member-wise; everything elementwise, pooling, flatten and permutes work unchanged;
- the output is ``[B, K, classes]``: member m's logits in ``[:, m]``.

Padded channels hold exact zeros in every weight, bias and BN affine parameter, so they compute zeros and no
member's numbers depend on another's: each member's loss and gradients are its own, and a training step of the
fused module is, up to rounding, K independent steps. :class:`FusedNetwork` keeps the padding masks
(:meth:`~FusedNetwork.mask_grads` after every backward keeps the padding at zero through momentum and weight decay)
and writes the members back (:meth:`~FusedNetwork.write_back`): K ordinary pruned state_dicts.

:func:`fuse` walks the skeleton member's fx graph once, a rule per kind of node (``_NODE_RULES``: modules by type in
``_MODULE_RULES``, functions and tensor methods by name in ``_FUNCTION_RULES``), every rule reading and extending one
state (``_Pass``): on which axis each node carries the members, or that it is the same for all of them, and the fused
layers and tensors made so far.

What cannot be fused (a reduction or softmax over channels, GroupNorm, a module called twice, an unknown operation
on channels...) raises :class:`FuseUnsupported` naming it; the engine then trains the cohort unfused.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from nps.pipeline.network.channel_ops import _BINARY_NAMES, _SHAPE_NAMES, _UNARY_NAMES, _target_name
from nps.pipeline.network.layer_table import LayerTable
from nps.pipeline.training.fused_network import (  # noqa: F401 - FusedNetwork and the layers: re-exported
    ClassLayout,
    FusedLayerNorm,
    FusedLinear,
    FusedNetwork,
    _flat_index,
    _functional_layer_norm,
    _get,
    _Param,
    _set,
    axis_layout,
    class_layouts,
    member_cat,
    member_layer_norm,
)


class FuseUnsupported(Exception):
    """The cohort cannot be fused: the message says which layer or operation, and why."""


_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.GELU,
                        nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity,
                        nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.AlphaDropout)
_SPATIAL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample,
                    nn.ZeroPad2d, nn.ConstantPad2d)
_SPATIAL_NAMES = {"adaptive_avg_pool2d", "adaptive_max_pool2d", "avg_pool2d", "max_pool2d", "interpolate",
                  "upsample", "pad"}


class _Builder:
    """Builds a :class:`FusedNetwork` from the base's channel graph and the K pruned members."""

    def __init__(self, base: nn.Module, table: LayerTable, keeps: np.ndarray, members: list[nn.Module]):
        from nps.pipeline.network.prune import pruning_plan

        self.graph, self.selection = pruning_plan(base, table)
        self.keeps = np.asarray(keeps, dtype=np.int64)
        self.k = len(members)
        self.members = members
        self.layouts = class_layouts(self.graph, self.selection, self.keeps)
        self.params: list[_Param] = []
        self.like = next(members[0].parameters())

    # -- tensors -----------------------------------------------------------------------------------------------------

    def tensor(self, member_name: str, fused_shape: tuple[int, ...], maps: list[dict[int, np.ndarray]],
               parameter: bool, index_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """A fused tensor of ``fused_shape`` (zeros) for the members' tensors ``member_name``; member m's index
        ``i`` along axis ``a`` lands at ``maps[m][a][i]`` of ``index_shape`` (the same elements, row-major: a
        linear layer's ``[K, P_out, P_in]`` weight is indexed as ``[K·P_out, P_in]``)."""
        src = _get(self.members[0], member_name)
        fused = torch.zeros(fused_shape, dtype=src.dtype, device=src.device)
        index = [_flat_index(index_shape or fused_shape, maps[m], tuple(_get(self.members[m], member_name).shape))
                 for m in range(self.k)]
        tensor = nn.Parameter(fused, requires_grad=src.requires_grad) if parameter else fused
        self.params.append(_Param(tensor, member_name, index))
        return tensor

    def axis(self, segs, m):
        return axis_layout(self.graph, self.layouts, segs, m)

    # -- layers ------------------------------------------------------------------------------------------------------

    def conv(self, name: str, module: nn.Conv2d, shared_input: bool) -> nn.Conv2d:
        """The members' conv as one: grouped over the members (a depthwise conv stays depthwise); reading the
        shared input when ``shared_input`` (the first conv)."""
        layer = self.graph.weights[name]
        k = self.k
        outs = [self.axis(layer.out, m) for m in range(k)]
        p_out = outs[0][1]
        like = dict(kernel_size=module.kernel_size, stride=module.stride, padding=module.padding,
                    dilation=module.dilation, bias=module.bias is not None, padding_mode=module.padding_mode,
                    device="meta")
        if layer.kind == "depthwise":
            if shared_input:
                raise FuseUnsupported(f"{name}: a depthwise conv reading the input image")
            fused = nn.Conv2d(k * p_out, k * p_out, groups=k * p_out, **like)
            maps = [{0: m * p_out + outs[m][0]} for m in range(k)]
        elif shared_input:
            if layer.groups > 1 and layer.kind == "grouped":
                raise FuseUnsupported(f"{name}: a grouped conv reading the input image")
            c_in = module.in_channels
            fused = nn.Conv2d(c_in, k * p_out, groups=1, **like)
            maps = [{0: m * p_out + outs[m][0], 1: np.arange(c_in)} for m in range(k)]
        else:
            groups = layer.groups if layer.kind == "grouped" else 1
            ins = [self.axis(layer.inp, m) for m in range(k)]
            p_in = ins[0][1]
            if p_in % groups or p_out % groups:
                raise FuseUnsupported(f"{name}: {groups} groups do not divide the padded widths")
            per_group = p_in // groups
            in_maps = []
            for m in range(k):  # a member's columns: its channels of the first group, where they sit in a group
                local = ins[m][0][:len(ins[m][0]) // groups]
                if local.size and local.max() >= per_group:
                    raise FuseUnsupported(f"{name}: a member's channels do not line up with the conv groups")
                in_maps.append(local)
            fused = nn.Conv2d(k * p_in, k * p_out, groups=k * groups, **like)
            maps = [{0: m * p_out + outs[m][0], 1: in_maps[m]} for m in range(k)]
        fused.weight = self.tensor(f"{name}.weight", tuple(fused.weight.shape), maps, True)
        if module.bias is not None:
            fused.bias = self.tensor(f"{name}.bias", (k * p_out,), [{0: mp[0]} for mp in maps], True)
        return fused

    def linear(self, name: str, module: nn.Linear) -> FusedLinear:
        """The members' linear layers as one batched matmul."""
        layer = self.graph.weights[name]
        k = self.k
        outs = [self.axis(layer.out, m) for m in range(k)]
        ins = [self.axis(layer.inp, m) for m in range(k)]
        p_out, p_in = outs[0][1], ins[0][1]
        fused = FusedLinear(k, p_in, p_out, module.bias is not None, self.like)
        fused.weight = self.tensor(f"{name}.weight", (k, p_out, p_in),
                                   [{0: m * p_out + outs[m][0], 1: ins[m][0]} for m in range(k)], True,
                                   index_shape=(k * p_out, p_in))
        if module.bias is not None:
            fused.bias = self.tensor(f"{name}.bias", (k, p_out), [{0: m * p_out + outs[m][0]} for m in range(k)],
                                     True, index_shape=(k * p_out,))
        return fused

    def channel_tensors(self, owner: str, module: nn.Module, tensors) -> list[tuple[str, torch.Tensor]]:
        """The fused per-channel tensors of ``owner`` (BN affine and statistics, layer scale...)."""
        k = self.k
        axes = [self.axis(tensors.segs, m) for m in range(k)]
        p = axes[0][1]
        out = []
        for attr, axis in tensors.tensors.items():
            value = getattr(module, attr)
            if value is None:
                continue
            shape = list(value.shape)
            shape[axis] = k * p
            parameter = isinstance(value, nn.Parameter)
            fused = self.tensor(f"{owner}.{attr}" if owner else attr, tuple(shape),
                                [{axis: m * p + axes[m][0]} for m in range(k)], parameter)
            out.append((attr, fused))
        return out

    def layer_norm_mask(self, segs) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.k
        axes = [self.axis(segs, m) for m in range(k)]
        p = axes[0][1]
        mask = torch.zeros(k, p)
        for m in range(k):
            mask[m, torch.as_tensor(axes[m][0])] = 1.0
        return mask, mask.sum(-1, keepdim=True)


# --------------------------------------------------------------------------------------------------------------------
# The pass over the members' graph: one rule per kind of node, sharing one state.


@dataclass
class _Pass:
    """What the pass over the member graph knows so far; every rule reads and extends it."""

    b: _Builder
    modules: dict[str, nn.Module]  # the skeleton member's modules, by qualified name
    axis: dict[str, int] = field(default_factory=dict)  # nodes carrying the members: their fused axis
    # nodes whose value is the same for every member: the input batch and what follows from it alone
    shared: set[str] = field(default_factory=set)
    new_modules: dict[str, nn.Module] = field(default_factory=dict)  # fused layers, by qualified name
    new_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # fused tensors that get_attr nodes read
    ln_masks: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # functional layer norms

    @staticmethod
    def where(node: fx.Node) -> str:
        """How a refusal names the node: a module's qualified name, else the node's."""
        return f"{node.target if node.op == 'call_module' else node.name}"

    @staticmethod
    def inputs(node: fx.Node) -> list[fx.Node]:
        """The nodes among ``node``'s arguments (also inside lists and tuples)."""
        out = []
        for a in list(node.args) + list(node.kwargs.values()):
            if isinstance(a, fx.Node):
                out.append(a)
            elif isinstance(a, (list, tuple)):
                out.extend(x for x in a if isinstance(x, fx.Node))
        return out

    @staticmethod
    def ndim(node: fx.Node) -> int | None:
        shape = node.meta.get("nps_shape")
        return len(shape) if shape is not None else None

    def fused(self, x) -> bool:
        """Whether ``x`` (an argument) is a node carrying the members."""
        return isinstance(x, fx.Node) and x.name in self.axis

    def fused_inputs(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in self.inputs(node) if a.name in self.axis]

    def refuse(self, node: fx.Node, why: str) -> FuseUnsupported:
        return FuseUnsupported(f"{self.where(node)}: {why}")


# -- placeholder, output, get_attr -----------------------------------------------------------------------------------


def _placeholder(st: _Pass, node: fx.Node) -> None:
    st.shared.add(node.name)


def _output(st: _Pass, node: fx.Node) -> None:
    if not st.fused_inputs(node):
        raise FuseUnsupported("the network's output does not depend on its layers")
    out = node.args[0]
    if not isinstance(out, fx.Node) or out.name not in st.axis or st.axis[out.name] != 1 or st.ndim(out) != 2:
        raise FuseUnsupported("the network's output is not [batch, classes]")


def _get_attr(st: _Pass, node: fx.Node) -> None:
    """A per-channel tensor read as an attribute (a layer scale...): fused, with its owner's other channel tensors;
    any other attribute is the same for every member."""
    owner, _, attr = node.target.rpartition(".")
    tensors = st.b.graph.channel_tensors.get(owner)
    if tensors is None or attr not in tensors.tensors:
        st.shared.add(node.name)
        return
    if node.target not in st.new_tensors:
        for a, t in st.b.channel_tensors(owner, st.modules[owner], tensors):
            st.new_tensors[f"{owner}.{a}"] = t
    st.axis[node.name] = tensors.tensors[attr]


# -- modules ---------------------------------------------------------------------------------------------------------


def _conv(st: _Pass, node: fx.Node, module: nn.Conv2d, x) -> None:
    x_fused = st.fused(x)
    if not x_fused and not (isinstance(x, fx.Node) and x.name in st.shared):
        raise st.refuse(node, "an input nps cannot place")
    if x_fused and st.axis[x.name] != 1:
        raise st.refuse(node, "a conv reading a permuted tensor")
    st.new_modules[node.target] = st.b.conv(node.target, module, shared_input=not x_fused)
    st.axis[node.name] = 1


def _linear(st: _Pass, node: fx.Node, module: nn.Linear, x) -> None:
    if not st.fused(x) or st.axis[x.name] != st.ndim(x) - 1:
        raise st.refuse(node, "a linear layer not reading the fused last axis")
    st.new_modules[node.target] = st.b.linear(node.target, module)
    st.axis[node.name] = st.axis[x.name]


def _batch_norm(st: _Pass, node: fx.Node, module: nn.modules.batchnorm._BatchNorm, x) -> None:
    if not st.fused(x) or st.axis[x.name] != 1:
        raise st.refuse(node, "a BatchNorm not over the fused channels")
    b = st.b
    tensors = b.graph.channel_tensors[node.target]
    axes = [b.axis(tensors.segs, m) for m in range(b.k)]
    fused = type(module)(b.k * axes[0][1], eps=module.eps, momentum=module.momentum, affine=module.affine,
                         track_running_stats=module.track_running_stats, device="meta")
    for attr, t in b.channel_tensors(node.target, module, tensors):
        setattr(fused, attr, t)
    if module.track_running_stats:
        fused.num_batches_tracked = module.num_batches_tracked.detach().clone()
    fused.train(module.training)
    st.new_modules[node.target] = fused
    st.axis[node.name] = 1


def _layer_norm_module(st: _Pass, node: fx.Node, module: nn.LayerNorm, x) -> None:
    if not st.fused(x) or st.axis[x.name] != st.ndim(x) - 1 or len(module.normalized_shape) != 1:
        raise st.refuse(node, "a LayerNorm not over the fused channels")
    tensors = st.b.graph.channel_tensors[node.target]
    mask, counts = st.b.layer_norm_mask(tensors.segs)
    fused = FusedLayerNorm(module, mask, counts, st.b.like)
    for attr, t in st.b.channel_tensors(node.target, module, tensors):
        setattr(fused, attr, t)
    st.new_modules[node.target] = fused
    st.axis[node.name] = st.axis[x.name]


def _same_module(st: _Pass, node: fx.Node, module: nn.Module, x) -> None:
    """Elementwise and spatial modules: the result's channels are the input's."""
    if st.fused(x):
        st.axis[node.name] = st.axis[x.name]
    else:
        st.shared.add(node.name)


def _flatten_module(st: _Pass, node: fx.Node, module: nn.Flatten, x) -> None:
    if not st.fused(x):
        st.shared.add(node.name)
        return
    if st.axis[x.name] != module.start_dim or module.end_dim != -1:
        raise st.refuse(node, "a flatten that is not from the channels on")
    st.axis[node.name] = module.start_dim


_MODULE_RULES = (  # the first whose type matches applies
    (nn.Conv2d, _conv),
    (nn.Linear, _linear),
    (nn.modules.batchnorm._BatchNorm, _batch_norm),
    (nn.LayerNorm, _layer_norm_module),
    (_ELEMENTWISE_MODULES + _SPATIAL_MODULES, _same_module),
    (nn.Flatten, _flatten_module),
)


def _call_module(st: _Pass, node: fx.Node) -> None:
    module = st.modules[node.target]
    x = node.args[0] if node.args else None
    for types, rule in _MODULE_RULES:
        if isinstance(module, types):
            rule(st, node, module, x)
            return
    raise st.refuse(node, f"{type(module).__name__} cannot be fused")


# -- functions and methods -------------------------------------------------------------------------------------------


def _sizes(st: _Pass, node: fx.Node, axis: int) -> None:
    """Sizes: the fused sizes are what the code asks for (the node carries no channels)."""


def _cat(st: _Pass, node: fx.Node, axis: int) -> None:
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    tensors = node.args[0]
    if any(t.name not in st.axis for t in tensors):
        raise st.refuse(node, "a concat of member and shared tensors")
    if dim % st.ndim(node) == axis:
        node.target = member_cat
        node.args = (tensors,)
        node.kwargs = {"dim": dim, "k": st.b.k}
    st.axis[node.name] = axis


def _layer_norm_function(st: _Pass, node: fx.Node, axis: int) -> None:
    weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    owner = weight.target.rpartition(".")[0] if isinstance(weight, fx.Node) and weight.op == "get_attr" else None
    tensors = st.b.graph.channel_tensors.get(owner) if owner else None
    if tensors is None or axis != st.ndim(node) - 1:
        raise st.refuse(node, "a layer norm nps cannot fuse")
    st.ln_masks[node.name] = st.b.layer_norm_mask(tensors.segs)
    st.axis[node.name] = axis


def _elementwise(st: _Pass, node: fx.Node, axis: int) -> None:
    for a in st.inputs(node):  # a shared scalar is fine; a shared tensor would meet every member's channels
        shape = a.meta.get("nps_shape")
        if a.name in st.shared and a.op != "get_attr" and isinstance(shape, tuple) and math.prod(shape) > 1:
            raise st.refuse(node, "an operation between member and shared tensors")
    st.axis[node.name] = axis


def _flatten_function(st: _Pass, node: fx.Node, axis: int) -> None:
    start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
    end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1)
    if start != axis or end not in (-1, st.ndim(st.fused_inputs(node)[0]) - 1):
        raise st.refuse(node, "a flatten that is not from the channels on")
    st.axis[node.name] = start


def _reduce(st: _Pass, node: fx.Node, axis: int) -> None:
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    n = st.ndim(st.fused_inputs(node)[0])
    dims = [d % n for d in dims]
    if not dims or axis in dims:
        raise st.refuse(node, "a reduction over the channels")
    st.axis[node.name] = axis if keep else axis - sum(d < axis for d in dims)


def _permute(st: _Pass, node: fx.Node, axis: int) -> None:
    order = node.args[1:] if len(node.args) > 2 else node.args[1] if len(node.args) > 1 else node.kwargs.get("dims")
    order = [o % st.ndim(st.fused_inputs(node)[0]) for o in order]
    st.axis[node.name] = order.index(axis)


def _reshape(st: _Pass, node: fx.Node, axis: int) -> None:
    shape = node.meta.get("nps_shape")
    if axis != 1 or shape is None or len(shape) != 2:
        raise st.refuse(node, "a reshape of the channels")
    st.axis[node.name] = 1


# (contiguous, to, float, clone, detach and type are unary names: _elementwise)
_FUNCTION_RULES = {
    **{name: _elementwise for name in _UNARY_NAMES | _BINARY_NAMES | _SPATIAL_NAMES},
    **{name: _sizes for name in _SHAPE_NAMES | {"getattr"}},
    "cat": _cat, "concat": _cat,
    "layer_norm": _layer_norm_function,
    "flatten": _flatten_function,
    "mean": _reduce, "amax": _reduce, "sum": _reduce,
    "permute": _permute,
    "view": _reshape, "reshape": _reshape,
}


def _call_function(st: _Pass, node: fx.Node) -> None:
    """A function or tensor method: shared when no input carries the members; else the rule of its name, given the
    axis its (activation) inputs carry the members on."""
    fused_in = st.fused_inputs(node)
    if not fused_in:
        st.shared.add(node.name)
        return
    activations = [a for a in fused_in if a.op != "get_attr"] or fused_in
    axis = st.axis[activations[0].name]  # (a per-channel parameter broadcasts against the activation)
    if any(st.axis[a.name] != axis for a in activations):
        raise st.refuse(node, "members' channels on different axes")
    name = _target_name(node)
    rule = _FUNCTION_RULES.get(name)
    if rule is None:
        raise st.refuse(node, f"operation {name} on the members' channels")
    rule(st, node, axis)


_NODE_RULES = {"placeholder": _placeholder, "output": _output, "get_attr": _get_attr, "call_module": _call_module,
               "call_function": _call_function, "call_method": _call_function}


# --------------------------------------------------------------------------------------------------------------------
# fuse


def fuse(base: nn.Module, table: LayerTable, keeps, members: list[nn.Module]) -> FusedNetwork:
    """One :class:`FusedNetwork` for ``members`` (pruned from ``base`` by ``table`` with the keep vectors ``keeps``,
    on one device, in the same mode); their current weights and statistics are copied in. Raises
    :class:`FuseUnsupported` with the reason when the network cannot be fused."""
    from nps.pipeline.network.trace import trace

    if not members:
        raise ValueError("fuse needs at least one member")
    b = _Builder(base, table, keeps, members)
    skeleton = members[0]
    gm_source = trace(skeleton)
    _check_called_once(gm_source, b.graph)
    _record_shapes(skeleton, gm_source, table)
    st = _Pass(b, dict(skeleton.named_modules()))
    for node in gm_source.graph.nodes:
        _NODE_RULES.get(node.op, _call_function)(st, node)
    return _assemble(st, skeleton, gm_source)


def _check_called_once(gm_source: fx.GraphModule, graph) -> None:
    calls: dict[str, int] = {}
    for node in gm_source.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for name, count in calls.items():
        if count > 1 and name in graph.weights:
            raise FuseUnsupported(f"{name}: a layer called {count} times")


def _record_shapes(skeleton: nn.Module, gm_source: fx.GraphModule, table: LayerTable) -> None:
    """Every node's shape (batch 1, on the meta device) in its ``meta``, as the channel analysis records them."""
    from nps.pipeline.network.trace import _meta_copy, _Shapes

    meta_gm = fx.GraphModule(_meta_copy(skeleton).eval(), gm_source.graph)
    with torch.no_grad():
        _Shapes(meta_gm).run(torch.empty(1, table.in_channels, table.resolution, table.resolution, device="meta"))


def _assemble(st: _Pass, skeleton: nn.Module, gm_source: fx.GraphModule) -> FusedNetwork:
    """The fused module: the member's module tree with the fused layers and tensors in place."""
    root = copy.deepcopy(skeleton)
    for name, module in st.new_modules.items():
        root.set_submodule(name, module)
    for name, tensor in st.new_tensors.items():
        _set(root, name, tensor)
    gm = fx.GraphModule(root, gm_source.graph)
    like = st.b.like
    for node in list(gm.graph.nodes):
        if node.name in st.ln_masks:  # a functional layer norm: each member over its own channels
            mask, counts = st.ln_masks[node.name]
            mname, cname = f"_nps_ln_mask_{node.name}", f"_nps_ln_counts_{node.name}"
            gm.register_buffer(mname, mask.to(like.device, like.dtype))
            gm.register_buffer(cname, counts.to(like.device, like.dtype))
            with gm.graph.inserting_before(node):
                m_node = gm.graph.get_attr(mname)
                c_node = gm.graph.get_attr(cname)
            node.target = _functional_layer_norm
            node.kwargs = {**node.kwargs, "ln_mask": m_node, "ln_counts": c_node}
    gm.recompile()
    gm.train(skeleton.training)
    net = FusedNetwork(gm, st.b.k, st.b.params, st.b.members)
    net.load_members()
    return net
