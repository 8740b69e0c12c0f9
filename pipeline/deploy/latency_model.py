"""Measuring a per-layer latency model (``nps latency-model``; what the model is: :mod:`nps.pipeline.network.
latency_model`; why it is measured this way: docs/latency-model.md).

1. The base network is traced (:func:`nps.pipeline.network.trace.analyze`) and run once at the resolution with
   forward hooks on its conv and linear layers: each layer's input shapes (every call).
2. Each layer is rebuilt alone as the network runs it: the conv (same kernel, stride, padding, dilation, bias, the
   base's group count) or linear layer, then the normalisation and the activation that the fx graph shows right
   after it (a BatchNorm/GroupNorm that is the only user of the layer's output, then an activation module, function
   or method that is the only user of that), at a grid of channel counts: fractions :data:`GRID_FRACTIONS` of each
   base count that the pruning mode can change (in the multiples its channels allow: conv groups, GroupNorm
   groups), on random input of the layer's own spatial size at the batch. A point is timed by ``nps latency``'s
   :func:`~nps.pipeline.deploy.latency.time_forward` (the median of :data:`LAYER_TIMING`'s runs; under
   ``torch.inference_mode``, channels_last and autocast as ``nps latency`` runs networks), again while noisier than
   :data:`NOISE_TARGET`; every point in :data:`PASSES` passes, each in its own shuffled order, keeping the least
   median (other work only adds time; shuffling spreads a drift of the machine's speed as noise instead of a slope).
   Layers of one configuration (same modules, input shape and counts: the repeated blocks of a stage) run the same
   kernels and share one grid.
3. Each layer's form is fitted (:func:`nps.pipeline.network.latency_model.fit_layer`), with its output count as it
   is and rounded up to each block of :data:`BLOCKS` (or the block asked for): a conv layer is padded where that
   fits its grid better (:func:`fit_layers`). Which block the model takes, the calibration networks decide (step 4).
4. The base network, copies pruned uniformly to :data:`CALIBRATION_KEEPS` and :data:`CALIBRATION_RANDOM` copies
   pruned at random are timed whole as ``nps latency`` times them: the base alone (the least median of
   :data:`PASSES` rounds), every copy paired with the base run by run
   (:func:`~nps.pipeline.deploy.latency.time_network_pair`, the middle ratio of the rounds), each again while
   noisier than :data:`NOISE_TARGET`; ``scale`` and ``offset`` are fitted to the ratios
   (:func:`~nps.pipeline.network.latency_model.fit_relative_calibration`). With a block, the padded layers are
   fitted again with their input counts padded too. Of the models so made (each block and no block, inputs padded
   or not) the one that predicts the calibration networks best is kept (:func:`best_model`), and calibrated again
   with one scale per term (:func:`_per_term`).

Every timing of steps 2 and 4 starts from the same process state: on the CPU with one thread the grid points are
timed :data:`GRID_CHUNK` at a time, and each calibration network, in a child process forked for them
(:mod:`nps.pipeline.deploy.isolation`).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nps.pipeline.errors import NpsError
from nps.pipeline.network.latency_model import LatencyModel, fit_layer, fit_relative_calibration, relative_rms

GRID_FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0)
# Output counts: more fractions, most of them off the blocks of 8 and 16 channels (of 64: 6, 16, 26, 32, 38, 48, 58,
# 64), so that the grid shows whether a layer's time steps with its output count (BLOCKS).
OUT_FRACTIONS = (0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0)
BLOCKS = (8, 16, 32)  # channel blocks tried (oneDNN: 8 floats per AVX2 vector, 16 per AVX-512 one)
CALIBRATION_KEEPS = (1.0, 0.75, 0.5, 0.3)
# ...and this many copies pruned at random (each group's ratio uniform in [0, CALIBRATION_R], seeded): recipes of
# uneven counts, as the samplers draw them, which uniformly pruned copies do not show (docs/study-latency.md)
CALIBRATION_RANDOM = 8
CALIBRATION_R = 0.7
NOISE_TARGET = 0.05  # IQR / median above which a timing is measured again
PASSES = 3  # times every grid point is timed (in a new shuffled order each pass)
GRID_CHUNK = 8  # grid points timed per child process (:func:`_time_grids`)
ATTEMPTS = 3  # timings of one point or network at most (the least noisy is kept)
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_BATCH = {"cpu": 32, "cuda": 64}
DEFAULT_PRECISION = {"cpu": "fp32", "cuda": "fp16"}
# Per point: warm-up forwards, timed runs, and the least time of a run (back-to-back forwards): the layers of a small
# network take 0.05-5 ms at batch 32 on one CPU thread.
LAYER_TIMING = {"warmup": 2, "runs": 5, "min_run_s": 0.004}
NETWORK_TIMING = {"warmup": 3, "runs": 15, "min_run_s": 0.02}

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.ELU, nn.Sigmoid,
                       nn.Hardsigmoid, nn.Tanh, nn.Mish)
_ACTIVATION_FUNCTIONS = {F.relu: nn.ReLU, torch.relu: nn.ReLU, torch.relu_: nn.ReLU, F.relu6: nn.ReLU6,
                         F.hardswish: nn.Hardswish, F.silu: nn.SiLU, F.gelu: nn.GELU, torch.sigmoid: nn.Sigmoid,
                         F.sigmoid: nn.Sigmoid, F.hardsigmoid: nn.Hardsigmoid, torch.tanh: nn.Tanh, F.mish: nn.Mish}
_ACTIVATION_METHODS = {"relu": nn.ReLU, "relu_": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}

Progress = Callable[[int, int, str], None]


@dataclass
class LayerSpec:
    """One conv or linear layer as the network runs it: the module, what follows it, its input shapes (batch 1),
    its base counts, which counts the pruning mode changes and in what multiples."""

    name: str
    module: nn.Module
    norm: nn.Module | None
    act: nn.Module | None
    shapes: list[tuple[int, ...]]
    cin: int
    cout: int
    groups: int
    depthwise: bool
    vary_in: bool
    vary_out: bool
    step_in: int
    step_out: int

    def key(self) -> str:
        """What makes two layers time alike."""
        parts = [repr(self.module), repr(self.norm), repr(self.act), repr(self.shapes), self.vary_in, self.vary_out,
                 self.step_in, self.step_out, type(self.module).__name__]
        return "|".join(str(p) for p in parts)

    def grid(self) -> list[tuple[int, int]]:
        """(cin, cout) points: :data:`GRID_FRACTIONS` of the input count and :data:`OUT_FRACTIONS` of the output
        count, where they vary."""
        def counts(base: int, step: int, vary: bool, fractions) -> list[int]:
            if not vary:
                return [base]
            return sorted({step * max(1, math.floor(f * base / step + 0.5)) for f in fractions})

        outs = counts(self.cout, self.step_out, self.vary_out, OUT_FRACTIONS)
        if self.depthwise:
            return [(c, c) for c in outs]
        return [(i, o) for i in counts(self.cin, self.step_in, self.vary_in, GRID_FRACTIONS) for o in outs]


class _Bench(nn.Module):
    """A layer block run on each of its inputs (a layer the network calls more than once runs once per call)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, xs):
        out = None
        for x in xs:
            out = self.block(x)
        return out


