"""The layer table of a base network: its prunable channel groups and closed-form FLOPs/params.

A **group** is a set of channels that are pruned together (:mod:`nps.pipeline.network.channel_graph` finds them from the
model's torch.fx graph, for any traceable CNN). FLOPs and params of the pruned network are quadratic forms in the
groups' kept counts (``nps.kernels.complexity.QuadraticForm``).

Granularity
-----------
A group whose channels feed or leave a grouped conv (ResNeXt, RegNet) keeps a multiple of the conv's groups, and
the user's ``channel_multiple`` m (e.g. 8 for tensor cores) asks for multiples of m on top: group i keeps a multiple
of ``g_i = lcm(conv groups, gcd(c_i, m))`` channels (the multiple of m where m divides its width c_i, else the
largest common divisor of the two). The forms are written over **units** ``keep_i / g_i``, so their coefficients are
integers and the samplers work on unit counts ``c_i / g_i`` unchanged. A recipe r keeps
``keep_i = g_i · max(1, floor((1 − r_i) · c_i / g_i + 1/2))`` channels (for g = 1: ``max(1, round((1 − r)·c))``).
A group with a single unit cannot be pruned and is not listed.

FLOPs conventions
-----------------
``macs`` (the default): **multiply-accumulates of every conv and linear layer** at the table's input resolution,
batch 1 (bias adds, normalisation, activations, pooling and elementwise adds are not counted).
``torch.utils.flop_counter.FlopCounterMode`` counts 2 FLOPs per MAC of exactly these layers, so
``FLOPs = FlopCounterMode total / 2`` (tests check this).

``paper``: what the paper reports (ResNet-50: 4.12 G), the count of ptflops' module hooks: the MACs above plus the
bias adds of convs and linear layers, 2 per element of BatchNorm/GroupNorm/InstanceNorm (1 for LayerNorm), 1 per
output element of ReLU, ReLU6, PReLU, ELU, LeakyReLU and GELU, and 1 per input element of pooling layers (module
types exactly as ptflops lists them: SiLU, Hardswish, sigmoids, elementwise adds and multiplies, concatenations and
functional calls are not counted, as ptflops does not). Every extra term is linear in the kept channels.

Params are the trainable parameters of the network (BN running statistics are buffers, not params).

Modes
-----
``all``: every group that is neither the image nor the classes. ``internal``: only channels that nothing ties across
blocks (conv1/conv2 of a bottleneck, the expanded channels of an inverted residual, the squeeze-excitation
bottleneck, a ConvNeXt block's hidden channels): the stem, the residual streams and the classifier keep their width.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from torch import nn

from nps.kernels.complexity import QuadraticForm
from nps.pipeline.catalog import FLOPS_CONVENTIONS
from nps.pipeline.errors import NpsError
from nps.pipeline.network.channel_graph import ChannelGraph, Seg
from nps.pipeline.network.channel_groups import ChannelClass, classes
from nps.pipeline.network.models import build_model
from nps.pipeline.network.table import LATENCY_UNIT, LayerTable, feasible_range  # noqa: F401 - also imported here
from nps.pipeline.network.trace import analyze

MODES = ("internal", "all")
CONVENTIONS = FLOPS_CONVENTIONS

# ptflops' module hooks (pytorch backend, count_functional=False), by exact module type.
_PAPER_OUTPUT = (nn.ReLU, nn.PReLU, nn.ELU, nn.LeakyReLU, nn.ReLU6, nn.GELU, nn.Upsample)
_PAPER_INPUT = (nn.MaxPool1d, nn.AvgPool1d, nn.AvgPool2d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool3d,
                nn.AdaptiveMaxPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d,
                nn.AdaptiveMaxPool3d, nn.AdaptiveAvgPool3d)
_PAPER_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
               nn.InstanceNorm3d, nn.GroupNorm, nn.LayerNorm)


@dataclass
class GroupSelection:
    """The classes of channels a table prunes, in order, and the granularity of each."""

    classes: list[ChannelClass]
    granularity: list[int]

    def index(self, graph: ChannelGraph) -> dict[int, tuple[int, int]]:
        """Class root → (group index, granularity)."""
        return {c.root: (i, g) for i, (c, g) in enumerate(zip(self.classes, self.granularity))}


def select_groups(graph: ChannelGraph, mode: str, channel_multiple: int = 1) -> GroupSelection:
    """The groups of ``mode`` (see the module docstring), with their granularity under ``channel_multiple``."""
    if mode not in MODES:
        raise NpsError(f"unknown pruning mode {mode!r}; known modes: {', '.join(MODES)}")
    chosen, granularity = [], []
    for c in classes(graph):
        if c.fixed or (mode == "internal" and not c.internal):
            continue
        g = math.lcm(c.structural, math.gcd(c.size, int(channel_multiple)))
        if c.size // g < 2:
            continue
        chosen.append(c)
        granularity.append(g)
    return GroupSelection(chosen, granularity)


class _FormBuilder:
    """Accumulates ``coef · A · B / divisor`` for linear combinations A, B of unit counts: exact integers (FLOPs,
    params), or with ``exact=False`` real coefficients rounded to whole units once, in :meth:`form` (latency)."""

    def __init__(self, groups: int, exact: bool = True):
        self.exact = exact
        self.const = 0
        self.linear = [0] * groups
        self.pairs: dict[tuple[int, int], int] = {}

    def _div(self, value, divisor: int):
        if not self.exact:
            return value / divisor if divisor != 1 else value
        if value % divisor:  # pragma: no cover - the granularity makes every term divisible
            raise AssertionError(f"form term {value} is not divisible by {divisor}")
        return value // divisor

    def add(self, coef: int, a: tuple[int, dict], b: tuple[int, dict] | None = None, divisor: int = 1) -> None:
        ca, la = a
        cb, lb = b if b is not None else (1, {})
        self.const += self._div(coef * ca * cb, divisor)
        for i, w in la.items():
            self.linear[i] += self._div(coef * w * cb, divisor)
        for j, w in lb.items():
            self.linear[j] += self._div(coef * ca * w, divisor)
        for i, wa in la.items():
            for j, wb in lb.items():
                key = (min(i, j), max(i, j))
                self.pairs[key] = self.pairs.get(key, 0) + self._div(coef * wa * wb, divisor)

    def form(self) -> QuadraticForm:
        if not self.exact:  # whole units, round half to even (Python's round, numpy's rint)
            self.const, self.linear = round(self.const), [round(v) for v in self.linear]
            self.pairs = {k: round(w) for k, w in self.pairs.items()}
        keys = sorted(k for k, w in self.pairs.items() if w)
        return QuadraticForm(self.const, np.array(self.linear, dtype=np.int64),
                             np.array([a for a, _ in keys], dtype=np.int64),
                             np.array([b for _, b in keys], dtype=np.int64),
                             np.array([self.pairs[k] for k in keys], dtype=np.int64))


def _combiner(graph: ChannelGraph, selection: GroupSelection):
    """``combo(segs)``: Σ spread · keep over a tensor's channel segments, as (constant, {group: coefficient of its
    unit count}): a layer's input or output channel count as a linear function of the kept units."""
    groups = selection.index(graph)

    def combo(segs: tuple[Seg, ...]) -> tuple[int, dict]:
        const, lin = 0, {}
        for seg in segs:
            hit = groups.get(graph.root(seg.var))
            if hit is None:
                const += seg.spread * seg.length
            else:
                i, g = hit
                lin[i] = lin.get(i, 0) + seg.spread * g
        return const, lin

    return combo


