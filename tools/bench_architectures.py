"""Per architecture: layer-table build time, groups, reachable c_flops, sampler speed and pruning time.

One JSON line per architecture (224 px, 10 classes, ``all`` mode unless --mode), everything on one core:
  {"bench": "architecture", "model", "groups", "table_s", "tp_graph_s", "c_flops_min", "std05_recipes_per_s",
   "prune_ms", "tp_prune_ms", ...}

- ``table_s``: wall time of ``build_layer_table`` (trace, shapes on the meta device, channel analysis, forms), best
  of --repeats. Baseline ``tp_graph_s``: Torch-Pruning's ``DependencyGraph().build_dependency`` on the same
  model and input size (the oracle the tests use), same core, same run.
- ``c_flops_min``: the smallest c_flops any recipe with ratios in [0, R] reaches (R = 0.95).
- ``std05_recipes_per_s``: STD-0.05 recipes per second at c_flops 0.25 (--n recipes, the whole ``sample_space``
  call, best of --repeats). Baseline ``naive_recipes_per_s``: numpy plain rejection of the same space
  (``sample_naive``) for at most 10 s.
- ``prune_ms``: one subnetwork (a STD-0.05 recipe) physically pruned from the real base network with the l2
  criterion, median of --repeats after a first call that analyses the model once. Baseline ``tp_prune_ms``:
  Torch-Pruning removing the same channels from a copy of the same base with a prebuilt DependencyGraph (the copy
  and the graph build not timed).

usage: python tools/bench_architectures.py [--models mobilenet_v2,efficientnet_b0] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

os.environ.setdefault("NUMBA_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from nps.kernels.samplers import sample_naive, sample_space  # noqa: E402
from nps.kernels.spaces import parse_space, reachable_range  # noqa: E402
from nps.pipeline.network.layer_table import build_layer_table  # noqa: E402
from nps.pipeline.network.models import CIFAR_MODELS, MODELS, build_model  # noqa: E402
from nps.pipeline.network.prune import channel_indices, prune_model  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def tp_removal(model, table, kept, resolution):
    """(build s, prune s) of Torch-Pruning removing ``kept``'s complement from a copy of ``model``."""
    import torch_pruning as tp

    copied = copy.deepcopy(model)
    t0 = time.perf_counter()
    graph = tp.DependencyGraph().build_dependency(copied, example_inputs=torch.randn(1, table.in_channels,
                                                                                      resolution, resolution))
    build = time.perf_counter() - t0
    modules = dict(copied.named_modules())
    t0 = time.perf_counter()
    for channels, members, idx in zip(table.channels, table.members, kept):
        removed = sorted(set(range(int(channels))) - set(idx.tolist()))
        if removed:
            first = modules[members[0]]
            fn = tp.prune_linear_out_channels if isinstance(first, torch.nn.Linear) else tp.prune_conv_out_channels
            graph.get_pruning_group(first, fn, idxs=removed).prune()
    return build, time.perf_counter() - t0


def measure(name: str, args) -> dict:
    resolution = 32 if name in CIFAR_MODELS else args.resolution
    line = {"bench": "architecture", "model": name, "mode": args.mode, "resolution": resolution,
            "baseline": "Torch-Pruning DependencyGraph build / group pruning of the same channels (table_s, "
                        "prune_ms); numpy plain rejection of the same space (sampler); same core, same run"}
    build_layer_table(name, args.mode, resolution, args.classes)  # imports, numba caches
    line["table_s"] = round(min(timed(lambda: build_layer_table(name, args.mode, resolution, args.classes))
                                for _ in range(args.repeats)), 3)
    table = build_layer_table(name, args.mode, resolution, args.classes)
    line["groups"] = len(table)
    line["granular_groups"] = int((table.granularity > 1).sum())
    line["c_flops_min"] = round(reachable_range(table, "c_flops", 0.95)[0], 5)
    space = parse_space("std-0.05", "c_flops", 0.25)
    sample_space(table, space, 100, seed=1)
    best = 0.0
    for rep in range(args.repeats):
        t0 = time.perf_counter()
        s = sample_space(table, space, args.n, seed=rep)
        best = max(best, len(s) / (time.perf_counter() - t0))
    line["std05_recipes_per_s"] = round(best)
    line["std05_acceptance"] = round(s.stats["accepted"] / s.stats["proposals"], 4)
    line["std05_method"] = s.stats["method"]
    t0 = time.perf_counter()
    naive, _ = sample_naive(table, space, args.n, seed=0, max_proposals=args.naive_proposals)
    line["naive_recipes_per_s"] = round(len(naive) / (time.perf_counter() - t0), 1)
    line["sampler_ratio"] = round(best / line["naive_recipes_per_s"], 2) if line["naive_recipes_per_s"] else None

    torch.manual_seed(0)
    model = build_model(name, num_classes=args.classes).eval()
    keep = s.keep[0]
    first = timed(lambda: prune_model(model, table, keep))
    times = [timed(lambda: prune_model(model, table, keep)) for _ in range(args.repeats)]
    line["prune_first_ms"] = round(first * 1e3, 1)
    line["prune_ms"] = round(statistics.median(times) * 1e3, 1)
    if not args.no_tp:
        kept = channel_indices(model, table, keep)
        tp_build, tp_prune = zip(*(tp_removal(model, table, kept, resolution) for _ in range(args.tp_repeats)))
        line["tp_graph_s"] = round(min(tp_build), 3)
        line["tp_prune_ms"] = round(statistics.median(tp_prune) * 1e3, 1)
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--mode", default="all", choices=["all", "internal"])
    ap.add_argument("--resolution", type=int, default=224, help="input size of the ImageNet models (CIFAR: 32)")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--n", type=int, default=300_000, help="recipes per sampler run")
    ap.add_argument("--naive-proposals", type=int, default=2_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tp-repeats", type=int, default=2)
    ap.add_argument("--no-tp", action="store_true", help="skip the Torch-Pruning baselines")
    ap.add_argument("--quick", action="store_true", help="small n, one repeat (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.n, args.repeats, args.tp_repeats, args.naive_proposals = 5000, 1, 1, 200_000
    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    for name in args.models.split(","):
        print(json.dumps(measure(name, args)), flush=True)


if __name__ == "__main__":
    main()
