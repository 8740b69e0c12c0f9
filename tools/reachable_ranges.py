"""Reachable c_flops and c_params per model and mode: one JSON line each.

The smallest value is reached with every group at the largest ratio R (the forms are monotone in every kept-channel
count); the largest is 1 (nothing pruned). Requests outside [min, 1] fail fast in the samplers with this range.

usage: python tools/reachable_ranges.py [--R 0.95] [--models resnet50,mobilenet_v2] [--flops paper]
"""
from __future__ import annotations

import argparse
import json

from nps.kernels.spaces import reachable_range
from nps.pipeline.network.layer_table import build_layer_table
from nps.pipeline.network.models import CIFAR_MODELS, MODELS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--R", type=float, default=0.95)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated model names (default: every tested "
                    "architecture)")
    ap.add_argument("--resolution", type=int, default=224, help="input size of the ImageNet models (CIFAR: 32)")
    ap.add_argument("--flops", default="macs", choices=["macs", "paper"])
    ap.add_argument("--channel-multiple", type=int, default=1)
    args = ap.parse_args()
    for model in args.models.split(","):
        resolution = 32 if model in CIFAR_MODELS else args.resolution
        for mode in ("internal", "all"):
            table = build_layer_table(model, mode, resolution, args.classes, flops=args.flops,
                                      channel_multiple=args.channel_multiple)
            line = {"bench": "reachable", "model": model, "mode": mode, "resolution": resolution, "R": args.R,
                    "groups": len(table.channels), "flops": args.flops, "channel_multiple": args.channel_multiple}
            for target in ("c_flops", "c_params"):
                low, high = reachable_range(table, target, args.R)
                line[f"{target}_min"], line[f"{target}_max"] = round(low, 4), high
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