def _complexity_forms(graph: ChannelGraph, selection: GroupSelection, convention: str):
    combo = _combiner(graph, selection)
    n = len(selection.classes)
    flops, params = _FormBuilder(n), _FormBuilder(n)
    covered: set[str] = set()
    for name in graph.weight_order:
        layer = graph.weights[name]
        inp, out = combo(layer.inp), combo(layer.out)
        if layer.kind == "depthwise":
            for positions in layer.positions:
                flops.add(layer.kernel * positions, out)
            params.add(layer.kernel, out)
        else:
            divisor = layer.groups
            for positions in layer.positions:
                flops.add(layer.kernel * positions, inp, out, divisor)
            params.add(layer.kernel, inp, out, divisor)
        covered.add(f"{name}.weight")
        if layer.bias:
            params.add(1, out)
            covered.add(f"{name}.bias")
    for tensors in graph.channel_tensors.values():
        owner = graph.modules.get(tensors.owner)
        for attr, axis in tensors.tensors.items():
            value = getattr(owner, attr, None) if owner is not None else None
            if isinstance(value, nn.Parameter):
                params.add(value.numel() // value.shape[axis], combo(tensors.segs))
                covered.add(f"{tensors.owner}.{attr}" if tensors.owner else attr)
    params.const += sum(p.numel() for name, p in graph.model.named_parameters() if name not in covered)
    if convention == "paper":
        _paper_terms(graph, flops, combo)
    return flops.form(), params.form()


def _paper_terms(graph: ChannelGraph, flops: _FormBuilder, combo) -> None:
    """ptflops' extra terms per module call (see the module docstring)."""
    for call in graph.calls:
        module = graph.modules[call.name]
        kind = type(module)
        out = (call.out_const, call.out_per_channel, call.out_segs)
        inp = (call.in_const, call.in_per_channel, call.in_segs)
        if kind in (nn.Conv2d, nn.Linear) and getattr(module, "bias", None) is not None:
            terms = [(1, out)]
        elif kind in _PAPER_NORM:
            terms = [(2 if getattr(module, "affine", False) else 1, inp)]
        elif kind in _PAPER_OUTPUT:
            terms = [(1, out)]
        elif kind in _PAPER_INPUT:
            terms = [(1, inp)]
        else:
            continue
        for coef, (const, per_channel, segs) in terms:
            flops.const += coef * const
            if segs:
                flops.add(coef * per_channel, combo(segs))


def latency_form(graph: ChannelGraph, selection: GroupSelection, model) -> QuadraticForm:
    """The latency model ``model`` (:class:`nps.pipeline.network.latency_model.LatencyModel`) as a form over the
    groups' unit counts: ``offset + scale · Σ_layers (a + b·cin·P/groups + c·P + d·cin)`` (a depthwise conv:
    ``a + c·P``), each layer's cin the linear function of the kept units the FLOPs form uses and P its output count
    (:func:`~nps.pipeline.network.latency_model.layer_terms`), every coefficient rounded to whole femtoseconds
    (:data:`LATENCY_UNIT`). A padded layer's P is its output group's padded variable (a padded form,
    :mod:`nps.kernels.complexity`) when its output channels are one group's (the usual conv); a fixed output count
    is padded in the constant; an output made of several groups (a concatenation) is priced unpadded. A layer whose
    input is padded too (``padded_in``) prices its cin the same way. Non-negative coefficients make it monotone in
    every count, as the samplers need."""
    from nps.pipeline.network.latency_model import padded_count

    combo = _combiner(graph, selection)
    index = {name: i for i, name in enumerate(model.layers)}
    missing = [name for name in graph.weight_order if name not in index]
    if missing:
        raise NpsError(f"the latency model of {model.model} has no timing of layer {missing[0]!r} "
                       f"({len(missing)} missing): measure it again with nps latency-model for this network")
    G = len(selection.classes)
    unit = [int(g) for g in selection.granularity]
    form = _FormBuilder(2 * G, exact=False)  # variables G + j: group j's channels padded to the block
    form.const = model.offset / LATENCY_UNIT
    padded_any = False

    def padded(count, block: int):
        """(the count as the form prices it, whether it is a group's padded variable): one group's channels become
        that group's padded variable, a fixed count is padded in the constant, several groups stay unpadded."""
        const, lin = count
        if block <= 1:
            return count, False
        group, per_unit = next(iter(lin.items())) if len(lin) == 1 else (None, 0)
        if not lin:  # a fixed count
            return (int(padded_count(const, block)), {}), False
        if const == 0 and per_unit == unit[group]:  # one group's channels: its padded variable
            return (0, {G + group: 1}), True
        return count, False

    for name in graph.weight_order:
        layer, i = graph.weights[name], index[name]
        a, b, c, d = (float(x) * model.scale / LATENCY_UNIT for x in model.coef[i] * model.term_scale)
        out, out_padded = padded(combo(layer.out), model.layer_block(i))
        inp, in_padded = padded(combo(layer.inp), model.layer_in_block(i))
        padded_any = padded_any or out_padded or (in_padded and layer.kind != "depthwise")
        form.const += a
        if layer.kind == "depthwise":
            form.add(c, out)
            continue
        form.add(b / layer.groups, inp, out)
        form.add(c, out)
        form.add(d, inp)
    full = form.form()
    if not padded_any:
        return QuadraticForm(full.const, full.linear[:G], full.pair_a, full.pair_b, full.pair_w)
    return QuadraticForm(full.const, full.linear, full.pair_a, full.pair_b, full.pair_w,
                         pad_mult=np.asarray(unit, dtype=np.int64), pad_block=np.full(G, model.block, np.int64))


def check_latency_model(table: LayerTable, model) -> None:
    """One NpsError line unless ``model`` (a LatencyModel) prices ``table``: the same network, resolution, classes
    and input channels, and filter pruning."""
    what = [("model", table.model, model.model), ("resolution", table.resolution, model.resolution),
            ("num_classes", table.num_classes, model.num_classes), ("in_channels", table.in_channels,
                                                                    model.in_channels)]
    for key, have, got in what:
        if have != got:
            raise NpsError(f"the latency model is of {key} {got!r}, the network here has {have!r}: measure one for "
                           f"it with nps latency-model --model {table.model} --resolution {table.resolution}")
    if table.mode == "weights":
        raise NpsError("a latency model prices filter pruning (weight pruning keeps every dense shape)")


def _with_form(table: LayerTable, graph: ChannelGraph, selection: GroupSelection, model) -> LayerTable:
    import dataclasses

    form = latency_form(graph, selection, model)
    return dataclasses.replace(table, latency=form, base_latency=int(form(table.units)))


def with_latency(table: LayerTable, model) -> LayerTable:
    """``table`` with the latency form of ``model`` (:func:`check_latency_model`) and the base network's predicted
    latency, for a table already built (tracing the network again); :func:`build_layer_table` takes the model
    directly and traces once."""
    check_latency_model(table, model)
    net = build_model(table.model, num_classes=table.num_classes, in_channels=table.in_channels, device="meta")
    graph, _ = analyze(net, int(table.resolution), table.in_channels)
    return _with_form(table, graph, select_groups(graph, table.mode, table.channel_multiple), model)


def _check_options(mode: str, flops: str, channel_multiple: int) -> None:
    if mode not in MODES:
        raise NpsError(f"unknown pruning mode {mode!r}; known modes: {', '.join(MODES)}")
    if flops not in CONVENTIONS:
        raise NpsError(f"unknown FLOPs convention {flops!r}; use {' or '.join(CONVENTIONS)}")
    if isinstance(channel_multiple, bool) or not isinstance(channel_multiple, (int, np.integer)) or \
            channel_multiple < 1:
        raise NpsError(f"channel multiple must be a positive integer, got {channel_multiple!r}")


def table_from_graph(graph: ChannelGraph, model_name: str, mode: str, resolution: int, num_classes: int,
                     in_channels: int, *, flops: str = "macs", channel_multiple: int = 1,
                     latency_model=None) -> LayerTable:
    """The layer table of an analysed model (see :func:`nps.pipeline.network.trace.analyze`), with the latency form
    of ``latency_model`` when given (:func:`check_latency_model`)."""
    _check_options(mode, flops, channel_multiple)
    selection = select_groups(graph, mode, channel_multiple)
    flops_form, params_form = _complexity_forms(graph, selection, flops)
    channels = np.array([c.size for c in selection.classes], dtype=np.int64)
    granularity = np.array(selection.granularity, dtype=np.int64)
    units = channels // granularity
    base_params = int(params_form(units))
    total = sum(p.numel() for p in graph.model.parameters())
    if base_params != total:  # pragma: no cover - every parameter is either per channel, a layer's or constant
        raise AssertionError(f"params form gives {base_params} for the full network, which has {total}")
    table = LayerTable(model=model_name, mode=mode, resolution=int(resolution), num_classes=num_classes,
                       in_channels=in_channels, names=[c.name for c in selection.classes], channels=channels,
                       members=[list(c.members) for c in selection.classes], flops=flops_form, params=params_form,
                       base_flops=int(flops_form(units)), base_params=base_params, granularity=granularity,
                       flops_convention=flops, channel_multiple=int(channel_multiple))
    if latency_model is None:
        return table
    check_latency_model(table, latency_model)
    return _with_form(table, graph, selection, latency_model)


def table_from_model(model: nn.Module, model_name: str, mode: str, resolution: int, num_classes: int,
                     in_channels: int, *, flops: str = "macs", channel_multiple: int = 1,
                     latency_model=None) -> LayerTable:
    """The layer table of an already built model (one batch-1 forward pass on the meta device)."""
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise NpsError(f"resolution must be a positive integer number of pixels, got {resolution!r}")
    _check_options(mode, flops, channel_multiple)
    graph, _ = analyze(model, int(resolution), in_channels)
    return table_from_graph(graph, model_name, mode, resolution, num_classes, in_channels, flops=flops,
                            channel_multiple=channel_multiple, latency_model=latency_model)


def build_layer_table(model_name: str, mode: str, resolution: int, num_classes: int, in_channels: int = 3, *,
                      flops: str = "macs", channel_multiple: int = 1, latency_model=None) -> LayerTable:
    """Layer table of a registry model (built on the meta device where it can be: no weights are allocated).

    Raises
    ------
    NpsError
        Unknown model, mode or convention, a resolution at which a feature map would vanish, or a pattern the
        channel analysis cannot follow (:class:`nps.pipeline.network.channel_graph.UnsupportedPattern`).
    """
    _check_options(mode, flops, channel_multiple)
    model = build_model(model_name, num_classes=num_classes, in_channels=in_channels, device="meta")
    return table_from_model(model, model_name, mode, resolution, num_classes, in_channels, flops=flops,
                            channel_multiple=channel_multiple, latency_model=latency_model)
