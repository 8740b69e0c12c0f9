"""A per-layer latency model of a network on one device: what it is, how it is fitted, stored and read (numpy and
h5py only: no torch; the measuring is :mod:`nps.pipeline.deploy.latency_model`, ``nps latency-model``).

Each prunable layer ``i`` (a conv or linear layer, as ``graph.weight_order`` lists them), run as the network runs
it (the layer, then the normalisation and activation that follow it), takes

    t_i(cin, cout) = a_i + b_i · cin · cout / groups_i + c_i · cout + d_i · cin        seconds, a, b, c, d >= 0

(a depthwise conv, whose channels are one count C: ``a_i + c_i · C``, b = d = 0): a fixed cost (the call), the
multiply-accumulates, and the memory traffic of its output and its input. A **padded** layer (``padded[i]``) takes
its output count rounded up to the model's ``block``, ``P(cout) = block · ceil(cout / block)``, in place of cout:
CPU kernels (oneDNN) compute output channels in vector-width blocks (16 floats with AVX-512), so 17 output channels
cost as much as 32 and 12 as much as 16. ``nps latency-model`` chooses the block and which layers it fits better
(``block`` 1: no layer is padded). A padded layer may take its input count rounded up too (``padded_in[i]``): a
layer timed alone does not show it, the whole networks do (odd counts fed from one layer to the next), so
``nps latency-model`` decides it for all padded layers at once, by which of the two predicts its calibration
networks better. The whole network takes

    T(channels) = offset + scale · Σ_i t_i(cin_i, cout_i)

where ``scale`` and ``offset`` are calibrated on whole networks (uniformly and randomly pruned copies of the base,
each timed paired with the base: :func:`fit_relative_calibration`): what the layer timings miss or double-count
(additions, pooling, the framework's per-call overhead, caches warm or cold). ``nps latency-model`` then calibrates
the model it keeps with one scale per term (``term_scale``: a, b, c and d each summed over the layers,
:func:`fit_relative_terms`): ``T = offset + Σ_i t_i`` with each t_i's coefficients times ``term_scale`` (``scale``
1); a network's calls, its arithmetic and its memory traffic need not be missed in one proportion.
The coefficients are never negative, so ``T`` grows with every channel count: the samplers' exactness and
monotonicity rely on it. ``cin`` and ``cout`` are the layer's own counts: a conv's input and output channels (all
groups together), a linear layer's in and out features (a flattened feature map's channels times its positions).

Fits are non-negative least squares in relative terms (each point weighted by one over its measured time, so a
narrow layer's few microseconds count as much as the full layer's milliseconds): :func:`nnls` solves them exactly by
enumerating the active sets (at most 2^4 small least-squares problems).
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

import h5py
import numpy as np

from nps.pipeline.errors import NpsError

FORMAT = "nps-latency-model"
VERSION = 4  # 2: block and padded (a version-1 file reads as block 1, no layer padded); 3: padded_in (none before);
# 4: term_scale (ones before)
CALIBRATION_KEYS = ("keep_fraction", "measured_s", "predicted_s", "iqr_over_median")
OPTIONAL_CALIBRATION_KEYS = ("pruned_at_random",)  # 1 for a copy pruned at random (version 3; absent before)
_ATTRS = ("model", "mode", "resolution", "num_classes", "in_channels", "device", "device_name", "batch", "threads",
          "precision", "scale", "offset", "network_error", "base_latency_s", "block")
_TEXT = ("model", "mode", "device", "device_name", "precision")
_INTS = ("resolution", "num_classes", "in_channels", "batch", "threads", "block")


def nnls(A: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``argmin ||A x - y||`` over ``x >= 0``, exactly: the optimum is the unconstrained least-squares solution on
    its own support (a set of independent columns), so the best of the non-negative least-squares solutions over
    every subset of the columns is it. For the few columns of a latency fit (2^4 subsets of 4)."""
    A = np.asarray(A, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = A.shape[1]
    if n > 12:
        raise ValueError(f"nnls enumerates 2^{n} column subsets; use at most 12 columns")
    best, best_residual = np.zeros(n), float(y @ y)
    for size in range(1, n + 1):
        for support in itertools.combinations(range(n), size):
            cols = list(support)
            sol, *_ = np.linalg.lstsq(A[:, cols], y, rcond=None)
            if np.any(sol < 0):
                continue
            x = np.zeros(n)
            x[cols] = sol
            residual = float(np.sum((A @ x - y) ** 2))
            if residual < best_residual * (1 - 1e-12):  # strictly better: ties keep the smaller support
                best, best_residual = x, residual
    return best


def padded_count(count, block: int):
    """``block · ceil(count / block)``: a channel count as a kernel computing blocks of ``block`` channels pays for
    it (``count`` itself for block 1)."""
    count = np.asarray(count, dtype=np.float64)
    return count if block <= 1 else block * np.ceil(count / block)


def layer_terms(cin, cout, groups: int, depthwise: bool, block: int = 1, in_block: int = 1) -> np.ndarray:
    """The columns of a layer's form at (cin, cout): (1, cin·P/groups, P, cin) with P the output count rounded up to
    ``block`` (:func:`padded_count`; P = cout for block 1) and cin rounded up to ``in_block``; a depthwise conv's are
    (1, 0, P, 0)."""
    cin = padded_count(cin, in_block)
    cout = padded_count(cout, block)
    cin, cout = np.broadcast_arrays(cin, cout)
    one, zero = np.ones_like(cout), np.zeros_like(cout)
    if depthwise:
        return np.stack([one, zero, cout, zero], axis=-1)
    return np.stack([one, cin * cout / float(groups), cout, cin], axis=-1)


def relative_rms(predicted, measured) -> float:
    """sqrt(mean(((predicted - measured) / measured)²))."""
    predicted = np.asarray(predicted, dtype=np.float64)
    measured = np.asarray(measured, dtype=np.float64)
    return float(np.sqrt(np.mean(((predicted - measured) / measured) ** 2)))


def fit_layer(cin, cout, seconds, groups: int, depthwise: bool, block: int = 1,
              in_block: int = 1) -> tuple[np.ndarray, float]:
    """(coef a, b, c, d >= 0; relative RMS error on the points) of one layer's timing grid, its output count padded
    to ``block`` and its input count to ``in_block`` (:func:`layer_terms`).

    A count that does not vary on the grid (the image's channels into the stem, the classes out of the classifier,
    the residual stream in ``internal`` mode) cannot separate its terms: the slope in the other count goes to ``b``
    (c = d = 0) and the constant to ``a``; neither count varying leaves ``a`` alone."""
    cin = np.asarray(cin, dtype=np.float64)
    cout = np.asarray(cout, dtype=np.float64)
    seconds = np.asarray(seconds, dtype=np.float64)
    if seconds.size == 0 or np.any(~np.isfinite(seconds)) or np.any(seconds <= 0):
        raise ValueError("a layer fit needs positive, finite timings")
    A = layer_terms(cin, cout, groups, depthwise, block, in_block)
    pout, pin = A[:, 2], A[:, 3]  # the counts as the form prices them (padded to the blocks; pin unused depthwise)
    if depthwise:
        columns = [0, 2] if np.ptp(pout) > 0 else [0]
    elif np.ptp(pin) > 0 and np.ptp(pout) > 0:
        columns = [0, 1, 2, 3]
    elif np.ptp(pin) > 0 or np.ptp(pout) > 0:
        columns = [0, 1]
    else:
        columns = [0]
    w = 1.0 / seconds
    coef = np.zeros(4)
    coef[columns] = nnls(A[:, columns] * w[:, None], np.ones_like(seconds))
    return coef, relative_rms(A @ coef, seconds)


def fit_relative_calibration(layer_sums, c_measured, base_sum: float,
                             base_measured_s: float) -> tuple[float, float]:
    """(scale > 0, offset >= 0) from networks timed relative to the base (paired: ``c_measured`` = a network's
    latency over the base's, run by run) and the base's own time: ``c ≈ (o + sum) / (o + base_sum)`` with ``o >= 0``
    (least squares of ``(o + sum) - c·(o + base_sum)``, linear in o), then ``scale = base_measured_s / (o +
    base_sum)`` and ``offset = scale·o``, so the base is predicted at its measured time. The relative times repeat
    where absolute ones on a machine of changing speed do not; without a pruned network the offset is 0."""
    s = np.asarray(layer_sums, dtype=np.float64)
    c = np.asarray(c_measured, dtype=np.float64)
    d = c - 1.0
    o = 0.0
    if s.size and float(d @ d) > 0:
        o = max(0.0, float(d @ (s - c * base_sum)) / float(d @ d))
    scale = float(base_measured_s) / (o + float(base_sum))
    return scale, scale * o


def fit_relative_terms(term_sums, c_measured, base_terms, base_measured_s: float) -> tuple[np.ndarray, float]:
    """(term scales >= 0, offset >= 0): :func:`fit_relative_calibration` with one scale per term. ``term_sums``
    (networks, 4): each network's a, b, c and d terms summed over its layers; ``base_terms`` (4,) the base's. Least
    squares of ``(o + sums·w) - c·(o + base·w)`` over the networks, non-negative, with the base predicted at its
    measured time (a heavily weighted row), so only the ratios between the scales and the offset come from the
    pruned networks. Every network has every layer, so the a terms sum to the same constant in each: an offset
    beside them would be the same unknown twice, and the a scale carries it (offset 0) unless the a terms are 0."""
    term_sums = np.asarray(term_sums, dtype=np.float64).reshape(-1, 4)
    base_terms = np.asarray(base_terms, dtype=np.float64)
    if base_terms[0] > 0:
        return fit_relative_columns(term_sums, c_measured, base_terms, base_measured_s), 0.0
    x = fit_relative_columns(np.c_[np.ones(len(term_sums)), term_sums[:, 1:]], c_measured,
                             np.r_[1.0, base_terms[1:]], base_measured_s)
    return np.r_[0.0, x[1:]], float(x[0])


def fit_relative_columns(S: np.ndarray, c_measured, base: np.ndarray, base_measured_s: float) -> np.ndarray:
    """Non-negative weights ``x`` of the columns of ``S`` (one row per network) with ``S·x ≈ c·(base·x)`` for each
    network (least squares, each column scaled to unit size) and ``base·x = base_measured_s`` (a heavily weighted
    row)."""
    c = np.asarray(c_measured, dtype=np.float64)
    A = S - c[:, None] * base[None, :]
    norm = np.abs(np.vstack([A, base[None, :]])).max(axis=0)
    norm[norm == 0] = 1.0
    weight = 1e3
    x = nnls(np.vstack([A / norm, weight * base[None, :] / norm]), np.r_[np.zeros(len(A)), weight]) / norm
    return x * (float(base_measured_s) / float(base @ x))


@dataclass
class LatencyModel:
    """A network's per-layer latency model on one device (see the module docstring)."""

    model: str
    mode: str
    resolution: int
    num_classes: int
    in_channels: int
    device: str  # "cpu" or "cuda"
    device_name: str  # what the machine is: "cpu: <processor>, N threads", or the GPU's name
    batch: int
    threads: int
    precision: str  # fp32, fp16 or bf16 (autocast)
    layers: list[str]  # layer names, as graph.weight_order lists them (conv and linear layers)
    groups: np.ndarray  # (L,) int: each layer's conv groups in the base network (1 for linear)
    depthwise: np.ndarray  # (L,) bool
    coef: np.ndarray  # (L, 4) float64 seconds: a, b, c, d (>= 0)
    fit_error: np.ndarray  # (L,) relative RMS error of the fit on the layer's grid
    scale: float
    offset: float  # network seconds = offset + scale * sum of layer terms
    network_error: float  # RMS relative error of the calibrated prediction on the calibration networks
    calibration: dict  # "keep_fraction", "measured_s", "predicted_s", "iqr_over_median": lists
    base_latency_s: float  # measured latency of the unpruned network
    grid: dict | None = field(default=None)  # layer name -> (n, 3) float64 array: cin, cout, seconds
    block: int = 1  # the channel block of the device's kernels: a padded layer's output count is rounded up to it
    padded: np.ndarray | None = None  # (L,) bool: layers priced at their padded output count (None: none)
    padded_in: np.ndarray | None = None  # (L,) bool: layers priced at their padded input count too (None: none)
    term_scale: np.ndarray | None = None  # (4,) >= 0: the calibration's scale of each of a, b, c, d (None: ones)

    def __post_init__(self):
        self.groups = np.asarray(self.groups, dtype=np.int64)
        self.depthwise = np.asarray(self.depthwise, dtype=bool)
        self.block = int(self.block)
        self.padded = np.zeros(len(self.groups), dtype=bool) if self.padded is None else \
            np.asarray(self.padded, dtype=bool)
        self.padded_in = np.zeros(len(self.groups), dtype=bool) if self.padded_in is None else \
            np.asarray(self.padded_in, dtype=bool)
        if self.block < 1 or len(self.padded) != len(self.groups) or len(self.padded_in) != len(self.groups):
            raise ValueError("a latency model needs block >= 1 and one padded and padded_in flag per layer")
        self.coef = np.asarray(self.coef, dtype=np.float64).reshape(-1, 4)
        self.fit_error = np.asarray(self.fit_error, dtype=np.float64)
        self.layers = [str(n) for n in self.layers]
        if not (len(self.layers) == len(self.groups) == len(self.depthwise) == len(self.coef)
                == len(self.fit_error)):
            raise ValueError("a latency model needs one name, groups, depthwise flag, coef row and fit error per "
                             "layer")
        if np.any(self.coef < 0) or not np.all(np.isfinite(self.coef)):
            raise ValueError("latency coefficients must be finite and non-negative")
        self.term_scale = np.ones(4) if self.term_scale is None else \
            np.asarray(self.term_scale, dtype=np.float64).reshape(-1)
        if self.term_scale.shape != (4,) or np.any(self.term_scale < 0) or not np.all(np.isfinite(self.term_scale)):
            raise ValueError("a latency model's term_scale is four finite, non-negative numbers")

    def layer_block(self, i: int) -> int:
        """The block layer ``i``'s output count is rounded up to (1: not padded)."""
        return self.block if self.padded[i] else 1

    def layer_in_block(self, i: int) -> int:
        """The block layer ``i``'s input count is rounded up to (1: not padded)."""
        return self.block if self.padded_in[i] else 1

    def layer_form(self, i: int, cin, cout) -> np.ndarray:
        """The columns of layer ``i``'s form at (cin, cout) (:func:`layer_terms` with its groups and padding)."""
        return layer_terms(cin, cout, int(self.groups[i]), bool(self.depthwise[i]), self.layer_block(i),
                           self.layer_in_block(i))

    def layer_seconds(self, i: int, cin, cout):
        """Layer ``i``'s term at (cin, cout) (no scale or offset): a float, or an array for array counts."""
        value = self.layer_form(i, cin, cout) @ self.coef[i]
        return float(value) if np.ndim(value) == 0 else value

    def layer_share(self, i: int, cin, cout):
        """Layer ``i``'s term at (cin, cout) with each of a, b, c, d times ``term_scale`` (no scale or offset)."""
        value = self.layer_form(i, cin, cout) @ (self.coef[i] * self.term_scale)
        return float(value) if np.ndim(value) == 0 else value

    def predict(self, channels: dict) -> float:
        """Network seconds: ``offset + scale · Σ_i layer_share(i, *channels[name_i])``; ``channels`` names every
        layer (its (cin, cout) in the network to predict)."""
        missing = [n for n in self.layers if n not in channels]
        if missing:
            raise KeyError(f"no channel counts for {len(missing)} layer(s) of the latency model: "
                           f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        total = sum(self.layer_share(i, *channels[n]) for i, n in enumerate(self.layers))
        return float(self.offset + self.scale * total)

    # -- storage ------------------------------------------------------------------------------------------------------

    def write(self, group: h5py.Group) -> None:
        """Into ``group`` (emptied of what an older model left there): attributes, per-layer arrays, the
        calibration points and, if kept, the timing grids."""
        for key in list(group.keys()):
            del group[key]
        group.attrs["format"] = FORMAT
        group.attrs["version"] = VERSION
        for name in _ATTRS:
            value = getattr(self, name)
            group.attrs[name] = str(value) if name in _TEXT else (int(value) if name in _INTS else float(value))
        group.create_dataset("layers", data=np.array(self.layers, dtype=object), dtype=h5py.string_dtype())
        group.create_dataset("groups", data=self.groups)
        group.create_dataset("depthwise", data=self.depthwise.astype(np.uint8))
        group.create_dataset("coef", data=self.coef)
        group.create_dataset("fit_error", data=self.fit_error)
        group.create_dataset("padded", data=self.padded.astype(np.uint8))
        group.create_dataset("padded_in", data=self.padded_in.astype(np.uint8))
        group.create_dataset("term_scale", data=self.term_scale)
        cal = group.create_group("calibration")
        for key in CALIBRATION_KEYS + tuple(k for k in OPTIONAL_CALIBRATION_KEYS if k in self.calibration):
            cal.create_dataset(key, data=np.asarray(self.calibration[key], dtype=np.float64))
        if self.grid is not None:
            index = [np.full(len(self.grid[n]), i, dtype=np.int64) for i, n in enumerate(self.layers) if n in self.grid]
            points = [np.asarray(self.grid[n], dtype=np.float64).reshape(-1, 3) for n in self.layers if n in self.grid]
            g = group.create_group("grid")
            g.create_dataset("layer", data=np.concatenate(index) if index else np.zeros(0, np.int64))
            g.create_dataset("points", data=np.concatenate(points) if points else np.zeros((0, 3)))

    @classmethod
    def read(cls, group: h5py.Group) -> "LatencyModel":
        """The model written into ``group``; one NpsError line naming the file and group when it holds none."""
        where = f"{group.file.filename}:{group.name}" if group.name != "/" else group.file.filename
        if group.attrs.get("format") != FORMAT:
            raise NpsError(f"{where}: not an nps latency model (no format attribute {FORMAT!r}); make one with "
                           "nps latency-model")
        version = int(group.attrs.get("version", 0))
        if version > VERSION:
            raise NpsError(f"{where}: latency model format {version} is newer than this nps reads ({VERSION}); "
                           "update nps")
        try:
            values = {}
            for name in _ATTRS:
                if name == "block" and version < 2:
                    values[name] = 1
                    continue
                raw = group.attrs[name]
                values[name] = (raw.decode() if isinstance(raw, bytes) else str(raw)) if name in _TEXT else \
                    (int(raw) if name in _INTS else float(raw))
            values["layers"] = [s.decode() if isinstance(s, bytes) else str(s) for s in group["layers"][()]]
            values["groups"] = group["groups"][()]
            values["depthwise"] = group["depthwise"][()].astype(bool)
            values["coef"] = group["coef"][()]
            values["fit_error"] = group["fit_error"][()]
            values["padded"] = group["padded"][()].astype(bool) if version >= 2 else None
            values["padded_in"] = group["padded_in"][()].astype(bool) if version >= 3 else None
            values["term_scale"] = group["term_scale"][()] if version >= 4 else None
            values["calibration"] = {k: [float(v) for v in group["calibration"][k][()]] for k in CALIBRATION_KEYS
                                     + tuple(k for k in OPTIONAL_CALIBRATION_KEYS if k in group["calibration"])}
            grid = None
            if "grid" in group:
                index, points = group["grid"]["layer"][()], group["grid"]["points"][()]
                grid = {values["layers"][i]: points[index == i] for i in np.unique(index)}
            return cls(**values, grid=grid)
        except (KeyError, ValueError, TypeError, OSError) as exc:
            raise NpsError(f"{where}: an incomplete or damaged latency model ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}); make it again with nps "
                           "latency-model") from None

    def save(self, path: str | os.PathLike) -> None:
        """A file of its own, written atomically (a reader sees the old file or the whole new one)."""
        from nps.pipeline.files import atomic_path

        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            self.write(f)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyModel":
        """The model saved at ``path``; a missing, truncated or foreign file is one NpsError line naming it."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise NpsError(f"{path}: no such latency model file; make one with nps latency-model --out {path}")
        try:
            f = h5py.File(path, "r")
        except OSError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise NpsError(f"{path}: not a readable HDF5 file ({first}); it may be truncated: make it again with "
                           "nps latency-model") from None
        with f:
            return cls.read(f)
