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
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from nps.kernels.complexity import QuadraticForm, keep_from_recipe
from nps.pipeline.catalog import FLOPS_CONVENTIONS
from nps.pipeline.errors import NpsError
from nps.pipeline.network.channel_graph import ChannelGraph, Seg
from nps.pipeline.network.channel_groups import ChannelClass, classes
from nps.pipeline.network.models import build_model
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
    """Accumulates ``coef · A · B / divisor`` for linear combinations A, B of unit counts (exact integers)."""

    def __init__(self, groups: int):
        self.const = 0
        self.linear = [0] * groups
        self.pairs: dict[tuple[int, int], int] = {}

    @staticmethod
    def _div(value: int, divisor: int) -> int:
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
        keys = sorted(k for k, w in self.pairs.items() if w)
        return QuadraticForm(self.const, np.array(self.linear, dtype=np.int64),
                             np.array([a for a, _ in keys], dtype=np.int64),
                             np.array([b for _, b in keys], dtype=np.int64),
                             np.array([self.pairs[k] for k in keys], dtype=np.int64))


def _complexity_forms(graph: ChannelGraph, selection: GroupSelection, convention: str):
    groups = selection.index(graph)

    def combo(segs: tuple[Seg, ...]) -> tuple[int, dict]:
        """Σ spread · keep over the segments, as (constant, {group: coefficient of its unit count})."""
        const, lin = 0, {}
        for seg in segs:
            hit = groups.get(graph.root(seg.var))
            if hit is None:
                const += seg.spread * seg.length
            else:
                i, g = hit
                lin[i] = lin.get(i, 0) + seg.spread * g
        return const, lin

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


