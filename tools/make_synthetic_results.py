"""Write a synthetic results file at population scale: real sampled recipes, synthetic accuracies.

For scale tests of `nps report`, `nps status` and the live view: --rows finished rows spread over --spaces spaces in
each of the regimes (c_flops and c_params targets), the top-1 of each row a smooth function of its c_flops and mCB
plus noise (so the figures show the shapes the paper's do). The base network is --model at --resolution.

usage: python tools/make_synthetic_results.py OUT.h5 [--rows 5000] [--model resnet56]
"""
from __future__ import annotations

import argparse

import numpy as np

from nps.kernels.spaces import parse_space
from nps.pipeline.experiment.sampling import sample_rows
from nps.pipeline.network.layer_table import build_layer_table
from nps.pipeline.results.store import ResultsStore
from nps.pipeline.row_status import Result

C_FLOPS = (0.5, 0.35, 0.25, 0.15, 0.1, 0.05)
C_PARAMS = (0.5, 0.35, 0.25, 0.15, 0.1, 0.05)
SPACES = ("std-0.01", "std-0.05", "std-0.1", "mcb-0.9-1.1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    table = build_layer_table(args.model, "all", args.resolution, 10)
    regimes = [("c_flops", v) for v in C_FLOPS] + [("c_params", v) for v in C_PARAMS]
    groups = [(s, t, v) for t, v in regimes for s in SPACES]
    per = [args.rows // len(groups) + (i < args.rows % len(groups)) for i in range(len(groups))]
    rng = np.random.default_rng(args.seed)
    base = 93.0
    config = f'[experiment]\nname = "synthetic"\n[model]\nname = "{args.model}"\nresolution = {args.resolution}\n'
    store = ResultsStore.create(args.out, table, config, {"base_top1": base, "base_top5": 99.8,
                                                          "base_flops": table.base_flops,
                                                          "base_params": table.base_params}, overwrite=True)
    try:
        for (name, target, value), n in zip(groups, per):
            space = parse_space(name, target, value)
            rows, attrs, _ = sample_rows(table, space, n, args.seed)
            store.add_space(space.regime, rows, epochs=args.epochs, attrs=attrs)
            c = rows["c_flops"].astype(float)
            drop = 6.0 * (0.25 / np.maximum(c, 0.02)) ** 0.7 * (1 + 2.0 * np.abs(np.log(rows["mcb"]))) \
                + rng.gamma(2.0, 0.4, n)
            results = []
            for row in range(n):
                top1 = base - float(drop[row])
                results.append(Result.done(row, top1=top1, top5=99.0, loss=0.3, bn_top1=top1 - 30,
                                           curve=list(np.linspace(top1 - 5, top1, args.epochs)),
                                           train_s=float(rng.uniform(10, 20))))
            store.record(space.regime, range(n), results)
    finally:
        store.close()
    print(f"wrote {args.out}: {sum(per)} finished rows in {len(regimes)} regimes × {len(SPACES)} spaces")


if __name__ == "__main__":
    main()
