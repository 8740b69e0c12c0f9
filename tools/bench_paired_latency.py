"""Do a subnetwork's latencies relative to the base repeat? Timed apart against timed paired (nps latency's way).

Each row of the chosen spaces of a results file is timed in --passes passes, each pass timing every row twice:

- **apart** (the baseline): the row alone (``time_network``), its relative latency its median over the median of
  the base network timed alone at the start of the pass: what ``nps latency --unpaired`` stores;
- **paired**: the row interleaved with the base run by run (``time_network_pair``), its relative latency the median
  of the per-pair ratios: what ``nps latency`` stores by default.

With ``--folded`` a third method, **folded**: the row paired with the base as above, both networks with every batch
norm folded into the convolution before it (``torch.fx.experimental.optimization.fuse``, what an inference engine
runs): does a gap between what the latency model predicts and what is measured lie in the unfolded batch norms?

One JSON line per row and pass, then per space and method one summary line: how far the two passes' relative
latencies lie apart (mean absolute difference), their correlation across the rows, and, where the file has a
latency model, R² of each pass against the predicted c_latency and the mean residual (measured − predicted c). Run it on a quiet machine (one thread, as
``nps latency``); the two methods take turns on each row, so a slow spell of the machine meets both.

usage: python tools/bench_paired_latency.py RESULTS.h5 [--batch 32] [--passes 2] [--space S ...] [--folded]
"""
from __future__ import annotations

import argparse
import json

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--space", action="append", help="space keys to time (default: every filter space)")
    ap.add_argument("--folded", action="store_true", help="also time each pair with the batch norms folded")
    args = ap.parse_args()

    import torch

    from nps.pipeline.deploy.latency import time_network, time_network_pair
    from nps.pipeline.network.models import build_model
    from nps.pipeline.network.prune import prune_model
    from nps.pipeline.network.table import LATENCY_UNIT, LayerTable
    from nps.pipeline.results.latency_prediction import r_squared
    from nps.pipeline.results.reader import open_readonly

    torch.set_num_threads(1)
    with open_readonly(args.results) as reader:
        table = LayerTable.from_hdf5(reader.layers)
        rows = []
        for space in args.space or [s for s in reader.spaces() if not s.startswith("weights:")]:
            keep = reader.read(space, ["keep"])["keep"]
            rows += [(space, j, keep[j].astype(np.int64)) for j in range(len(keep))]
    predicted = None
    if table.latency is not None:  # c_latency as the report computes it: the row's prediction over the base's
        base_s = table.base_latency * LATENCY_UNIT
        predicted = {(s, j): float(table.latency_of(k[None])[0] / base_s) for s, j, k in rows}
    torch.manual_seed(0)
    base = build_model(table.model, num_classes=int(table.num_classes), in_channels=int(table.in_channels))
    kw = dict(device=torch.device("cpu"), channels_last=True, amp_dtype=None, warmup=5, runs=20, min_run_s=0.02)
    nets = [(s, j, prune_model(base, table, k)) for s, j, k in rows]
    methods = ("apart", "paired", "folded") if args.folded else ("apart", "paired")
    if args.folded:
        from torch.fx.experimental.optimization import fuse

        folded_base = fuse(base.eval())
        folded = {(s, j): fuse(net.eval()) for s, j, net in nets}
    taken: dict[tuple, dict] = {}
    for p in range(args.passes):
        base_alone = time_network(base, table, args.batch, **kw)
        for s, j, net in nets:
            apart = time_network(net, table, args.batch, **kw)
            pair = time_network_pair(base, net, table, args.batch, **kw)
            line = {"bench": "paired_latency", "pass": p, "space": s, "row": j,
                    "apart_c": apart.median_s / base_alone.median_s, "paired_c": pair.ratio,
                    "apart_noise": apart.noise, "paired_noise": pair.noise,
                    "base_alone_ms": 1e3 * base_alone.median_s, "base_in_pairs_ms": 1e3 * pair.base.median_s}
            if args.folded:
                fold = time_network_pair(folded_base, folded[s, j], table, args.batch, **kw)
                line["folded_c"], line["folded_noise"] = fold.ratio, fold.noise
            if predicted is not None:
                line["predicted_c"] = predicted[s, j]
            taken.setdefault((s, j), {})[p] = line
            print(json.dumps(line), flush=True)
    if args.passes < 2:
        return
    for space in dict.fromkeys([s for s, _, _ in rows] + ["all"]):
        keys = [k for k in taken if space in ("all", k[0])]
        for method in methods:
            first = np.array([taken[k][0][f"{method}_c"] for k in keys])
            second = np.array([taken[k][1][f"{method}_c"] for k in keys])
            summary = {"bench": "paired_latency_summary", "space": space, "method": method, "rows": len(keys),
                       "baseline": "apart: each network timed alone, the base once per pass",
                       "mean_abs_diff": float(np.mean(np.abs(first - second))),
                       "correlation": float(np.corrcoef(first, second)[0, 1]) if len(keys) > 2 else None}
            if predicted is not None:
                pred = np.array([predicted[k] for k in keys])
                summary["r2_pass_1"], summary["r2_pass_2"] = r_squared(pred, first), r_squared(pred, second)
                summary["mean_residual"] = float(np.mean((first + second) / 2 - pred))
            print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