@dataclass
class LayerTable:
    """Prunable channel groups of one base network and its FLOPs/params as functions of the kept channels.

    A **weight table** (``mode == "weights"``, :mod:`nps.pipeline.network.weight_table`) is the same structure for
    weight pruning: one "group" per prunable layer, ``channels`` its number of weights, linear forms.

    ``flops`` and ``params`` are forms over unit counts ``keep / granularity`` (see the module docstring); use
    :meth:`flops_of` / :meth:`params_of` for kept-channel counts. ``keep`` arguments are kept-channel counts, one
    per group: shape (G,) or (n, G).
    """

    model: str
    mode: str
    resolution: int
    num_classes: int
    in_channels: int
    names: list[str]
    channels: np.ndarray
    members: list[list[str]]
    flops: QuadraticForm
    params: QuadraticForm
    base_flops: int
    base_params: int
    granularity: np.ndarray = field(default=None)  # type: ignore[assignment]
    flops_convention: str = "macs"
    channel_multiple: int = 1

    def __post_init__(self):
        self.channels = np.asarray(self.channels, dtype=np.int64)
        if self.granularity is None:
            self.granularity = np.ones(len(self.channels), dtype=np.int64)
        self.granularity = np.asarray(self.granularity, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def units(self) -> np.ndarray:
        """Unit counts per group: ``channels / granularity`` (what the samplers draw)."""
        return self.channels // self.granularity

    def keep(self, recipe) -> np.ndarray:
        """Kept channels for one recipe (G,) or many (n, G): ``g · max(1, round_half_up((1 - r) · c / g))``."""
        recipe = np.asarray(recipe, dtype=np.float64)
        if recipe.ndim not in (1, 2) or recipe.shape[-1] != len(self):
            raise NpsError(f"a recipe for {self.model} ({self.mode}) needs {len(self)} ratios, "
                           f"got shape {recipe.shape}")
        if not np.all((recipe >= 0.0) & (recipe <= 1.0)):
            raise NpsError("pruning ratios must lie in [0, 1]")
        return keep_from_recipe(recipe, self.channels, self.granularity)

    def check_keep(self, keep) -> np.ndarray:
        """``keep`` as int64 after checking its length, that 1 <= keep <= channels and that every count is a
        multiple of its group's granularity; raises ``NpsError``."""
        keep = np.asarray(keep)
        if keep.ndim not in (1, 2) or keep.shape[-1] != len(self):
            raise NpsError(f"a keep vector for {self.model} ({self.mode}) needs {len(self)} counts, "
                           f"got shape {keep.shape}")
        what = ("weights", "layer") if self.mode == "weights" else ("channels", "group")
        if keep.dtype.kind not in "iu" and not np.all(np.asarray(keep, dtype=np.float64) % 1 == 0):
            raise NpsError(f"kept-{what[0][:-1]} counts must be integers")
        keep = keep.astype(np.int64)
        bad = (keep < 1) | (keep > self.channels)
        if np.any(bad):
            group = int(np.nonzero(bad.reshape(-1, len(self)).any(axis=0))[0][0])
            raise NpsError(f"kept {what[0]} of {what[1]} {self.names[group]!r} must lie in "
                           f"[1, {self.channels[group]}]")
        off = keep % self.granularity != 0
        if np.any(off):
            group = int(np.nonzero(off.reshape(-1, len(self)).any(axis=0))[0][0])
            raise NpsError(f"kept channels of group {self.names[group]!r} must be a multiple of "
                           f"{self.granularity[group]}")
        return keep

    def to_units(self, keep) -> np.ndarray:
        """Checked kept-channel counts as unit counts (what the forms take)."""
        return self.check_keep(keep) // self.granularity

    def flops_of(self, keep) -> np.ndarray:
        """Exact FLOPs (this table's convention) per keep vector (int64)."""
        return self.flops(self.to_units(keep))

    def params_of(self, keep) -> np.ndarray:
        """Exact params per keep vector (int64)."""
        return self.params(self.to_units(keep))

    def c_flops(self, keep) -> np.ndarray:
        """FLOPs(sub) / FLOPs(base) per keep vector (float64)."""
        return self.flops_of(keep) / self.base_flops

    def c_params(self, keep) -> np.ndarray:
        """Params(sub) / Params(base) per keep vector (float64)."""
        return self.params_of(keep) / self.base_params

    def mcb(self, keep) -> np.ndarray:
        """Mean computation budget: (FLOPs(sub) / Params(sub)) / (FLOPs(base) / Params(base))."""
        units = self.to_units(keep)
        return (self.flops(units) / self.params(units)) / (self.base_flops / self.base_params)

    def feasible_range(self, max_ratio: float) -> tuple[float, float]:
        """(min, max) c_flops reachable with every ratio in [0, max_ratio]; see ``feasible_range``."""
        return feasible_range(self, max_ratio)

    def describe(self) -> str:
        """One line: model, mode, resolution, groups and the FLOPs convention."""
        extra = f", channel multiple {self.channel_multiple}" if self.channel_multiple > 1 else ""
        if self.mode == "weights":
            return (f"{self.model} (weight pruning, {self.resolution} px, {len(self)} layers; FLOPs: "
                    f"{'conv+linear MACs' if self.flops_convention == 'macs' else 'ptflops (paper)'})")
        return (f"{self.model} ({self.mode}, {self.resolution} px, {len(self)} groups{extra}; FLOPs: "
                f"{'conv+linear MACs' if self.flops_convention == 'macs' else 'ptflops (paper)'})")

    def to_hdf5(self, group) -> None:
        """Write the table into an open ``h5py.Group`` (datasets and attrs; see ``from_hdf5``)."""
        import h5py

        text = h5py.string_dtype()
        group.create_dataset("names", data=np.array(self.names, dtype=object), dtype=text)
        group.create_dataset("channels", data=np.asarray(self.channels, dtype=np.int64))
        group.create_dataset("granularity", data=np.asarray(self.granularity, dtype=np.int64))
        group.create_dataset("members", data=np.array([",".join(m) for m in self.members], dtype=object),
                             dtype=text)
        for prefix, form in (("flops", self.flops), ("params", self.params)):
            group.create_dataset(f"{prefix}_const", data=np.int64(form.const))
            group.create_dataset(f"{prefix}_linear", data=form.linear)
            group.create_dataset(f"{prefix}_pair_a", data=form.pair_a)
            group.create_dataset(f"{prefix}_pair_b", data=form.pair_b)
            group.create_dataset(f"{prefix}_pair_w", data=form.pair_w)
        for key in ("mode", "model", "flops_convention"):
            group.attrs[key] = getattr(self, key)
        for key in ("resolution", "num_classes", "in_channels", "base_flops", "base_params", "channel_multiple"):
            group.attrs[key] = np.int64(getattr(self, key))

    @classmethod
    def from_hdf5(cls, group) -> "LayerTable":
        """Read a table written by ``to_hdf5`` (files written before granularity and conventions existed read as
        granularity 1, ``macs``)."""

        def text(value) -> str:
            return value.decode() if isinstance(value, bytes) else str(value)

        def form(prefix: str) -> QuadraticForm:
            return QuadraticForm(int(group[f"{prefix}_const"][()]), group[f"{prefix}_linear"][()],
                                 group[f"{prefix}_pair_a"][()], group[f"{prefix}_pair_b"][()],
                                 group[f"{prefix}_pair_w"][()])

        members = [text(m) for m in group["members"][()]]
        channels = np.asarray(group["channels"][()], dtype=np.int64)
        granularity = group["granularity"][()] if "granularity" in group else np.ones_like(channels)
        return cls(
            model=text(group.attrs["model"]), mode=text(group.attrs["mode"]),
            resolution=int(group.attrs["resolution"]), num_classes=int(group.attrs["num_classes"]),
            in_channels=int(group.attrs["in_channels"]),
            names=[text(n) for n in group["names"][()]], channels=channels,
            members=[m.split(",") if m else [] for m in members],
            flops=form("flops"), params=form("params"),
            base_flops=int(group.attrs["base_flops"]), base_params=int(group.attrs["base_params"]),
            granularity=np.asarray(granularity, dtype=np.int64),
            flops_convention=text(group.attrs.get("flops_convention", "macs")),
            channel_multiple=int(group.attrs.get("channel_multiple", 1)),
        )

    def __eq__(self, other) -> bool:
        if not isinstance(other, LayerTable):
            return NotImplemented
        scalars = ("model", "mode", "resolution", "num_classes", "in_channels", "names", "members", "flops",
                   "params", "base_flops", "base_params", "flops_convention", "channel_multiple")
        return all(getattr(self, k) == getattr(other, k) for k in scalars) and \
            np.array_equal(self.channels, other.channels) and np.array_equal(self.granularity, other.granularity)


def _check_options(mode: str, flops: str, channel_multiple: int) -> None:
    if mode not in MODES:
        raise NpsError(f"unknown pruning mode {mode!r}; known modes: {', '.join(MODES)}")
    if flops not in CONVENTIONS:
        raise NpsError(f"unknown FLOPs convention {flops!r}; use {' or '.join(CONVENTIONS)}")
    if isinstance(channel_multiple, bool) or not isinstance(channel_multiple, (int, np.integer)) or \
            channel_multiple < 1:
        raise NpsError(f"channel multiple must be a positive integer, got {channel_multiple!r}")


def table_from_graph(graph: ChannelGraph, model_name: str, mode: str, resolution: int, num_classes: int,
                     in_channels: int, *, flops: str = "macs", channel_multiple: int = 1) -> LayerTable:
    """The layer table of an analysed model (see :func:`nps.pipeline.network.trace.analyze`)."""
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
    return LayerTable(model=model_name, mode=mode, resolution=int(resolution), num_classes=num_classes,
                      in_channels=in_channels, names=[c.name for c in selection.classes], channels=channels,
                      members=[list(c.members) for c in selection.classes], flops=flops_form, params=params_form,
                      base_flops=int(flops_form(units)), base_params=base_params, granularity=granularity,
                      flops_convention=flops, channel_multiple=int(channel_multiple))


def table_from_model(model: nn.Module, model_name: str, mode: str, resolution: int, num_classes: int,
                     in_channels: int, *, flops: str = "macs", channel_multiple: int = 1) -> LayerTable:
    """The layer table of an already built model (one batch-1 forward pass on the meta device)."""
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise NpsError(f"resolution must be a positive integer number of pixels, got {resolution!r}")
    _check_options(mode, flops, channel_multiple)
    graph, _ = analyze(model, int(resolution), in_channels)
    return table_from_graph(graph, model_name, mode, resolution, num_classes, in_channels, flops=flops,
                            channel_multiple=channel_multiple)


def build_layer_table(model_name: str, mode: str, resolution: int, num_classes: int, in_channels: int = 3, *,
                      flops: str = "macs", channel_multiple: int = 1) -> LayerTable:
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
                            channel_multiple=channel_multiple)


def feasible_range(table: LayerTable, max_ratio: float) -> tuple[float, float]:
    """Smallest and largest c_flops reachable with every ratio in [0, R].

    FLOPs are monotone in every keep count, so the minimum is at ``r_i = R`` for all groups and the maximum (1.0)
    at ``r = 0``.
    """
    if not 0.0 <= max_ratio <= 1.0:
        raise NpsError(f"the largest pruning ratio R must lie in [0, 1], got {max_ratio}")
    low = table.c_flops(table.keep(np.full(len(table), max_ratio)))
    high = table.c_flops(table.channels)
    return float(low), float(high)
