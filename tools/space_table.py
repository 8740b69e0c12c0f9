"""What tools/bench_kernels.py and tools/window_bound.py share (a module of the tools, not a script): the arguments
that name a network and one space, and the layer table and space they name (``nps sample``'s table: a latency
model's forms where --latency-model is given)."""
from __future__ import annotations

import argparse

from nps.kernels.spaces import parse_space
from nps.pipeline.network.layer_table import build_layer_table


def add_space_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--resolution", type=int, default=28)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--in-channels", type=int, default=1)
    ap.add_argument("--mode", default="all")
    ap.add_argument("--latency-model", default=None, help="a model file (nps latency-model): c_latency targets")
    ap.add_argument("--space", default="std-0.05")
    ap.add_argument("--target", default="c_latency")
    ap.add_argument("--value", type=float, required=True)


def table_and_space(args: argparse.Namespace):
    """(the layer table, the space) that ``add_space_arguments``' arguments name."""
    model = None
    if args.latency_model:
        from nps.pipeline.network.latency_model import LatencyModel

        model = LatencyModel.load(args.latency_model)
    table = build_layer_table(args.model, args.mode, args.resolution, args.classes, args.in_channels,
                              latency_model=model)
    return table, parse_space(args.space, args.target, args.value)
