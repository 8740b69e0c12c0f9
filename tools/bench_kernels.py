"""The sampler kernels one by one on one space: time a proposal, acceptance and recipes/s of each (what
``nps.kernels.samplers.CELL_COST`` is set from, relative to the window kernel's proposal).

Each kernel draws the same space through ``sample_space`` with the choice pinned (``WINDOW_COST``, ``CELL_GROUPS``;
plain rejection by lifting ``PLAIN_ABOVE``), best of --repeats runs of --n recipes, thread CPU time (pilots and
checks included), after one run that compiles. One JSON line per kernel:
  {"bench": "kernels", "model", "space", "target", "value", "kernel", "method", "ns_per_proposal",
   "ns_per_proposal_rel", "acceptance", "zmax", "recipes_per_s", "speedup", "baseline"}
Baseline: the window kernel (kernels/gauss_kernel.sample_gauss) on the same space in the same process:
``ns_per_proposal_rel`` and ``speedup`` (recipes/s) are relative to it.

usage: python tools/bench_kernels.py --model resnet20 --resolution 28 --in-channels 1 \\
           --latency-model runs/latency-study-v7/resnet20/latency-model.h5 --space std-0.05 --value 0.5135
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import nps.kernels.samplers as samplers  # noqa: E402
from space_table import add_space_arguments, table_and_space  # noqa: E402  (tools/, beside this script)

PINNED = {"window": {"CELL_GROUPS": ()}, "cells-1": {"WINDOW_COST": math.inf, "CELL_GROUPS": (1,)},
          "cells-2": {"WINDOW_COST": math.inf, "CELL_GROUPS": (2,)}, "plain": {"PLAIN_ABOVE": -1.0}}


def measure(table, space, kernel: str, n: int, repeats: int) -> dict:
    saved = {name: getattr(samplers, name) for name in PINNED[kernel]}
    for name, value in PINNED[kernel].items():
        setattr(samplers, name, value)
    try:
        samplers.sample_space(table, space, 100, seed=0)  # compile
        best = None
        for rep in range(repeats):
            c0 = time.thread_time()
            s = samplers.sample_space(table, space, n, seed=rep)
            seconds = time.thread_time() - c0
            if best is None or seconds < best[0]:
                best = seconds, s
    finally:
        for name, value in saved.items():
            setattr(samplers, name, value)
    seconds, s = best
    proposals = s.stats["proposals"]
    return {"kernel": kernel, "method": s.stats["kernel"], "ns_per_proposal": round(seconds / proposals * 1e9, 1),
            "acceptance": round(len(s) / proposals, 4), "zmax": round(s.stats["zmax"], 3),
            "recipes_per_s": round(len(s) / seconds)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_space_arguments(ap)
    ap.add_argument("--n", type=int, default=300_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kernels", default=",".join(PINNED), help="which of: " + ", ".join(PINNED))
    args = ap.parse_args()
    table, space = table_and_space(args)
    base = None
    for kernel in ["window"] + [k for k in args.kernels.split(",") if k and k != "window"]:
        line = measure(table, space, kernel, args.n, args.repeats)
        base = base or line
        line.update(ns_per_proposal_rel=round(line["ns_per_proposal"] / base["ns_per_proposal"], 3),
                    speedup=round(line["recipes_per_s"] / base["recipes_per_s"], 3))
        print(json.dumps({"bench": "kernels", "model": args.model, "space": args.space, "target": args.target,
                          "value": args.value, **line, "n": args.n, "repeats": args.repeats,
                          "baseline": "the window kernel, same space, same process"}), flush=True)


if __name__ == "__main__":
    main()
