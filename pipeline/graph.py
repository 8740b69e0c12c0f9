"""The layer table of a base network: its prunable channel groups and closed-form FLOPs/params.

A **group** is a set of channels that are pruned together: the output channels of one conv inside a residual block,
or, in ``all`` mode, the channels of the stem or of one stage's residual stream (every block's last conv and the
stage's shortcut conv write into them, so they must keep the same indices). FLOPs and params of the pruned network
are quadratic forms in the kept-channel counts (``nps.kernels.complexity.QuadraticForm``).

FLOPs here are **multiply-accumulates of every Conv2d and Linear layer** at the table's input resolution, batch 1:
``in·out·k·k·H_out·W_out / groups`` per conv and ``in·out`` per linear layer (bias adds, BN, ReLU, pooling and the
residual adds are not counted). ``torch.utils.flop_counter.FlopCounterMode`` counts 2 FLOPs per MAC of exactly these
layers, so ``FLOPs = FlopCounterMode total / 2`` (tests check this). Params are the trainable parameters of conv,
linear and BN layers (BN running statistics are buffers, not params).

Modes
-----
``internal``
    Only the convs inside residual blocks: ``conv1`` and ``conv2`` of a Bottleneck, ``conv1`` of a BasicBlock. The
    stem, the residual streams, the shortcuts' outputs and the classifier keep their width.
``all``
    Also the stem and each stage's residual stream (one group per stage). Where the first stage has no shortcut
    conv (resnet18/34, the CIFAR ResNets), the residual add ties the stem to that stage: they are one group, named
    ``conv1+layer1.residual``.

Groups are ordered as the walker meets them: the stem, then per block a new residual stream (where a shortcut conv
starts one) followed by the block's internal convs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from nps.kernels.complexity import QuadraticForm, keep_from_recipe
from nps.pipeline.errors import NpsError
from nps.pipeline.models import build_model

MODES = ("internal", "all")

FIXED = -1
"""Group index of channels that no group prunes (the image, an unpruned stream, the classes)."""


@dataclass(frozen=True)
class ConvSlot:
    """One conv (or the classifier) and the groups of its input and output channels (``FIXED`` if none)."""

    conv: str
    bn: str | None
    in_group: int
    out_group: int


@dataclass
class ResNetLayout:
    """Result of walking a ResNet: groups with their members, and every conv/linear with its channel groups."""

    names: list[str] = field(default_factory=list)
    channels: list[int] = field(default_factory=list)
    members: list[list[str]] = field(default_factory=list)
    slots: list[ConvSlot] = field(default_factory=list)

    def new_group(self, name: str, channels: int) -> int:
        self.names.append(name)
        self.channels.append(int(channels))
        self.members.append([])
        return len(self.names) - 1

    def add(self, conv: str, bn: str | None, in_group: int, out_group: int) -> None:
        self.slots.append(ConvSlot(conv, bn, in_group, out_group))
        if out_group != FIXED and bn is not None:
            self.members[out_group].append(conv)


def resnet_layout(model: nn.Module, mode: str) -> ResNetLayout:
    """Walk a torchvision-style ResNet (``conv1``, ``bn1``, ``layer1``…, ``fc``) and assign channels to groups.

    The last slot is the classifier ``fc`` (with ``bn=None``). Raises ``NpsError`` for an unknown mode or a model
    that is not a plain ResNet of BasicBlocks/Bottlenecks.
    """
    if mode not in MODES:
        raise NpsError(f"unknown pruning mode {mode!r}; known modes: {', '.join(MODES)}")
    for attr in ("conv1", "bn1", "layer1", "fc"):
        if not hasattr(model, attr):
            raise NpsError(f"{type(model).__name__} is not a torchvision-style ResNet (no {attr!r})")
    prune_streams = mode == "all"
    layout = ResNetLayout()

    stream = layout.new_group("conv1", model.conv1.out_channels) if prune_streams else FIXED
    layout.add("conv1", "bn1", FIXED, stream)

    stage = 1
    while hasattr(model, f"layer{stage}"):
        stage_name = f"layer{stage}"
        for index, block in enumerate(getattr(model, stage_name)):
            prefix = f"{stage_name}.{index}"
            if isinstance(block, Bottleneck):
                internal, last = ("conv1", "conv2"), "conv3"
            elif isinstance(block, BasicBlock):
                internal, last = ("conv1",), "conv2"
            else:
                raise NpsError(f"{prefix} is a {type(block).__name__}; only BasicBlock and Bottleneck are supported")
            for conv_name in (*internal, last):
                if getattr(block, conv_name).groups != 1:
                    raise NpsError(f"{prefix}.{conv_name} is a grouped conv; grouped convs are not supported")

            block_in = stream
            if block.downsample is not None:
                # A shortcut conv starts a new residual stream.
                stream = layout.new_group(f"{stage_name}.residual", block.downsample[0].out_channels) \
                    if prune_streams else FIXED
            elif index == 0 and stream != FIXED:
                # The add ties this stage's stream to the previous one (the stem, for resnet18/34 and CIFAR).
                layout.names[stream] += f"+{stage_name}.residual"

            previous = block_in
            for number, conv_name in enumerate(internal, start=1):
                group = layout.new_group(f"{prefix}.{conv_name}", getattr(block, conv_name).out_channels)
                layout.add(f"{prefix}.{conv_name}", f"{prefix}.bn{number}", previous, group)
                previous = group
            layout.add(f"{prefix}.{last}", f"{prefix}.bn{len(internal) + 1}", previous, stream)
            if block.downsample is not None:
                layout.add(f"{prefix}.downsample.0", f"{prefix}.downsample.1", block_in, stream)
        stage += 1

    layout.add("fc", None, stream, FIXED)
    return layout


def _spatial_sizes(model: nn.Module, resolution: int, in_channels: int) -> dict[str, int]:
    """H_out·W_out of every Conv2d, from a forward pass (shape-only when the model is on the meta device)."""
    sizes: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(
                lambda mod, args, out, name=name: sizes.__setitem__(name, out.shape[-2] * out.shape[-1])))
    device = model.conv1.weight.device
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.empty(1, in_channels, resolution, resolution, device=device))
    except RuntimeError as error:
        raise NpsError(f"resolution {resolution} is too small for this network: {error}") from None
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    if any(size < 1 for size in sizes.values()):
        raise NpsError(f"resolution {resolution} is too small for this network: a feature map vanishes")
    return sizes


class _FormBuilder:
    """Accumulates ``coef · n_in · n_out`` terms, where each count is either a group's keep or a fixed number."""

    def __init__(self, groups: int):
        self.const = 0
        self.linear = np.zeros(groups, dtype=np.int64)
        self.pairs: dict[tuple[int, int], int] = {}

    def add(self, coef: int, group_a: int, fixed_a: int, group_b: int = FIXED, fixed_b: int = 1) -> None:
        coef = int(coef)
        if group_a != FIXED and group_b != FIXED:
            key = (min(group_a, group_b), max(group_a, group_b))
            self.pairs[key] = self.pairs.get(key, 0) + coef
        elif group_a != FIXED:
            self.linear[group_a] += coef * fixed_b
        elif group_b != FIXED:
            self.linear[group_b] += coef * fixed_a
        else:
            self.const += coef * fixed_a * fixed_b

    def form(self) -> QuadraticForm:
        keys = sorted(self.pairs)
        return QuadraticForm(self.const, self.linear,
                             np.array([a for a, _ in keys], dtype=np.int64),
                             np.array([b for _, b in keys], dtype=np.int64),
                             np.array([self.pairs[k] for k in keys], dtype=np.int64))


