"""What only a GPU can show, in one call: run this first in any session that has one (under 8 minutes).

For ResNet-20 and ResNet-56 (32 px), MobileNetV2 (32 px) and ResNet-50 (224 px), subnetworks at c_flops 0.25
(STD-0.05), cohorts of K = 1, 4, 16, 32, bf16 autocast, channels_last, synthetic data already on the device:

- ``unfused``: today's cohort (``nps.pipeline.training.cohort.Cohort``: one CUDA stream per member);
- ``fused``: ``FusedCohort`` stepping eagerly;
- ``fused_graphs``: ``FusedCohort`` with its training step captured as a CUDA graph and replayed.

One JSON line per (model, K, arm): training images/s (images × members), milliseconds per step, the host's CPU
milliseconds per step (the Python thread's share: what the host-bound model predicts), whether the graph was
captured. First a check that the fused forward equals the members' on this GPU (fp32), and a line naming the
device. Compare with the predictions in docs/gpu-throughput.md.

    python tools/gpu_acceptance.py [--budget-s 420] [--models resnet20,resnet56,mobilenet_v2,resnet50]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def members_of(name: str, resolution: int, k: int, device):
    from nps.kernels.samplers import sample_space
    from nps.kernels.spaces import parse_space
    from nps.pipeline.network.layer_table import build_layer_table
    from nps.pipeline.network.models import build_model
    from nps.pipeline.network.prune import prune_model
    from nps.pipeline.training.fused_cohort import Fusion

    table = build_layer_table(name, "all", resolution, 10, 3)
    keeps = sample_space(table, parse_space("std-0.05", "c_flops", 0.25), k, seed=0).keep
    torch.manual_seed(0)
    base = build_model(name, num_classes=10, in_channels=3)
    members = [prune_model(base, table, kp).to(device) for kp in keeps]
    return members, Fusion(base, table, keeps)


class Batches:
    """``steps`` synthetic batches already on the device (no loader in the measurement)."""

    def __init__(self, steps, batch, resolution, device):
        g = torch.Generator(device=device).manual_seed(0)
        self.x = torch.randn(batch, 3, resolution, resolution, device=device, generator=g)
        self.y = torch.randint(0, 10, (batch,), device=device, generator=g)
        self.steps = steps

    def __len__(self):
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.x, self.y


def check_forward(device) -> None:
    from nps.pipeline.training.fuse import fuse

    members, fusion = members_of("resnet20", 32, 4, device)
    net = fuse(fusion.base, fusion.table, fusion.keeps, members).eval()
    x = torch.randn(8, 3, 32, 32, device=device)
    with torch.no_grad():
        out = net(x)
        ref = torch.stack([m.eval()(x) for m in members], 1)
    emit(check="fused forward equals the members' (fp32, eval)",
         relative_error=float(((out - ref).abs().max() / ref.abs().max()).item()))


def measure(arm: str, name: str, resolution: int, k: int, batch: int, steps: int, device) -> dict:
    from nps.pipeline.training.cohort import Cohort, CohortOptions
    from nps.pipeline.training.events import EpochEnded
    from nps.pipeline.training.fused_cohort import FusedCohort
    from nps.pipeline.training.spec import RetrainSpec

    members, fusion = members_of(name, resolution, k, device)
    spec = RetrainSpec(epochs=1, lr=0.01)
    options = CohortOptions(amp="bf16", channels_last=True, cuda_graphs=arm == "fused_graphs", check_every=25)
    data = Batches(steps, batch, resolution, device)
    seconds = []

    def on_event(e):
        if isinstance(e, EpochEnded):
            seconds.append(e.seconds)

    t_cpu = time.process_time()
    if arm == "unfused":
        cohort = Cohort(members, data, data, spec, device, options=options, on_event=on_event)
    else:
        cohort = FusedCohort(members, data, data, spec, device, fusion=fusion, options=options, on_event=on_event)
    cohort.run()
    cpu_s = time.process_time() - t_cpu
    s = seconds[0]
    return {"model": name, "resolution": resolution, "k": k, "arm": arm, "batch": batch, "steps": steps,
            "img_per_s": round(batch * k * steps / s, 1), "ms_per_step": round(1000 * s / steps, 3),
            "host_cpu_ms_per_step": round(1000 * cpu_s / steps, 3),
            "graph_captured": bool(getattr(cohort, "_graph", None)) if arm == "fused_graphs" else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting new measurements after this")
    ap.add_argument("--models", default="resnet20,resnet56,mobilenet_v2,resnet50")
    ap.add_argument("--k", default="1,4,16,32")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        emit(error="no CUDA device: this script measures what only a GPU can show")
        return 1
    device = torch.device("cuda:0")
    torch.backends.cudnn.benchmark = True
    emit(device=torch.cuda.get_device_name(device), torch=torch.__version__, cuda=torch.version.cuda,
         cpu_cores=len(os.sched_getaffinity(0)))
    check_forward(device)
    started = time.monotonic()
    plans = {"resnet20": (32, 128, 60), "resnet56": (32, 128, 40), "mobilenet_v2": (32, 128, 40),
             "resnet50": (224, 32, 15)}
    for name in args.models.split(","):
        resolution, batch, steps = plans[name]
        for k in [int(v) for v in args.k.split(",")]:
            for arm in ("unfused", "fused", "fused_graphs"):
                if time.monotonic() - started > args.budget_s:
                    emit(stopped="budget reached", after_s=round(time.monotonic() - started, 1))
                    return 0
                try:
                    emit(**measure(arm, name, resolution, k, batch, steps, device))
                except torch.cuda.OutOfMemoryError:
                    emit(model=name, k=k, arm=arm, error="out of memory")
                    torch.cuda.empty_cache()
                except Exception as exc:  # noqa: BLE001 - one failing arm must not hide the others
                    emit(model=name, k=k, arm=arm, error=f"{type(exc).__name__}: {exc}"[:300])
    emit(done=True, seconds=round(time.monotonic() - started, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