def _follower(gm, node, kind: str):
    """(user node, module) when ``node``'s only user is a normalisation layer (``kind`` "norm") or an activation
    (``kind`` "act": a module, or a new module for an activation function or method); else (None, None)."""
    users = list(node.users)
    if len(users) != 1:
        return None, None
    user = users[0]
    if user.op == "call_module":
        module = gm.get_submodule(user.target)
        if isinstance(module, _NORMS if kind == "norm" else _ACTIVATION_MODULES):
            return user, module
    elif kind == "act" and user.op == "call_function" and user.target in _ACTIVATION_FUNCTIONS:
        return user, _ACTIVATION_FUNCTIONS[user.target]()
    elif kind == "act" and user.op == "call_method" and user.target in _ACTIVATION_METHODS:
        return user, _ACTIVATION_METHODS[user.target]()
    return None, None


def _followers(gm, name: str):
    """(norm, activation) that the graph runs right after layer ``name`` (either None)."""
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == name)
    after, norm = _follower(gm, node, "norm")
    _, act = _follower(gm, after if after is not None else node, "act")
    return norm, act


def _input_shapes(model: nn.Module, names: list[str], resolution: int, in_channels: int) -> dict:
    """Per layer the shape of its input at each call, from a real batch-1 forward at the resolution."""
    shapes: dict[str, list] = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: shapes[n].append(tuple(int(d) for d in args[0].shape))) for n in names]
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            model(torch.randn(1, in_channels, resolution, resolution))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return shapes


