"""The layer table as data: a base network's prunable groups and its FLOPs/params as forms in the kept counts
(numpy only, no torch: the results layer reads it from results.h5). How a table is built from a network, and what its
groups, units and FLOPs conventions are: :mod:`nps.pipeline.network.layer_table`."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from nps.kernels.complexity import QuadraticForm, keep_from_recipe
from nps.pipeline.errors import NpsError


LATENCY_UNIT = 1e-15
"""Seconds per unit of a table's latency form: femtoseconds, so that the form has integer coefficients (exact in
int64, like FLOPs, up to 2**63 fs = 2.5 hours) and rounding them moves a prediction by far less than a nanosecond
(:func:`nps.pipeline.network.layer_table.latency_form`)."""


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
    latency: QuadraticForm | None = None  # predicted latency (integer femtoseconds) by a latency model, if given
    base_latency: int = 0                 # ... of the unpruned network (layer_table.with_latency builds both)

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

    def latency_of(self, keep) -> np.ndarray:
        """Predicted latency in seconds per keep vector, by the table's latency model (NpsError without one)."""
        if self.latency is None:
            raise NpsError(f"the layer table of {self.model} has no latency model (nps latency-model)")
        return self.latency(self.to_units(keep)) * LATENCY_UNIT

    def c_latency(self, keep) -> np.ndarray:
        """Predicted latency(sub) / latency(base) per keep vector (float64)."""
        return self.latency_of(keep) / (self.base_latency * LATENCY_UNIT)

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
        forms = [("flops", self.flops), ("params", self.params)]
        if self.latency is not None:  # results format 4: the latency form of c_latency regimes
            forms.append(("latency", self.latency))
            group.attrs["base_latency"] = np.int64(self.base_latency)
        for prefix, form in forms:
            group.create_dataset(f"{prefix}_const", data=np.int64(form.const))
            group.create_dataset(f"{prefix}_linear", data=form.linear)
            group.create_dataset(f"{prefix}_pair_a", data=form.pair_a)
            group.create_dataset(f"{prefix}_pair_b", data=form.pair_b)
            group.create_dataset(f"{prefix}_pair_w", data=form.pair_w)
            if form.padded:  # a latency form whose layers price output channels in blocks (kernels.complexity)
                group.create_dataset(f"{prefix}_pad_mult", data=form.pad_mult)
                group.create_dataset(f"{prefix}_pad_block", data=form.pad_block)
        for key in ("mode", "model", "flops_convention"):
            group.attrs[key] = getattr(self, key)
        for key in ("resolution", "num_classes", "in_channels", "base_flops", "base_params", "channel_multiple"):
            group.attrs[key] = np.int64(getattr(self, key))

    @classmethod
    def from_hdf5(cls, group) -> "LayerTable":
        """Read a table written by ``to_hdf5`` (files written before granularity and conventions existed read as
        granularity 1, ``macs``; a table without a latency form has ``latency`` None)."""

        def text(value) -> str:
            return value.decode() if isinstance(value, bytes) else str(value)

        def form(prefix: str) -> QuadraticForm:
            pad = [group[f"{prefix}_{k}"][()] for k in ("pad_mult", "pad_block")] \
                if f"{prefix}_pad_mult" in group else [None, None]
            return QuadraticForm(int(group[f"{prefix}_const"][()]), group[f"{prefix}_linear"][()],
                                 group[f"{prefix}_pair_a"][()], group[f"{prefix}_pair_b"][()],
                                 group[f"{prefix}_pair_w"][()], *pad)

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
            latency=form("latency") if "latency_const" in group else None,
            base_latency=int(group.attrs.get("base_latency", 0)),
        )

    def __eq__(self, other) -> bool:
        if not isinstance(other, LayerTable):
            return NotImplemented
        scalars = ("model", "mode", "resolution", "num_classes", "in_channels", "names", "members", "flops",
                   "params", "base_flops", "base_params", "flops_convention", "channel_multiple", "latency",
                   "base_latency")
        return all(getattr(self, k) == getattr(other, k) for k in scalars) and \
            np.array_equal(self.channels, other.channels) and np.array_equal(self.granularity, other.granularity)


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
