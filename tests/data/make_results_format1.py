"""How tests/data/results-format1.h5 was made: a results file of format 1, the layout before ``format_version``.

It was written by the nps of commit f03adfa (the last one before results files named their format), run from a
clean ``git archive`` of that commit, so the file is exactly what that nps wrote; tests/test_format_version.py
checks that today's nps still resumes, reports, tabulates and exports such a file. Run with today's nps this script
writes a file of today's format instead, so it documents the file rather than remakes it.

What the file holds is what a run writes, without the training: the run's own functions validate a small CPU
experiment (ResNet-20 on Fashion-MNIST's first 256 images, a base network, one reference network, a filter space,
its uniform baseline and a weight space), create results.h5 and sample its spaces; the results the driver would
record come from fixed numbers (three rows done, one failed, one pending in the filter space); then
``nps latency`` times the base network and the finished filter rows (one short session, batch 1), so /latency is
there too. Steps, from an empty directory (the dataset's path is stored in the config, relative)::

    nps convert fashion-mnist --src /usr/share/datasets/fashion-mnist --out data/fashion-mnist --limit 256
    python make_results_format1.py
    nps latency runs/format1/results.h5 --batch 1 --runs 3 --warmup 1
    cp runs/format1/results.h5 tests/data/results-format1.h5
"""
from __future__ import annotations

import numpy as np

from nps.pipeline.experiment.config import parse_config
from nps.pipeline.experiment.plan import validate
from nps.pipeline.network.layer_table import build_layer_table
from nps.pipeline.run import open_results, sample_missing_spaces

EXPERIMENT = """
[experiment]
name = "format1"
seed = 0
out = "runs/format1"
devices = "cpu"
baseline = true

[dataset]
dir = "data/fashion-mnist"
train_images = 256
val_images = 256
val_batch_size = 128
augment = false

[model]
name = "resnet20"

[base]
epochs = 1
batch_size = 32

[[references]]
model = "resnet32"

[[spaces]]
name = "std-0.05"
c_flops = 0.25
n = 5

[[spaces]]
name = "weights:uniform"
c_flops = 0.25
n = 1

[retrain]
epochs = 2
batch_size = 32
cohort_size = 4
bn_images = 64

[output]
keep_weights = "all"
"""

BASE_TOP1 = 84.5


def record_done(store, space: str, rows: list[int], top1: list[float]) -> None:
    """What the driver records for finished rows (scores, two-epoch curves, seconds)."""
    store.record(space, rows, done=[True] * len(rows), top1=top1, top5=[99.0 + 0.1 * i for i in range(len(rows))],
                 loss=[0.5 + 0.01 * i for i in range(len(rows))], bn_top1=[t - 40.0 for t in top1],
                 train_s=[12.0 + i for i in range(len(rows))], curves=[[t - 3.0, t] for t in top1],
                 errors=[""] * len(rows))


def reference_metrics(store, plan, model: str, top1: float) -> None:
    """What the driver records for a trained reference network (complexity counted as the run counts it)."""
    ref = build_layer_table(model, "all", plan.resolution, plan.num_classes, plan.in_channels,
                            flops=plan.config.model.flops)
    base_flops, base_params = plan.table.base_flops, plan.table.base_params
    store.set_reference(model, model=model, top1=top1, top5=99.7, loss=0.38, flops=ref.base_flops,
                        params=ref.base_params, c_flops=ref.base_flops / base_flops,
                        c_params=ref.base_params / base_params, train_s=52.0, acc_drop=BASE_TOP1 - top1)


def main() -> None:
    plan = validate(parse_config(EXPERIMENT, "make_results_format1.py"))
    store, _ = open_results(plan)
    try:
        sample_missing_spaces(store, plan)
        store.set_attrs(base_top1=BASE_TOP1, base_top5=99.6, base_loss=0.42, base_trained=True,
                        base_checkpoint=plan.base_path)
        store.set_attrs(base_train_s=31.0)
        spaces = store.spaces()
        filters = next(s for s in spaces if s.startswith("std-0.05@"))
        baseline = next(s for s in spaces if s.startswith("baseline@"))
        weights = next(s for s in spaces if s.startswith("weights:uniform@"))
        record_done(store, filters, [0, 1, 2], [80.25, 78.5, 81.0])
        store.record(filters, [3], done=[False], top1=[np.nan], top5=[np.nan], loss=[np.nan], bn_top1=[41.0],
                     train_s=[3.0], curves=[None], errors=["RuntimeError: loss is NaN at epoch 1"])
        record_done(store, baseline, [0], [79.75])
        record_done(store, weights, [0], [83.0])
        reference_metrics(store, plan, "resnet32", top1=86.0)
    finally:
        store.close()


if __name__ == "__main__":
    main()
