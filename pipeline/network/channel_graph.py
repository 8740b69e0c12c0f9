"""Which channels of a CNN must be pruned together, read from its torch.fx graph.

One mechanism for every architecture. The model is traced with ``torch.fx`` (convolutions, linear and normalisation
layers are leaves), shapes come from one forward pass on the meta device, and a single pass over the graph follows
the **channel axis** of every tensor: each tensor's channels are a list of segments, each segment a range of one
*channel variable*. A convolution or linear layer creates a new variable for its outputs; everything else moves,
joins or concatenates the variables of its inputs:

- residual add, elementwise multiply (squeeze-excitation gates), a per-channel parameter (ConvNeXt's layer scale):
  the variables on both sides are the same channels (union-find);
- depthwise conv: its outputs are its inputs' channels; grouped conv: a new variable, and the channels on both sides
  can only be pruned in whole multiples of the conv's groups (at the same positions in every group);
- concat: the segments of its inputs, side by side (each input keeps its own variable; the consumer sees segments);
- permute, flatten (→ linear), pooling, activations, normalisation, dropout and stochastic depth: the same channels
  on a possibly different axis.

Anything else that touches channels (a channel shuffle, a reshape or split across the channel axis, an operation nps
does not know) raises :class:`UnsupportedPattern` naming the layer and the pattern, when the table is built.

The classes of the union-find are the candidate groups. A class that reaches the image or the network's output is
fixed (the input channels, the classes). A class is *internal* when every layer that reads, writes or rescales its
channels lies inside one block: the smallest module around them other than a ``Sequential``/``ModuleList``/
``ModuleDict`` is not the network itself (conv1/conv2 of a bottleneck, the expanded channels of an inverted
residual, the squeeze-excitation bottleneck).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn

from nps.pipeline.errors import NpsError


class UnsupportedPattern(NpsError):
    """The graph holds a pattern whose channels nps cannot follow (one line: the layer and the pattern)."""


@dataclass(frozen=True)
class Seg:
    """``length`` channels of channel variable ``var``; each channel spans ``spread`` elements of the axis (1, or
    the H·W elements a channel became after a flatten)."""

    var: int
    length: int
    spread: int = 1


@dataclass
class WeightLayer:
    """A conv or linear layer: the channel segments it reads and writes."""

    name: str
    kind: str  # "conv", "depthwise", "grouped", "linear"
    inp: tuple[Seg, ...]
    out: tuple[Seg, ...]
    groups: int
    kernel: int  # k_h·k_w (1 for linear)
    positions: list[int] = field(default_factory=list)  # per call: output positions (H·W, or the rows of a linear)
    bias: bool = False


@dataclass
class ChannelTensors:
    """Per-channel parameters and buffers of one module (BN, LayerNorm, a layer-scale parameter…), indexed along
    ``axis`` of each tensor named in ``tensors``."""

    owner: str
    tensors: dict[str, int]
    segs: tuple[Seg, ...]
    kind: str  # "batchnorm", "layernorm", "groupnorm", "instancenorm", "prelu", "param"


@dataclass
class ModuleCall:
    """A leaf-module call and the numel of its input and output in channel terms (for counting conventions):
    ``numel = const + per_channel · Σ length·spread`` over ``segs``."""

    name: str
    module_type: type
    in_segs: tuple[Seg, ...]
    in_per_channel: int
    in_const: int
    out_segs: tuple[Seg, ...]
    out_per_channel: int
    out_const: int


@dataclass
class TensorInfo:
    shape: tuple[int, ...]
    axis: int | None = None  # the channel axis, None for a tensor without one
    segs: tuple[Seg, ...] = ()
    param: str | None = None  # a model parameter or buffer (possibly reshaped): its qualified name
    param_dims: tuple[int | None, ...] = ()  # for each dim, the parameter's dim it comes from (None: added)


# ---------------------------------------------------------------------------------------------------------------------
# The analysis.


class ChannelGraph:
    """Channel variables of a traced model and every layer that reads, writes or rescales them.

    Build with :func:`analyze`. After building, variables are grouped into classes (``root(var)``); ``classes``
    maps a class root to its facts (size, fixed, members, …), in the order groups are listed (see ``ordered``).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules = dict(model.named_modules())
        self._parent: list[int] = []
        self._size: list[int] = []
        self._fixed: list[str] = []  # why a variable's channels cannot be pruned ("" if they can)
        self._structural: list[int] = []  # channels must be pruned in multiples of this (grouped convs, GroupNorm)
        self._mixed: list[bool] = []  # values of different channels mix (LayerNorm over channels, softmax…)
        self.weights: dict[str, WeightLayer] = {}
        self.weight_order: list[str] = []
        self.channel_tensors: dict[str, ChannelTensors] = {}
        self.calls: list[ModuleCall] = []
        self.first_node: dict[str, int] = {}  # module qualname (and each prefix) -> first graph position
        self.var_node: list[int] = []  # graph position where each variable was created
        self.gates: set[int] = set()  # variables that gate others by a broadcast multiply (squeeze-excitation)

    # -- union-find --------------------------------------------------------------------------------------------------

    def new_var(self, size: int, position: int, fixed: str = "") -> int:
        self._parent.append(len(self._parent))
        self._size.append(int(size))
        self._fixed.append(fixed)
        self._structural.append(1)
        self._mixed.append(False)
        self.var_node.append(position)
        return len(self._parent) - 1

    def root(self, var: int) -> int:
        parent = self._parent
        while parent[var] != var:
            parent[var] = parent[parent[var]]
            var = parent[var]
        return var

    def union(self, a: int, b: int, where: str) -> None:
        ra, rb = self.root(a), self.root(b)
        if ra == rb:
            return
        if self._size[ra] != self._size[rb]:
            raise UnsupportedPattern(f"{where}: joins {self._size[ra]} channels with {self._size[rb]}")
        if self.var_node[rb] < self.var_node[ra]:
            ra, rb = rb, ra
        self._parent[rb] = ra
        self._fixed[ra] = self._fixed[ra] or self._fixed[rb]
        self._structural[ra] = math.lcm(self._structural[ra], self._structural[rb])
        self._mixed[ra] = self._mixed[ra] or self._mixed[rb]

    def fix(self, segs, why: str) -> None:
        for seg in segs:
            r = self.root(seg.var)
            self._fixed[r] = self._fixed[r] or why

    def structural(self, var: int) -> int:
        return self._structural[self.root(var)]

    def require_multiple(self, var: int, multiple: int) -> None:
        r = self.root(var)
        self._structural[r] = math.lcm(self._structural[r], int(multiple))

    def mark_mixed(self, segs) -> None:
        for seg in segs:
            self._mixed[self.root(seg.var)] = True

    def size(self, var: int) -> int:
        return self._size[self.root(var)]

    def fixed_reason(self, var: int) -> str:
        return self._fixed[self.root(var)]

    def mixed(self, var: int) -> bool:
        return self._mixed[self.root(var)]


def _shape(node: fx.Node):
    return node.meta.get("nps_shape")