def layer_specs(model: nn.Module, graph, gm, table) -> list[LayerSpec]:
    """Every conv and linear layer of ``model`` in ``graph.weight_order``, as :class:`LayerSpec`."""
    from nps.pipeline.network.layer_table import select_groups

    pruned_roots = {c.root for c in select_groups(graph, table.mode, table.channel_multiple).classes}
    shapes = _input_shapes(model, graph.weight_order, table.resolution, table.in_channels)

    def varies(segs) -> bool:
        return any(graph.root(s.var) in pruned_roots for s in segs)

    def step(segs, groups: int) -> int:
        if len(segs) != 1:
            return groups
        return math.lcm(groups, graph.structural(segs[0].var)) * segs[0].spread

    specs = []
    for name in graph.weight_order:
        layer, module = graph.weights[name], graph.modules[name]
        norm, act = _followers(gm, name)
        linear = layer.kind == "linear"
        cin = module.in_features if linear else module.in_channels
        cout = module.out_features if linear else module.out_channels
        groups = 1 if linear else int(module.groups)
        depthwise = layer.kind == "depthwise"
        specs.append(LayerSpec(name, module, norm, act, shapes[name], int(cin), int(cout), groups, depthwise,
                               varies(layer.inp), varies(layer.out), step(layer.inp, 1 if depthwise else groups),
                               step(layer.out, 1 if depthwise else groups)))
    return specs


def _resized(module: nn.Module, n: int, base: int) -> nn.Module:
    """A copy of a normalisation layer for ``n`` channels (its per-channel tensors' first ``n`` entries)."""
    memo = {}
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if t.dim() == 1 and t.shape[0] == base:
            new = t.detach()[:n].clone()
            memo[id(t)] = nn.Parameter(new, t.requires_grad) if isinstance(t, nn.Parameter) else new
    copy_ = copy.deepcopy(module, memo)
    for attr in ("num_features", "num_channels"):
        if hasattr(copy_, attr):
            setattr(copy_, attr, n)
    return copy_


