"""tools/window_bound.py: the window masses it scores estimate the prior's mass in the target's band, which is the
same whichever groups a window moves (one group, a pair): their means agree within Monte Carlo error."""
from __future__ import annotations

import numpy as np

from helpers import load_tool


def _tool():
    return load_tool("window_bound")


def test_one_group_and_pair_windows_hold_the_same_prior_mass_on_average():
    from nps.kernels.complexity import unit_table
    from nps.kernels.spaces import parse_space, space_center
    from nps.pipeline.network.layer_table import build_layer_table

    tool = _tool()
    units, _ = unit_table(build_layer_table("resnet20", "all", 28, 10, 1))
    space = parse_space("std-0.05", "c_flops", 0.5)
    u = space_center(units, space)
    d = np.zeros(len(units.channels))
    d[8] = 1.0
    one = tool.window_masses(units, space, u, d, 400, 401, seed=1)
    pair = tool.pair_masses(units, space, u, (0, 8), 300, 121, seed=2)
    assert 0.0 < one.mean() < 1.0 and 0.0 < pair.mean() < 1.0 and pair.max() <= 1.0
    se = np.hypot(one.std() / np.sqrt(one.size), pair.std() / np.sqrt(pair.size))
    assert abs(one.mean() - pair.mean()) < 4 * se  # measured: 0.0697 and 0.0632, 4 se 0.0145
