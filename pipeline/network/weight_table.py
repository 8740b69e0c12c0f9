"""The weight table of a base network: one entry per prunable layer, for magnitude (unstructured) weight pruning.

A weight-pruning recipe is one sparsity per **prunable layer**: the weight of every ``nn.Conv2d`` (depthwise and
grouped ones, the stem included) and every ``nn.Linear``, in module order; BatchNorm parameters and biases are never
pruned. Layer ``l`` keeps ``keep[l] = max(1, round_half_up((1 - r_l) · numel_l))`` weights, the ones of largest
magnitude (:func:`masks_from_keep`).

The table is a :class:`~nps.pipeline.network.layer_table.LayerTable` with ``mode == "weights"`` and one "group" per
layer (``channels[l]`` = the layer's weight count, granularity 1, ``members == [[name]]``), so the samplers draw
weight recipes unchanged. Its forms are **linear** (no pair terms): a nonzero weight of a conv costs one MAC per
output position of the layer (``H_out · W_out``), one of a linear layer one per row it is applied to (1 for a
classifier, ``H · W`` for ConvNeXt's channels-last MLPs), in both FLOPs conventions: ptflops (the ``paper``
convention) counts a conv as ``numel(weight) · output positions`` plus the bias adds (``out_channels`` per position)
and a linear as ``numel(weight) · rows`` plus ``out_features`` per row, so a weight costs the same in both and the
bias adds (like every other ``paper`` term: norms, activations, pooling) do not depend on the kept weights. Hence::

    flops(keep)  = flops_const  + Σ_l positions_l · keep_l       params(keep) = params_const + Σ_l keep_l

with the constants the unprunable rest: the dense network's counts (``base_flops``/``base_params`` of its filter
table in the same convention, :func:`~nps.pipeline.network.layer_table.build_layer_table`) minus the dense prunable
weights' share. In the ``macs`` convention ``flops_const`` is 0.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from nps.kernels.complexity import QuadraticForm
from nps.kernels.spaces import TARGETS
from nps.pipeline.errors import NpsError
from nps.pipeline.network.layer_table import CONVENTIONS, LayerTable, table_from_model
from nps.pipeline.network.models import build_model

WEIGHTS_MODE = "weights"
"""``LayerTable.mode`` of a weight table."""


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every ``nn.Conv2d`` and ``nn.Linear`` (subclasses included) with a weight, in module
    order (``model.named_modules()``: each module once, under its first name)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and isinstance(getattr(m, "weight", None), torch.Tensor)]


def _positions(model: nn.Module, resolution: int, in_channels: int) -> dict[str, int]:
    """Output positions per prunable layer (summed over its calls) in one batch-1 forward pass on the meta device:
    a conv's ``H_out · W_out``, a linear layer's rows (every axis but the last)."""
    from nps.pipeline.network.trace import _meta_copy

    on_meta = next((p.device.type == "meta" for p in model.parameters()), True)
    runner = model if on_meta else _meta_copy(model)
    counts: dict[str, int] = {}
    handles = []

    def hook(name, conv):
        def record(module, args, out):
            batch = out.shape[0]
            per_image = out.numel() // batch
            counts[name] = counts.get(name, 0) + per_image // (out.shape[1] if conv else out.shape[-1])
        return record

    for name, m in prunable_layers(runner):
        handles.append(m.register_forward_hook(hook(name, isinstance(m, nn.Conv2d))))
    was_training = runner.training
    try:
        runner.eval()
        with torch.no_grad():
            runner(torch.empty(1, in_channels, resolution, resolution, device="meta"))
    finally:
        runner.train(was_training)
        for h in handles:
            h.remove()
    return counts


def weight_table_from_model(model: nn.Module, model_name: str, resolution: int, num_classes: int, in_channels: int,
                            *, flops: str = "macs") -> LayerTable:
    """The weight table of an already built model (shapes only: the model may be on the meta device).

    Raises
    ------
    NpsError
        Unknown convention, a bad resolution, a model without prunable layers, or one the filter analysis cannot
        follow (its dense counts come from the filter table).
    """
    dense = table_from_model(model, model_name, "all", resolution, num_classes, in_channels, flops=flops)
    layers = prunable_layers(model)
    if not layers:
        raise NpsError(f"model {model_name!r} has no conv or linear layer to prune")
    positions = _positions(model, int(resolution), in_channels)
    names = [name for name, _ in layers]
    numel = np.array([m.weight.numel() for _, m in layers], dtype=np.int64)
    coef = np.array([positions.get(name, 0) for name in names], dtype=np.int64)
    flops_const = dense.base_flops - int(coef @ numel)
    params_const = dense.base_params - int(numel.sum())
    if flops_const < 0 or params_const < 0 or (flops == "macs" and flops_const != 0):  # pragma: no cover - a bug
        raise AssertionError(f"weight table of {model_name}: the prunable weights' counts do not fit the filter "
                             f"table's ({flops} FLOPs rest {flops_const}, params rest {params_const})")
    empty = np.zeros(0, dtype=np.int64)
    return LayerTable(model=model_name, mode=WEIGHTS_MODE, resolution=int(resolution), num_classes=num_classes,
                      in_channels=in_channels, names=names, channels=numel, members=[[name] for name in names],
                      flops=QuadraticForm(flops_const, coef, empty, empty, empty),
                      params=QuadraticForm(params_const, np.ones(len(names), dtype=np.int64), empty, empty, empty),
                      base_flops=dense.base_flops, base_params=dense.base_params,
                      granularity=np.ones(len(names), dtype=np.int64), flops_convention=flops, channel_multiple=1)


def build_weight_table(model_name: str, resolution: int, num_classes: int, in_channels: int = 3, *,
                       flops: str = "macs") -> LayerTable:
    """Weight table of a registry model (built on the meta device where it can be: no weights are allocated)."""
    if flops not in CONVENTIONS:
        raise NpsError(f"unknown FLOPs convention {flops!r}; use {' or '.join(CONVENTIONS)}")
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise NpsError(f"resolution must be a positive integer number of pixels, got {resolution!r}")
    model = build_model(model_name, num_classes=num_classes, in_channels=in_channels, device="meta")
    return weight_table_from_model(model, model_name, int(resolution), num_classes, in_channels, flops=flops)


def is_weight_table(table) -> bool:
    """Whether ``table`` is a weight table (``mode == "weights"``)."""
    return getattr(table, "mode", None) == WEIGHTS_MODE


def table_layers(model: nn.Module, table: LayerTable) -> list[nn.Module]:
    """The modules of ``table``'s layers in ``model``, checked against the table's weight counts."""
    if not is_weight_table(table):
        raise NpsError(f"a table in mode {table.mode!r} is not a weight table (mode {WEIGHTS_MODE!r})")
    named = dict(model.named_modules())
    modules = []
    for name, count in zip(table.names, table.channels):
        m = named.get(name)
        if m is None or not isinstance(getattr(m, "weight", None), torch.Tensor) or m.weight.numel() != count:
            raise NpsError(f"the weight table of {table.model} names layer {name!r} with {count} weights, which "
                           f"{type(model).__name__} does not have")
        modules.append(m)
    return modules


def _magnitudes(modules: list[nn.Module]) -> list[np.ndarray]:
    """|weight| of each module, flattened, as float32 numpy (float64 when some weight is float64: exact either way,
    so the order and the ties are the weights' own)."""
    dtype = torch.float64 if any(m.weight.dtype == torch.float64 for m in modules) else torch.float32
    mags = []
    for m in modules:
        a = m.weight.detach().abs().flatten().to(device="cpu", dtype=dtype).numpy()
        if not np.all(np.isfinite(a)):
            raise NpsError(f"layer weight of {type(m).__name__} holds NaN or inf: magnitudes cannot be ranked")
        mags.append(a)
    return mags


def _top(a: np.ndarray, k: int) -> np.ndarray:
    """Bool mask of the ``k`` largest entries of ``a`` (ties: lower index first), in linear time."""
    n = a.size
    if k >= n:
        return np.ones(n, dtype=bool)
    tau = np.partition(a, n - k)[n - k]  # the k-th largest
    mask = a > tau
    tied = np.flatnonzero(a == tau)
    mask[tied[:k - int(np.count_nonzero(mask))]] = True
    return mask


def masks_from_keep(model: nn.Module, table: LayerTable, keep) -> dict[str, torch.Tensor]:
    """Per layer name, a bool mask shaped like its weight keeping the ``keep[l]`` weights of largest magnitude
    (ties: the lower flat index is kept), on the weight's device."""
    keep = table.check_keep(np.asarray(keep))
    if keep.ndim != 1:
        raise NpsError(f"masks_from_keep takes one keep vector, got shape {keep.shape}")
    modules = table_layers(model, table)
    masks = {}
    for name, m, a, k in zip(table.names, modules, _magnitudes(modules), keep.tolist()):
        masks[name] = torch.from_numpy(_top(a, k)).view(m.weight.shape).to(m.weight.device)
    return masks


def global_keep(model: nn.Module, table: LayerTable, target: str, value: float, delta: float) -> np.ndarray:
    """Keep vector (int64) of ONE magnitude threshold across every layer, the one whose ``target`` (``c_flops`` or
    ``c_params``) comes closest to ``value``; every layer keeps at least its largest weight.

    Take all weights by decreasing magnitude (ties: table order, then flat index, as :func:`masks_from_keep`),
    each layer's largest one being always kept; the complexity of the first m of the rest is non-decreasing in m,
    and the closest m is where it crosses the target. The threshold τ at the crossing is found by bisection over the
    float bit patterns (exact: at most 32 passes for float32 weights), and the tied weights at τ are taken in the
    order above. Every kept weight is at least as large as every pruned one, except a layer's forced largest weight.

    Raises
    ------
    NpsError
        An unknown target, or no threshold within ``±delta`` of ``value``.
    """
    if target not in TARGETS:
        raise NpsError(f"target {target!r}: use one of {', '.join(TARGETS)}")
    form, base = (table.flops, table.base_flops) if target == "c_flops" else (table.params, table.base_params)
    mags = _magnitudes(table_layers(model, table))
    coef = [int(c) for c in form.linear]
    tops = [a.max() for a in mags]  # each layer's forced weight: its first largest (np.argmax)
    forced = form.const + sum(coef)  # every layer at one weight
    goal = value * base - forced  # what the other kept weights should cost

    def cost(tau) -> int:
        """Cost of the weights (forced ones left out) with magnitude >= tau."""
        return sum(c * (int(np.count_nonzero(a >= tau)) - int(t >= tau)) for a, c, t in zip(mags, coef, tops) if c)

    L = len(mags)
    if goal <= 0:
        keep = np.ones(L, dtype=np.int64)
    elif cost(mags[0].dtype.type(0)) < goal:
        keep = np.array([a.size for a in mags], dtype=np.int64)
    else:
        bits = np.uint32 if mags[0].dtype == np.float32 else np.uint64
        lo, hi = 0, int(np.array(max(tops), dtype=mags[0].dtype).view(bits)) + 1  # cost(lo) >= goal > cost(hi)

        def as_float(b: int):
            return np.array(b, dtype=bits).view(mags[0].dtype)[()]

        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if cost(as_float(mid)) >= goal else (lo, mid)
        tau = as_float(lo)
        # weights at tau, in table order then flat index, the forced ones left out; the crossing lies among them
        layer = np.concatenate([np.full(int(np.count_nonzero(a == tau)) - int(t == tau), i, dtype=np.int64)
                                for i, (a, t) in enumerate(zip(mags, tops))])
        below = sum(c * (int(np.count_nonzero(a > tau)) - int(t > tau)) for a, c, t in zip(mags, coef, tops))
        reached = below + np.cumsum(np.asarray(coef, dtype=np.int64)[layer])
        h = int(np.searchsorted(reached, goal))  # the first h + 1 tied weights reach the goal, h fall short
        short, reach = (forced + (int(reached[h - 1]) if h else below)) / base, (forced + int(reached[h])) / base
        take = h if abs(short - value) <= abs(reach - value) else h + 1  # the closer; the fewer weights on a tie
        above = [int(np.count_nonzero(a > tau)) - int(t > tau) for a, t in zip(mags, tops)]
        keep = 1 + np.asarray(above, dtype=np.int64) + np.bincount(layer[:take], minlength=L)
    achieved = float(form(keep)) / base
    if abs(achieved - value) > delta:
        raise NpsError(f"global magnitude pruning of {table.model} cannot reach {target}={value:g}±{delta:g}: the "
                       f"closest threshold gives {achieved:.4f} (every layer keeps at least one weight)")
    return keep


def sparsity(keep, table: LayerTable) -> np.ndarray:
    """Fraction of weights pruned per layer, ``1 - keep / numel`` (float64, the shape of ``keep``)."""
    return 1.0 - np.asarray(keep, dtype=np.float64) / np.asarray(table.channels, dtype=np.float64)
