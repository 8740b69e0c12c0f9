"""Training speed on the CPU with bf16 autocast against plain fp32, per architecture: what ``amp = "auto"`` picks.

One JSON line per architecture: {"bench": "amp", "model", "fp32_img_per_s", "bf16_img_per_s", "ratio", "auto"}.
Baseline: the same training step in fp32 (no autocast), same model, batch, threads and run. A step is forward,
cross-entropy, backward and SGD on a batch of --batch random 1×--resolution² images, channels_last (what the engine
trains in), best of --repeats timings of --steps steps after two warm-up steps. ``auto`` is what
``nps.pipeline.training.devices.resolve_amp("auto", cpu, [model])`` resolves to on this machine.

usage: python tools/bench_amp.py [--models resnet20,mobilenet_v2] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from nps.pipeline.network.models import build_model
from nps.pipeline.training.devices import cpu_has_native_bf16, resolve_amp

MODELS = ("resnet20", "resnet18", "resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
          "mnasnet0_5", "regnet_x_400mf", "convnext_tiny", "densenet121")


def rate(model, dtype, args) -> float:
    x = torch.randn(args.batch, 1, args.resolution, args.resolution).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,))
    model = model.train().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    step()
    step()
    best = 0.0
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        best = max(best, args.steps * args.batch / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        torch.manual_seed(0)
        fp32 = rate(build_model(name, 10, 1), None, args)
        torch.manual_seed(0)
        bf16 = rate(build_model(name, 10, 1), torch.bfloat16, args)
        auto = resolve_amp("auto", torch.device("cpu"), [build_model(name, 10, 1, device="meta")])
        print(json.dumps({"bench": "amp", "model": name, "resolution": args.resolution, "batch": args.batch,
                          "threads": args.threads, "native_bf16": cpu_has_native_bf16(),
                          "baseline": "fp32 (no autocast), same step, same run",
                          "fp32_img_per_s": round(fp32), "bf16_img_per_s": round(bf16),
                          "ratio": round(bf16 / fp32, 2), "auto": "bf16" if auto is torch.bfloat16 else "fp32"}),
              flush=True)


if __name__ == "__main__":
    main()