def _complexity_forms(model: nn.Module, layout: ResNetLayout, sizes: dict[str, int]):
    modules = dict(model.named_modules())
    groups = len(layout.names)
    flops, params = _FormBuilder(groups), _FormBuilder(groups)
    for slot in layout.slots:
        layer = modules[slot.conv]
        if isinstance(layer, nn.Linear):
            n_in, n_out, kernel, area = layer.in_features, layer.out_features, 1, 1
        else:
            n_in, n_out = layer.in_channels, layer.out_channels
            kernel = int(np.prod(layer.kernel_size))
            area = sizes[slot.conv]
        flops.add(kernel * area, slot.in_group, n_in, slot.out_group, n_out)
        params.add(kernel, slot.in_group, n_in, slot.out_group, n_out)
        if layer.bias is not None:
            params.add(1, slot.out_group, n_out)
        if slot.bn is not None:
            bn = modules[slot.bn]
            if bn.affine:
                params.add(2, slot.out_group, n_out)
    return flops.form(), params.form()


@dataclass
class LayerTable:
    """Prunable channel groups of one base network and its FLOPs/params as functions of ``keep``.

    ``keep`` arguments are kept-channel counts, one per group: shape (G,) or (n, G).
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

    def __len__(self) -> int:
        return len(self.names)

    def keep(self, recipe) -> np.ndarray:
        """Kept channels for one recipe (G,) or many (n, G): ``max(1, round_half_up((1 - r) · c))``."""
        recipe = np.asarray(recipe, dtype=np.float64)
        if recipe.ndim not in (1, 2) or recipe.shape[-1] != len(self):
            raise NpsError(f"a recipe for {self.model} ({self.mode}) needs {len(self)} ratios, "
                           f"got shape {recipe.shape}")
        if not np.all((recipe >= 0.0) & (recipe <= 1.0)):
            raise NpsError("pruning ratios must lie in [0, 1]")
        return keep_from_recipe(recipe, self.channels)

    def check_keep(self, keep) -> np.ndarray:
        """``keep`` as int64 after checking its length and that 1 <= keep <= channels; raises ``NpsError``."""
        keep = np.asarray(keep)
        if keep.ndim not in (1, 2) or keep.shape[-1] != len(self):
            raise NpsError(f"a keep vector for {self.model} ({self.mode}) needs {len(self)} counts, "
                           f"got shape {keep.shape}")
        if keep.dtype.kind not in "iu" and not np.all(np.asarray(keep, dtype=np.float64) % 1 == 0):
            raise NpsError("kept-channel counts must be integers")
        keep = keep.astype(np.int64)
        bad = (keep < 1) | (keep > self.channels)
        if np.any(bad):
            group = int(np.nonzero(bad.reshape(-1, len(self)).any(axis=0))[0][0])
            raise NpsError(f"kept channels of group {self.names[group]!r} must lie in "
                           f"[1, {self.channels[group]}]")
        return keep

    def c_flops(self, keep) -> np.ndarray:
        """FLOPs(sub) / FLOPs(base) per keep vector (float64)."""
        return self.flops(self.check_keep(keep)) / self.base_flops

    def c_params(self, keep) -> np.ndarray:
        """Params(sub) / Params(base) per keep vector (float64)."""
        return self.params(self.check_keep(keep)) / self.base_params

    def mcb(self, keep) -> np.ndarray:
        """Mean computation budget: (FLOPs(sub) / Params(sub)) / (FLOPs(base) / Params(base))."""
        keep = self.check_keep(keep)
        return (self.flops(keep) / self.params(keep)) / (self.base_flops / self.base_params)

    def feasible_range(self, max_ratio: float) -> tuple[float, float]:
        """(min, max) c_flops reachable with every ratio in [0, max_ratio]; see ``feasible_range``."""
        return feasible_range(self, max_ratio)

    def to_hdf5(self, group) -> None:
        """Write the table into an open ``h5py.Group`` (datasets and attrs; see ``from_hdf5``)."""
        import h5py

        text = h5py.string_dtype()
        group.create_dataset("names", data=np.array(self.names, dtype=object), dtype=text)
        group.create_dataset("channels", data=np.asarray(self.channels, dtype=np.int64))
        group.create_dataset("members", data=np.array([",".join(m) for m in self.members], dtype=object),
                             dtype=text)
        for prefix, form in (("flops", self.flops), ("params", self.params)):
            group.create_dataset(f"{prefix}_const", data=np.int64(form.const))
            group.create_dataset(f"{prefix}_linear", data=form.linear)
            group.create_dataset(f"{prefix}_pair_a", data=form.pair_a)
            group.create_dataset(f"{prefix}_pair_b", data=form.pair_b)
            group.create_dataset(f"{prefix}_pair_w", data=form.pair_w)
        for key in ("mode", "model"):
            group.attrs[key] = getattr(self, key)
        for key in ("resolution", "num_classes", "in_channels", "base_flops", "base_params"):
            group.attrs[key] = np.int64(getattr(self, key))

    @classmethod
    def from_hdf5(cls, group) -> "LayerTable":
        """Read a table written by ``to_hdf5``."""

        def text(value) -> str:
            return value.decode() if isinstance(value, bytes) else str(value)

        def form(prefix: str) -> QuadraticForm:
            return QuadraticForm(int(group[f"{prefix}_const"][()]), group[f"{prefix}_linear"][()],
                                 group[f"{prefix}_pair_a"][()], group[f"{prefix}_pair_b"][()],
                                 group[f"{prefix}_pair_w"][()])

        members = [text(m) for m in group["members"][()]]
        return cls(
            model=text(group.attrs["model"]), mode=text(group.attrs["mode"]),
            resolution=int(group.attrs["resolution"]), num_classes=int(group.attrs["num_classes"]),
            in_channels=int(group.attrs["in_channels"]),
            names=[text(n) for n in group["names"][()]],
            channels=np.asarray(group["channels"][()], dtype=np.int64),
            members=[m.split(",") if m else [] for m in members],
            flops=form("flops"), params=form("params"),
            base_flops=int(group.attrs["base_flops"]), base_params=int(group.attrs["base_params"]),
        )

    def __eq__(self, other) -> bool:
        if not isinstance(other, LayerTable):
            return NotImplemented
        scalars = ("model", "mode", "resolution", "num_classes", "in_channels", "names", "members", "flops",
                   "params", "base_flops", "base_params")
        return all(getattr(self, k) == getattr(other, k) for k in scalars) and \
            np.array_equal(self.channels, other.channels)


def table_from_model(model: nn.Module, model_name: str, mode: str, resolution: int, num_classes: int,
                     in_channels: int) -> LayerTable:
    """The layer table of an already built model (one batch-1 forward pass; a meta-device model costs nothing)."""
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise NpsError(f"resolution must be a positive integer number of pixels, got {resolution!r}")
    layout = resnet_layout(model, mode)
    sizes = _spatial_sizes(model, int(resolution), in_channels)
    flops, params = _complexity_forms(model, layout, sizes)
    channels = np.asarray(layout.channels, dtype=np.int64)
    return LayerTable(model=model_name, mode=mode, resolution=int(resolution), num_classes=num_classes,
                      in_channels=in_channels, names=layout.names, channels=channels, members=layout.members,
                      flops=flops, params=params, base_flops=int(flops(channels)), base_params=int(params(channels)))


def build_layer_table(model_name: str, mode: str, resolution: int, num_classes: int,
                      in_channels: int = 3) -> LayerTable:
    """Layer table of a registry model (built on the meta device: no weights are allocated).

    Raises
    ------
    NpsError
        Unknown model or mode, or a resolution at which a feature map would vanish.
    """
    if mode not in MODES:
        raise NpsError(f"unknown pruning mode {mode!r}; known modes: {', '.join(MODES)}")
    with torch.device("meta"):
        model = build_model(model_name, num_classes=num_classes, in_channels=in_channels)
    return table_from_model(model, model_name, mode, resolution, num_classes, in_channels)


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
