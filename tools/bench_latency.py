"""Measured latency of the demo's base network and of subnetworks at c_flops 0.1, with speed-ups over the base.

One JSON line per measurement (network × batch): median, interquartile range and quartiles of the time per forward
(ms), the runs and forwards per run, and the speed-up over the base network (its median divided by the row's), the
base measured first in the same process: the baseline every speed-up names. Every network runs as `nps latency`
runs it (nps.pipeline.results.latency.time_network): eval mode, channels_last, the run's autocast, random input.

Without --results the networks are the demo's ResNet-20 (Fashion-MNIST: 28 px, 1 channel, 10 classes) and
--subnetworks recipes of STD-0.05 at c_flops 0.1 (seed 0), architecture only; with --results, the base network of
that file and its first finished rows at c_flops 0.1 (round-robin over the spaces).

usage: python tools/bench_latency.py [--results runs/demo/results.h5] [--batch 1,64] [--threads 1] [--amp off]
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def networks(args):
    """(table, [(name, c_flops, keep)]) for the base network (keep None) and the subnetworks."""
    from nps.kernels.spaces import parse_space
    from nps.pipeline.experiment.sampling import sample_rows
    from nps.pipeline.network.layer_table import LayerTable, build_layer_table

    if args.results is None:
        table = build_layer_table("resnet20", "all", 28, 10, 1)
        rows, _, _ = sample_rows(table, parse_space("std-0.05", "c_flops", 0.1), args.subnetworks, args.seed)
        subs = [(f"std-0.05@c_flops=0.1 sample {i}", float(rows["c_flops"][i]), rows["keep"][i])
                for i in range(args.subnetworks)]
        return table, subs
    from nps.kernels.spaces import parse_space_key
    from nps.pipeline.results.reader import DONE, open_readonly

    with open_readonly(args.results) as reader:
        table = LayerTable.from_hdf5(reader.layers)
        per_space = []
        for space in reader.spaces():
            key = parse_space_key(space)
            if key is None or key.regime != "c_flops=0.1":
                continue
            cols = reader.read(space, ["status", "keep", "c_flops"])
            per_space.append([(f"{space} row {r}", float(cols["c_flops"][r]), cols["keep"][r])
                              for r in np.flatnonzero(cols["status"] == DONE)])
    subs = []
    while len(subs) < args.subnetworks and any(per_space):
        for rows in per_space:
            if rows and len(subs) < args.subnetworks:
                subs.append(rows.pop(0))
    return table, subs


def run_amp(results) -> str:
    """``[retrain] amp`` of the run that wrote ``results`` (``auto`` without a file: the demo preset's)."""
    if results is None:
        return "auto"
    from nps.pipeline.results.reader import open_readonly
    from nps.pipeline.deploy.run_config import config_section, parse_config

    with open_readonly(results) as reader:
        cfg = parse_config(str(reader.attrs.get("config", "")), results)
    return str(config_section(cfg, "retrain").get("amp", "auto"))


def main() -> None:
    from nps.pipeline.network.models import build_model
    from nps.pipeline.network.prune import prune_model
    from nps.pipeline.results.latency import parse_batches
    from nps.pipeline.deploy.latency import device_name, time_network
    from nps.pipeline.training.devices import resolve_amp

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", help="a results file (default: the demo's network, sampled recipes)")
    ap.add_argument("--subnetworks", type=int, default=5)
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as nps latency; 0: torch's)")
    ap.add_argument("--amp", default=None,
                    help="autocast as [retrain] amp: auto, off, bf16 (default: the file's [retrain] amp, else auto)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    table, subs = networks(args)
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = build_model(table.model, num_classes=int(table.num_classes), in_channels=int(table.in_channels))
    amp = resolve_amp(args.amp or run_amp(args.results), device, [base])
    common = {"bench": "latency", "model": table.model, "resolution": int(table.resolution), "device": device.type,
              "device_name": device_name(device), "threads": torch.get_num_threads(), "channels_last": True,
              "amp": "off" if amp is None else str(amp).removeprefix("torch."), "torch": torch.__version__,
              "baseline": "the base network, measured first in the same process"}
    base_median = {}
    for name, c_flops, keep in [("base", 1.0, None)] + subs:
        model = base if keep is None else prune_model(base, table, keep)
        for batch in parse_batches(args.batch):
            t = time_network(model, table, batch, device=device, channels_last=True, amp_dtype=amp,
                             warmup=args.warmup, runs=args.runs)
            if keep is None:
                base_median[batch] = t.median_s
            print(json.dumps({**common, "network": name, "c_flops": round(c_flops, 4), "batch": batch,
                              "median_ms": round(1e3 * t.median_s, 4), "iqr_ms": round(1e3 * t.iqr_s, 4),
                              "q25_ms": round(1e3 * t.q25_s, 4), "q75_ms": round(1e3 * t.q75_s, 4),
                              "runs": t.runs, "forwards_per_run": t.inner,
                              "speedup_vs_base": round(base_median[batch] / t.median_s, 3)}), flush=True)


if __name__ == "__main__":
    main()