def build_block(spec: LayerSpec, cin: int, cout: int) -> nn.Module:
    """The layer at (cin, cout), then its normalisation and activation, freshly initialised."""
    module = spec.module
    linear = isinstance(module, nn.Linear)
    groups = cout if spec.depthwise else spec.groups
    if linear:
        shape = (cout, cin)
    else:
        shape = (cout, cin // groups, *module.weight.shape[2:])
    weight = torch.randn(shape) * (1.0 / math.sqrt(max(1, math.prod(shape[1:]))))
    memo = {id(module.weight): nn.Parameter(weight, requires_grad=False)}
    if module.bias is not None:
        memo[id(module.bias)] = nn.Parameter(torch.zeros(cout), requires_grad=False)
    layer = copy.deepcopy(module, memo)
    if linear:
        layer.in_features, layer.out_features = cin, cout
    else:
        layer.in_channels, layer.out_channels, layer.groups = cin, cout, groups
    parts = [layer]
    if spec.norm is not None:
        parts.append(_resized(spec.norm, cout, spec.cout))
    if spec.act is not None:
        parts.append(copy.deepcopy(spec.act))
    return nn.Sequential(*parts)


def _inputs(spec: LayerSpec, cin: int, batch: int, device, channels_last: bool) -> list[torch.Tensor]:
    xs = []
    for shape in spec.shapes:
        dims = list(shape)
        dims[0] = batch
        dims[-1 if isinstance(spec.module, nn.Linear) else 1] = cin
        x = torch.randn(*dims, device=device)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        xs.append(x)
    return xs


def _least_noisy(measure: Callable[[], object]):
    """Time up to :data:`ATTEMPTS` times while IQR/median exceeds :data:`NOISE_TARGET`; the least noisy timing
    (``nps latency``'s rule, :func:`~nps.pipeline.deploy.latency.timed_quietly`)."""
    from nps.pipeline.deploy.latency import timed_quietly

    return timed_quietly(measure, NOISE_TARGET, ATTEMPTS - 1)[0]


def time_layer(spec: LayerSpec, cin: int, cout: int, *, batch: int, device, channels_last: bool, amp_dtype):
    """The :class:`~nps.pipeline.results.latency.Timing` of the layer block at (cin, cout)."""
    from nps.pipeline.deploy.latency import time_forward

    bench = _Bench(build_block(spec, cin, cout)).to(device).eval()
    if channels_last and not isinstance(spec.module, nn.Linear):
        bench = bench.to(memory_format=torch.channels_last)
    xs = _inputs(spec, cin, batch, device, channels_last)
    with torch.inference_mode():
        return _least_noisy(lambda: time_forward(bench, xs, device=device, amp_dtype=amp_dtype, **LAYER_TIMING))


def _channels_of(model: nn.Module, names: list[str]) -> dict[str, tuple[int, int]]:
    """(cin, cout) of every named conv or linear layer of ``model`` as it is (pruned or not)."""
    out = {}
    for name in names:
        m = model.get_submodule(name)
        out[name] = (int(m.in_features), int(m.out_features)) if isinstance(m, nn.Linear) else \
            (int(m.in_channels), int(m.out_channels))
    return out


def fit_layers(grids: dict, block: int) -> dict:
    """{configuration key: (coef, fit error, padded)} for the timed grids (``{key: (spec, points)}``) at ``block``:
    every conv layer padded to it where its fit errs less than unpadded (block 1 pads none; a linear layer never is)."""
    out = {}
    for key, (spec, p) in grids.items():
        points = np.asarray(p, dtype=np.float64).T
        out[key] = (*fit_layer(*points, spec.groups, spec.depthwise), False)
        if block > 1 and not isinstance(spec.module, nn.Linear):
            coef, error = fit_layer(*points, spec.groups, spec.depthwise, block)
            if error < out[key][1]:
                out[key] = (coef, error, True)
    return out


def best_model(make_model: Callable[[int, dict], LatencyModel], grids: dict, keys: list[str], networks, base_timing,
               pairs, block: int | None = None) -> LatencyModel:
    """The model that predicts the calibration networks best: for each block of ``(1,) +`` :data:`BLOCKS` (or
    ``block`` alone), its layers fitted at it (:func:`fit_layers`), the model ``make_model(block, fits)`` calibrated
    with and without its inputs padded (:func:`calibrated`); ties go to the smaller block. The layers' grids alone
    do not decide the block: their fit errors differ by little between blocks and flip between sessions (the
    latency study: MobileNetV2 padded in blocks of 16 in one run, unpadded in the next), while the whole networks
    show what the padding costs. The model kept is then calibrated with one scale per term (:func:`_per_term`); the
    block is chosen with one scale, whose error does not fall merely by fitting more numbers."""
    models = [calibrated(make_model(b, fits_b), grids, keys, networks, base_timing, pairs)
              for b, fits_b in ((b, fit_layers(grids, b)) for b in ((1,) + BLOCKS if block is None else (block,)))]
    return _per_term(min(models, key=lambda m: m.network_error), networks, base_timing, pairs)


def measure_latency_model(model_name: str, resolution: int, *, num_classes: int, in_channels: int, mode: str = "all",
                          device: str = "cpu", batch: int | None = None, threads: int | None = None,
                          precision: str | None = None, block: int | None = None,
                          progress: Progress | None = None) -> LatencyModel:
    """Measure and fit the latency model of ``model_name`` (see the module docstring). ``batch``, ``threads`` and
    ``precision`` None: :data:`DEFAULT_BATCH`, torch's current thread count, :data:`DEFAULT_PRECISION` for the
    device; ``block`` None: chosen by the calibration networks (:func:`best_model`). ``progress(done, total,
    what)`` is called before each timing."""
    from nps.pipeline.deploy.latency import device_name
    from nps.pipeline.network.layer_table import table_from_graph
    from nps.pipeline.network.models import build_model
    from nps.pipeline.network.trace import analyze
    from nps.pipeline.training.devices import parse_device, resolve_channels_last

    dev = parse_device(device)
    batch = DEFAULT_BATCH[dev.type] if batch is None else int(batch)
    precision = DEFAULT_PRECISION[dev.type] if precision is None else str(precision)
    if precision not in PRECISIONS:
        raise NpsError(f"--precision {precision!r}: use {', '.join(PRECISIONS)}")
    if batch < 1:
        raise NpsError(f"--batch {batch}: use a positive batch size")
    if threads is not None and threads < 1:
        raise NpsError(f"--threads {threads}: use a positive thread count")
    if block is not None and block < 1:
        raise NpsError(f"--block {block}: use a positive channel block (1: no padding), or auto")
    amp_dtype = PRECISIONS[precision]
    nhwc = resolve_channels_last("auto", dev)
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        torch.manual_seed(0)
        base = build_model(model_name, num_classes=num_classes, in_channels=in_channels)
        graph, gm = analyze(base, int(resolution), in_channels)
        table = table_from_graph(graph, model_name, mode, int(resolution), num_classes, in_channels)
        specs = layer_specs(base, graph, gm, table)
        n_threads = int(torch.get_num_threads())
        networks = _calibration_networks(base, table, [s.name for s in specs])
        grids = _time_grids(specs, batch, dev, nhwc, amp_dtype, progress, PASSES * len(networks))
        base_timing, pairs = _time_networks(networks, table, batch, dev, nhwc, amp_dtype, progress,
                                            PASSES * sum(len(p) for _, p in grids.values()))
    finally:
        torch.set_num_threads(saved_threads)
    name = f"cpu: {device_name(dev).split(' (')[0]}, {n_threads} thread{'s' if n_threads != 1 else ''}" \
        if dev.type == "cpu" else device_name(dev)
    keys = [s.key() for s in specs]

    def make_model(chosen: int, fits: dict) -> LatencyModel:
        return LatencyModel(model_name, mode, int(resolution), num_classes, in_channels, dev.type, name, batch,
                            n_threads, precision, layers=[s.name for s in specs], groups=[s.groups for s in specs],
                            depthwise=[s.depthwise for s in specs], coef=[fits[k][0] for k in keys],
                            fit_error=[fits[k][1] for k in keys], scale=1.0, offset=0.0, network_error=math.nan,
                            calibration={}, base_latency_s=base_timing.median_s,
                            grid={s.name: np.asarray(grids[k][1], dtype=np.float64) for s, k in zip(specs, keys)},
                            block=chosen, padded=[fits[k][2] for k in keys])

    return best_model(make_model, grids, keys, networks, base_timing, pairs, block)


def calibrated(model: LatencyModel, grids: dict, keys: list[str], networks, base_timing, pairs) -> LatencyModel:
    """``model`` (its layers fitted, ``keys`` their configurations in ``grids``) calibrated on the networks'
    timings (:func:`_calibrate`); with a block, the same model with every padded layer's input count padded too,
    fitted again on its grid and calibrated alike, is returned instead where it predicts the calibration networks
    better (a layer timed alone does not show it, the networks do)."""
    _calibrate(model, networks, base_timing, pairs)
    if model.block <= 1:
        return model
    padded = dict.fromkeys(k for k, p in zip(keys, model.padded) if p)  # each configuration once (repeated blocks)
    refit = {k: fit_layer(*np.asarray(grids[k][1], dtype=np.float64).T, grids[k][0].groups, grids[k][0].depthwise,
                          model.block, model.block) for k in padded}
    alt = dataclasses.replace(model, coef=[refit[k][0] if k in refit else c for k, c in zip(keys, model.coef)],
                              fit_error=[refit[k][1] if k in refit else e for k, e in zip(keys, model.fit_error)],
                              padded_in=[k in refit for k in keys])
    _calibrate(alt, networks, base_timing, pairs)
    return alt if alt.network_error < model.network_error else model


MIN_PER_TERM_NETWORKS = 6
"""One scale per term is tried only with at least this many pruned calibration networks (it fits five numbers)."""


def _term_sums(model: LatencyModel, networks) -> np.ndarray:
    """(networks, 4): each calibration network's a, b, c and d terms (the layers' fits, no calibration) summed."""
    return np.array([sum(model.layer_form(i, *channels[n]) * model.coef[i] for i, n in enumerate(model.layers))
                     for _, _, channels, _ in networks])


def _per_term(model: LatencyModel, networks, base_timing, pairs) -> LatencyModel:
    """A copy of ``model`` calibrated with one scale per term (:func:`_calibrate_terms`), with at least
    :data:`MIN_PER_TERM_NETWORKS` pruned calibration networks (``model`` itself otherwise).

    Why always, not where the calibration networks prefer it: on every one of the latency study's seven runs
    (tools/latency_model_variants.py, the model as ``nps latency-model`` chooses it) it predicted the measured
    population better, R² relative to the base +0.018 to +0.053, while the calibration networks left out one at a
    time preferred it in one run of the seven: eleven uniform and random copies say less about the populations a
    regime draws than those populations do."""
    if len(pairs) < MIN_PER_TERM_NETWORKS:
        return model
    per_term = dataclasses.replace(model)
    _calibrate_terms(per_term, networks, base_timing, pairs, _term_sums(model, networks))
    return per_term


def _calibrate(model: LatencyModel, networks, base_timing, pairs) -> None:
    """Set ``model``'s scale, offset, network error and calibration points from the calibration networks' timings:
    the base's alone, each other's paired with it (``pairs``: (median ratio, its IQR / median) per network)."""
    sums = [sum(model.layer_seconds(i, *channels[n]) for i, n in enumerate(model.layers))
            for _, _, channels, _ in networks]
    c = np.array([1.0] + [ratio for ratio, _ in pairs])
    model.term_scale = np.ones(4)
    model.scale, model.offset = fit_relative_calibration(sums[1:], c[1:], sums[0], base_timing.median_s)
    _calibration_points(model, networks, base_timing, pairs, c, [model.offset + model.scale * s for s in sums])


def _calibrate_terms(model: LatencyModel, networks, base_timing, pairs, sums: np.ndarray) -> None:
    """:func:`_calibrate` with one scale per term (``sums``: :func:`_term_sums`): ``term_scale`` and ``offset``
    fitted to the ratios (:func:`~nps.pipeline.network.latency_model.fit_relative_terms`), ``scale`` 1."""
    from nps.pipeline.network.latency_model import fit_relative_terms

    c = np.array([1.0] + [ratio for ratio, _ in pairs])
    model.term_scale, model.offset = fit_relative_terms(sums[1:], c[1:], sums[0], base_timing.median_s)
    model.scale = 1.0
    _calibration_points(model, networks, base_timing, pairs, c, (model.offset + sums @ model.term_scale).tolist())


def _calibration_points(model: LatencyModel, networks, base_timing, pairs, c, predicted) -> None:
    """``model``'s network error and calibration points: each network ``predicted`` against its measured seconds,
    ``c`` (its ratio to the base) times the base's."""
    measured = (c * base_timing.median_s).tolist()
    model.network_error = relative_rms(predicted, measured)
    model.calibration = {"keep_fraction": [f for f, _, _, _ in networks], "measured_s": measured,
                         "predicted_s": predicted,
                         "iqr_over_median": [base_timing.noise] + [noise for _, noise in pairs],
                         "pruned_at_random": [float(at_random) for _, _, _, at_random in networks]}


def _calibration_networks(base: nn.Module, table, layers: list[str]) -> list[tuple[float, nn.Module, dict, bool]]:
    """(kept fraction of the channels, network, its layers' (cin, cout), pruned at random): the base (first), copies
    pruned uniformly to each of :data:`CALIBRATION_KEEPS` and :data:`CALIBRATION_RANDOM` copies pruned at random
    (every group's ratio uniform in [0, :data:`CALIBRATION_R`], seeded); a copy that prunes nothing new (a network
    already listed) is left out."""
    from nps.kernels.complexity import keep_from_recipe
    from nps.pipeline.network.prune import prune_model

    rng = np.random.default_rng(0)
    G = len(table.channels)
    recipes = [(np.full(G, 1.0 - f), False) for f in CALIBRATION_KEEPS]
    recipes += [(rng.uniform(0.0, CALIBRATION_R, G), True) for _ in range(CALIBRATION_RANDOM)]
    out = []
    for recipe, at_random in recipes:
        keep = keep_from_recipe(recipe, table.channels, table.granularity)
        model = base if np.array_equal(keep, table.channels) else prune_model(base, table, keep)
        channels = _channels_of(model, layers)
        if all(channels != c for _, _, c, _ in out):
            out.append((float(np.sum(keep) / np.sum(table.channels)), model, channels, at_random))
    return out


def _time_networks(networks, table, batch: int, dev, nhwc: bool, amp_dtype, progress, done: int):
    """(the base's timing, [(median ratio, its IQR / median)] of every other network): the base (first of
    ``networks``) timed alone, each other network paired with it run by run as ``nps latency`` times a row
    (:func:`~nps.pipeline.deploy.latency.time_in_passes`, again while noisier than :data:`NOISE_TARGET`), in
    :data:`PASSES` rounds over all of them in order; the base keeps its least median, each other network the round
    whose ratio is the middle one."""
    from nps.pipeline.deploy.latency import best_of_passes, time_in_passes

    total = done + PASSES * len(networks)

    def on_step(p: int, i: int, t: int) -> None:
        what = "the base network" if t == 0 else f"a network pruned to {networks[t][0]:.2f} of its channels, paired"
        progress(done + p * len(networks) + i, total, f"{what} (pass {p + 1} of {PASSES})")

    kw = dict(device=dev, channels_last=nhwc, amp_dtype=amp_dtype, **NETWORK_TIMING)
    taken = time_in_passes(lambda t: networks[t][1], len(networks), table, (batch,), kw, passes=PASSES,
                           retry_above=NOISE_TARGET, retries=ATTEMPTS - 1, paired=True,
                           on_step=None if progress is None else on_step)
    best = [best_of_passes(taken[t, batch]) for t in range(len(networks))]
    return best[0][0], [(pair.ratio, pair.noise) for _, _, pair in best[1:]]


def _time_grids(specs: list[LayerSpec], batch: int, dev, nhwc: bool, amp_dtype, progress, extra: int) -> dict:
    """Per layer configuration (:meth:`LayerSpec.key`) its spec and timed points [(cin, cout, seconds)]: every point
    of every configuration timed in :data:`PASSES` passes, each in its own shuffled order; a point's seconds are the
    least of its passes' medians (other work on the machine only ever adds time). The points are timed
    :data:`GRID_CHUNK` at a time in a child process of their own where
    :func:`~nps.pipeline.deploy.isolation.run_isolated` allows (the CPU, one thread), so every few points start
    from the same process state (a child per point took ResNet-20's model 109 s against 66 s, in forks)."""
    from nps.pipeline.deploy.isolation import run_isolated

    grids = {}
    for spec in specs:
        grids.setdefault(spec.key(), (spec, []))
    jobs = [(key, cin, cout) for key, (spec, _) in grids.items() for cin, cout in spec.grid()]
    seconds = np.full((PASSES, len(jobs)), np.inf)
    rng = np.random.default_rng(0)
    total = PASSES * len(jobs) + extra

    def timed(chunk) -> list[float]:
        return [time_layer(grids[jobs[j][0]][0], *jobs[j][1:], batch=batch, device=dev, channels_last=nhwc,
                           amp_dtype=amp_dtype).median_s for j in chunk]

    for p in range(PASSES):
        order = rng.permutation(len(jobs))
        for done in range(0, len(jobs), GRID_CHUNK):
            chunk = order[done:done + GRID_CHUNK]
            key, cin, cout = jobs[chunk[0]]
            spec = grids[key][0]
            if progress is not None:
                progress(p * len(jobs) + done, total, f"layer {spec.name} at {cin}→{cout} channels (pass {p + 1} of "
                                                      f"{PASSES})")
            seconds[p, chunk] = run_isolated(lambda: timed(chunk), f"layer {spec.name} at {cin}→{cout} channels",
                                             dev)
    for (key, cin, cout), t in zip(jobs, seconds.min(axis=0)):
        grids[key][1].append((cin, cout, float(t)))
    return grids
