"""What distillation costs: seconds per row with and without ``[retrain] distill``, at K = 1 and K = 8 (CPU).

The same K pruned subnetworks (``--space`` at ``--c-flops`` of ResNet-20 for Fashion-MNIST-sized input: 1 × 28 × 28,
10 classes) train ``--steps`` batches of ``--batch-size`` by the engine exactly as ``nps run`` trains a cohort on the
CPU (:func:`nps.pipeline.training.cohort.train_cohort`: members in CpuWorkers threads, one intra-op thread each,
autocast and memory format "auto"), once without distillation (the baseline) and once distilling from the unpruned
network (one teacher forward per batch for the whole cohort). The batches are random tensors made before timing, so
what is timed is training, not data loading (a real run's data cost is the same with or without distillation).

Threads are set, not inherited: ``torch.set_num_threads(--threads)`` (default 2, this project's machines), so the
engine steps min(K, threads) members at once; the teacher runs in the cohort's thread on one intra-op thread (what
keeps a row's numbers independent of the cohort size), while the member threads wait for its soft targets.

seconds per row = the cohort's training wall time (``Result.train_s``: the epoch loop, without set-up and final
evaluation) / K. The arms alternate ``--repeats`` times after one untimed warm-up each, so that load from other
processes hits both alike; each line gives the median, the minimum (the least disturbed repeat: on a shared machine
the better estimate of the cost itself) and every repeat. One JSON line per K and arm::

    {"bench": "distill", "k": 8, "distill": true, "s_per_row": <median>, "s_per_row_min": ...,
     "vs_baseline": <median / the baseline's median>, "vs_baseline_min": <min / min>, "baseline": "...", ...}

and one line with the teacher's forward alone (``"arm": "teacher"``, ms per batch, one intra-op thread).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import numpy as np
import torch

from nps.kernels.samplers import sample_space
from nps.kernels.spaces import parse_space
from nps.pipeline.network.layer_table import build_layer_table
from nps.pipeline.network.models import build_model
from nps.pipeline.network.prune import prune_model
from nps.pipeline.training.cohort import CohortOptions, train_cohort
from nps.pipeline.training.devices import resolve_amp, resolve_channels_last
from nps.pipeline.training.distill import Teacher
from nps.pipeline.training.spec import RetrainSpec

BASELINE = "the same K subnetworks, steps and threads without distillation (distill = false), arms alternated"


def subnetworks(args):
    """(base network, K members, their mean c_flops)."""
    table = build_layer_table(args.model, "all", args.resolution, 10, 1)
    torch.manual_seed(args.seed)
    base = build_model(args.model, num_classes=10, in_channels=1)
    sample = sample_space(table, parse_space(args.space, "c_flops", args.c_flops), max(args.k), seed=args.seed)
    members = [prune_model(base, table, keep) for keep in sample.keep]
    return base, members, float(np.mean(sample.c_flops))


def batches(args, n: int):
    g = torch.Generator().manual_seed(args.seed)
    return [(torch.randn(args.batch_size, 1, args.resolution, args.resolution, generator=g),
             torch.randint(0, 10, (args.batch_size,), generator=g)) for _ in range(n)]


def seconds_per_row(members, base, data, distill: bool, args) -> float:
    spec = RetrainSpec(epochs=1, lr=0.01, distill=distill, distill_alpha=0.5, distill_temperature=4.0)
    options = CohortOptions(amp=args.amp, member_threads=1, cpu_workers="auto")
    results = train_cohort([copy.deepcopy(m) for m in members], data, data[:1], spec, "cpu", options=options,
                           teacher=Teacher(base) if distill else None)
    assert all(r.ok for r in results), [r.error for r in results]
    return results[0].train_s / len(members)


def teacher_ms(base, data, args) -> float:
    """The teacher's forward alone, per batch, as the cohort runs it (one intra-op thread, same autocast)."""
    device = torch.device("cpu")
    amp = resolve_amp(args.amp, device, [base])
    nhwc = resolve_channels_last("auto", device)
    spec = RetrainSpec(distill=True)
    distillation = Teacher(base).for_cohort(spec, device, nhwc, amp)
    xs = [x.contiguous(memory_format=torch.channels_last) if nhwc else x for x, _ in data]
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        distillation.targets(xs[0])
        t0 = time.perf_counter()
        for x in xs:
            distillation.targets(x)
        return 1000 * (time.perf_counter() - t0) / len(xs)
    finally:
        torch.set_num_threads(saved)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--resolution", type=int, default=28)
    p.add_argument("--space", default="std-0.05")
    p.add_argument("--c-flops", type=float, default=0.25)
    p.add_argument("--k", default="1,8", help="comma-separated cohort sizes")
    p.add_argument("--steps", type=int, default=20, help="timed batches per arm")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads of the process (set, not read)")
    p.add_argument("--amp", default="auto", help="auto | bf16 | off")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.k = [int(k) for k in args.k.split(",")]
    torch.set_num_threads(args.threads)
    base, members, c_flops = subnetworks(args)
    data, warm = batches(args, args.steps), batches(args, 2)
    amp = resolve_amp(args.amp, torch.device("cpu"), members)
    common = {"bench": "distill", "device": "cpu", "model": args.model, "input": f"1x{args.resolution}x"
              f"{args.resolution}", "space": args.space, "c_flops": round(c_flops, 4), "batch_size": args.batch_size,
              "steps": args.steps, "threads": args.threads, "member_threads": 1, "amp": str(amp).replace("torch.", ""),
              "cores": len(os.sched_getaffinity(0)), "load_avg_1m": round(os.getloadavg()[0], 2)}
    print(json.dumps({**common, "arm": "teacher", "teacher_ms_per_batch": round(teacher_ms(base, data, args), 2)}),
          flush=True)
    for k in args.k:
        cohort = members[:k]
        for distill in (False, True):  # untimed warm-up of both arms (oneDNN primitives, thread pools)
            seconds_per_row(cohort, base, warm, distill, args)
        runs: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for distill in (False, True):
                runs[distill].append(seconds_per_row(cohort, base, data, distill, args))
        plain, plain_min = statistics.median(runs[False]), min(runs[False])
        for distill in (False, True):
            s, s_min = statistics.median(runs[distill]), min(runs[distill])
            line = {**common, "k": k, "distill": distill, "s_per_row": round(s, 4), "s_per_row_min": round(s_min, 4),
                    "s_per_row_runs": [round(v, 4) for v in runs[distill]], "baseline": BASELINE,
                    "load_avg_1m": round(os.getloadavg()[0], 2)}
            if distill:
                line["vs_baseline"], line["vs_baseline_min"] = round(s / plain, 3), round(s_min / plain_min, 3)
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
