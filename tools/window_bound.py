"""How much acceptance an exact window along t can give a space, direction by direction (offline, no timing).

The window kernel (kernels/gauss_kernel.py) splits the noise into e, orthogonal to a direction d, and t along it, and
accepts e with probability Z(e)/Z_max, Z(e) the prior mass of the t that meet the target. With the exact window (the
kernel's where one group moves) its acceptance is E[Z]/max Z, before the std(r) and mCB checks: E[Z] is the prior's
mass in the band, the same for every d, and max Z, the envelope, is what a direction changes. This scores it for
several directions: Z(e) of each of --draws draws of e, by evaluating the target on the integer counts at --grid
values of t across ±4σ (the exact window's mass to within the grid's step).

One JSON line per direction:
  {"bench": "window_bound", "model", "space", "target", "value", "direction", "moving": [groups],
   "mean_Z", "max_Z", "acceptance_bound": mean_Z / max_Z, "draws", "baseline"}
Directions: "sampler" (kernels.samplers._direction, what the sampler uses), "group <i>" (each group alone, along its
gradient), "gradient" (every group, along the whole gradient). Baseline: the sampler's direction.

``--pairs 0,1;4,8``: also an exact window over two groups' noise at once, one line per pair, "direction":
"pair <i>,<j>": Z(e) the prior mass of the (t_i, t_j) on a --pair-grid² grid across ±4σ that meet the target, e the
other groups' noise. The cell kernel (kernels/cell_kernel.py) draws so, exactly; its pilot's envelope over 20,000
draws is the figure to trust: the largest Z of --pair-draws (1,000) draws is optimistic (ResNet-20 at c_latency
0.5135, groups 0 and 1: 0.163 here, 0.092 by the kernel's pilot).

usage: python tools/window_bound.py --model resnet20 --resolution 28 --in-channels 1 \\
           --latency-model runs/latency-study/resnet20/latency-model.h5 --space std-0.05 --target c_latency \\
           --value 0.5537
"""
from __future__ import annotations

import argparse
import json
import math

import numpy as np

from nps.kernels.complexity import keep_from_recipe, unit_table
from nps.kernels.samplers import _target_bounds, window_direction
from nps.kernels.spaces import space_center, target_form
from space_table import add_space_arguments, table_and_space  # tools/, beside this script


def window_masses(table, space, u, d, draws: int, grid: int, seed: int = 0) -> np.ndarray:
    """Z(e) for ``draws`` draws of e orthogonal to the unit direction ``d``."""
    return _masses(table, space, u, np.asarray(d, dtype=np.float64)[None, :], draws, grid, seed)


def pair_masses(table, space, u, pair, draws: int, grid: int, seed: int = 0) -> np.ndarray:
    """Z(e) over two groups' noise at once: the prior mass of the (t_i, t_j) that meet the target, for ``draws``
    draws of the other groups' noise."""
    return _masses(table, space, u, np.eye(len(table.channels))[list(pair)], draws, grid, seed)


def _masses(table, space, u, directions: np.ndarray, draws: int, grid: int, seed: int) -> np.ndarray:
    """Z(e) along the orthonormal ``directions`` (k, G) at once: the prior mass of the t on a ``grid``^k grid across
    ±4σ that meet the target on the integer counts, for ``draws`` draws of e orthogonal to them all."""
    (form, _), _ = target_form(table, space.target)
    lo, hi = _target_bounds(table, space)
    c = np.asarray(table.channels)
    rng = np.random.default_rng(seed)
    e = rng.standard_normal((draws, len(c)))
    e = space.sigma * (e - (e @ directions.T) @ directions)
    t = np.linspace(-4.0, 4.0, grid)  # in σ
    w = np.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi) * (t[1] - t[0])
    k = len(directions)
    ts = np.stack([a.ravel() for a in np.meshgrid(*[t] * k, indexing="ij")], axis=1)  # (grid^k, k)
    weight = np.prod(np.stack([a.ravel() for a in np.meshgrid(*[w] * k, indexing="ij")], axis=1), axis=1)
    step = space.sigma * ts @ directions  # (grid^k, G)
    z = np.empty(draws)
    for j in range(draws):
        r = u + e[j][None, :] + step
        inside = np.all((r >= 0) & (r <= space.R), axis=1)
        value = form(keep_from_recipe(np.clip(r, 0.0, space.R), c))
        z[j] = weight[inside & (value >= lo) & (value <= hi)].sum()
    return z


def _line(args, name: str, moving, z: np.ndarray) -> str:
    return json.dumps({"bench": "window_bound", "model": args.model, "space": args.space, "target": args.target,
                       "value": args.value, "direction": name, "moving": moving,
                       "mean_Z": round(float(z.mean()), 4), "max_Z": round(float(z.max()), 4),
                       "acceptance_bound": round(float(z.mean() / z.max()), 3) if z.max() > 0 else 0.0,
                       "draws": int(z.size), "baseline": "the sampler's direction"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_space_arguments(ap)
    ap.add_argument("--draws", type=int, default=3000)
    ap.add_argument("--grid", type=int, default=1201, help="t values across ±4σ")
    ap.add_argument("--pairs", default="", help="pairs of groups for two-group windows: 0,1;4,8")
    ap.add_argument("--pair-grid", type=int, default=121, help="t values per group of a pair across ±4σ")
    ap.add_argument("--pair-draws", type=int, default=1000)
    args = ap.parse_args()
    table, space = table_and_space(args)
    units, _ = unit_table(table)
    (form, _), _ = target_form(units, space.target)
    u = space_center(units, space)
    c = np.asarray(units.channels, dtype=np.float64)
    g = form.gradient((1.0 - u) * c) * c
    directions = {"sampler": window_direction(units, space), "gradient": g}
    for i in range(len(c)):
        directions[f"group {i}"] = np.where(np.arange(len(c)) == i, max(g[i], 1e-12), 0.0)
    for name, d in directions.items():
        d = np.asarray(d, dtype=np.float64) / np.linalg.norm(d)
        z = window_masses(units, space, u, d, args.draws, args.grid)
        print(_line(args, name, np.flatnonzero(d > 0).tolist(), z), flush=True)
    for pair in filter(None, args.pairs.split(";")):
        i, j = (int(x) for x in pair.split(","))
        z = pair_masses(units, space, u, (i, j), args.pair_draws, args.pair_grid)
        print(_line(args, f"pair {i},{j}", [i, j], z), flush=True)


if __name__ == "__main__":
    main()
