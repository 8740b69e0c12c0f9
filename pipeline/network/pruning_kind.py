"""What a space prunes, as an object: :data:`FILTERS` (whole channels, a physically smaller network) or
:data:`WEIGHTS` (single weights, masked by magnitude in the base network's own shapes).

A kind is resolved once per space (:func:`kind_of` reads the space's name or key) and then asked, never the key
string again: which table its keep vectors count in, whether members can be fused into one module, whether a
latency measurement says anything, what its recipe's entries are called and which space is its regime's uniform
baseline; how a member of each kind is built is :func:`nps.pipeline.network.members.member_factory`'s registry.
The analysis keeps the kinds apart (a regime is a kind and a target): a fit, a histogram or a recipe panel never
mixes filter and weight rows.

This module imports no torch (the results layer asks it too): building members is in a module of its own.
"""
from __future__ import annotations

from dataclasses import dataclass

from nps.kernels.spaces import BASELINE, WEIGHTS as WEIGHTS_PREFIX


@dataclass(frozen=True)
class PruningKind:
    """One kind of pruning and everything that differs between the kinds.

    Attributes
    ----------
    name : str
        ``filters`` or ``weights`` (the ``pruning`` column of ``nps table``, ``[model] pruning``).
    prefix : str
        What a space name of this kind starts with (``""`` or ``"weights:"``).
    table_group : str
        The results.h5 group of the table its keep vectors count in (``layers`` or ``weight_layers``).
    fusable : bool
        Members of different widths can be trained as one fused module (weight members all keep every channel:
        nothing to fuse).
    timed : bool
        Its subnetworks run faster than the base (a masked network runs at the dense speed: not timed).
    unit : str
        What one recipe entry prunes: a channel group or a layer.
    recipe_axis : str
        What one recipe entry's value is, in words (a figure's axis).
    baseline_space : str
        The space name of its regime's uniform baseline (one row per regime).
    """

    name: str
    prefix: str
    table_group: str
    fusable: bool
    timed: bool
    unit: str
    recipe_axis: str
    baseline_space: str

    def space_name(self, name: str) -> str:
        """``name`` as a space of this kind (``std-0.05`` -> ``weights:std-0.05`` for weights)."""
        return name if name.startswith(self.prefix) else self.prefix + name

    def is_baseline(self, space: str) -> bool:
        """Whether ``space`` (a name, without the regime) is this kind's uniform baseline."""
        return space == self.baseline_space

    def table(self, filter_table, weight_table):
        """Of a network's two tables, the one this kind's keep vectors count in."""
        return weight_table if self is WEIGHTS else filter_table


FILTERS = PruningKind("filters", "", "layers", fusable=True, timed=True, unit="group",
                      recipe_axis="pruning ratio r of the group", baseline_space=BASELINE)
WEIGHTS = PruningKind("weights", WEIGHTS_PREFIX, "weight_layers", fusable=False, timed=False, unit="layer",
                      recipe_axis="sparsity of the layer", baseline_space=WEIGHTS_PREFIX + "uniform")
KINDS = (FILTERS, WEIGHTS)
BY_NAME = {k.name: k for k in KINDS}


def kind_of(key: str) -> PruningKind:
    """The kind of a space, from its name or key (``weights:std-0.05@c_flops=0.1`` -> :data:`WEIGHTS`)."""
    return WEIGHTS if key.startswith(WEIGHTS_PREFIX) else FILTERS


def kind_named(name: str) -> PruningKind:
    """The kind called ``name`` (``filters`` or ``weights``, as ``[model] pruning`` says)."""
    return BY_NAME[name]
