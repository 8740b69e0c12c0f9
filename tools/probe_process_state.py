"""Does a timing depend on what the process timed before it? Paired ratios of a few probe subnetworks, fresh and
after many other subnetworks have run in the same process, against each timed in a forked child (nps latency's way).

One process, one intra-op thread. Probes and others are subnetworks of the network pruned at random (every group's
ratio uniform in [0, ``--max-ratio``], seeded). The probes are timed paired with the base network
(``time_network_pair``: the median ratio of interleaved runs):

1. ``fresh``: in this process, before any other subnetwork has run in it;
2. ``after N``: in this process again, after each of N other subnetworks has run (one paired timing each, short);
3. ``forked``: each in a child forked from a parent in which no network has run, as ``nps latency`` times every
   network on the CPU with one thread (:mod:`nps.pipeline.deploy.isolation`).

Before a probe's ``fresh`` timing only the base and the probes built before it have run. One JSON line per probe and
timing, then a summary line: the mean change from ``fresh`` (the baseline) to ``after N`` and to ``forked``. The
forked timings run first, from a parent that has built every network but run none.

    python tools/probe_process_state.py [--model mobilenet_v2] [--probes 3] [--others 50] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--resolution", type=int, default=28)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--probes", type=int, default=3)
    ap.add_argument("--others", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=2, help="paired timings per probe and state (median kept)")
    ap.add_argument("--max-ratio", type=float, default=0.5)
    args = ap.parse_args()

    import torch

    from nps.kernels.complexity import keep_from_recipe
    from nps.pipeline.deploy.allocator import steady_heap
    from nps.pipeline.deploy.isolation import FORKED, isolation, run_isolated
    from nps.pipeline.deploy.latency import time_network_pair
    from nps.pipeline.network.layer_table import build_layer_table
    from nps.pipeline.network.models import build_model
    from nps.pipeline.network.prune import prune_model

    torch.set_num_threads(1)
    steady_heap()
    torch.manual_seed(0)
    table = build_layer_table(args.model, "all", args.resolution, 10, 1)
    base = build_model(args.model, num_classes=10, in_channels=1).eval()
    rng = np.random.default_rng(0)

    def subnetwork():
        recipe = rng.uniform(0.0, args.max_ratio, len(table.channels))
        return prune_model(base, table, keep_from_recipe(recipe, table.channels, table.granularity))

    probes = [subnetwork() for _ in range(args.probes)]
    others = [subnetwork() for _ in range(args.others)]

    def ratio(net, runs: int = 20) -> float:
        return float(time_network_pair(base, net, table, args.batch, device="cpu", channels_last=True,
                                       runs=runs).ratio)

    def median_ratio(net) -> float:
        return float(np.median([ratio(net) for _ in range(args.repeats)]))

    got = {}
    if isolation("cpu") == FORKED:
        got["forked"] = [run_isolated(lambda: median_ratio(p), f"probe {i}", "cpu") for i, p in enumerate(probes)]
    got["fresh"] = [median_ratio(p) for p in probes]
    for net in others:
        ratio(net, runs=2)
    got[f"after {args.others}"] = [median_ratio(p) for p in probes]
    for state, ratios in got.items():
        for i, r in enumerate(ratios):
            print(json.dumps({"bench": "process_state", "model": args.model, "probe": i, "state": state,
                              "paired_ratio": round(r, 4)}), flush=True)
    fresh = np.asarray(got["fresh"])
    print(json.dumps({"bench": "process_state_summary", "model": args.model, "baseline": "fresh",
                      "others": args.others, **{f"mean_change_{k.replace(' ', '_')}": round(float(np.mean(
                          np.asarray(v) - fresh)), 4) for k, v in got.items() if k != "fresh"}}), flush=True)


if __name__ == "__main__":
    main()
