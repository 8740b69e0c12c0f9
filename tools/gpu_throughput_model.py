"""A PREDICTION of training images/s per GPU for cohorts of K pruned subnetworks, unfused and fused, from host costs
measured on a CPU (``tools/bench_cohort.py --host`` → docs/gpu-throughput/host.jsonl) and each subnetwork's counted
FLOPs and bytes. Not a measurement: ``tools/gpu_acceptance.py`` measures the same three designs on a real GPU.

Subnetworks: the ones ``tools/gpu_acceptance.py`` (and ``bench_cohort.py --host``) trains: ``sample_space`` of
STD-0.05 at c_flops 0.25, seed 0, layer table ``all`` at 10 classes, the first K rows (no cohort forming). Batch and
resolution as in gpu_acceptance: 128 images at 32 px for resnet20/resnet56/mobilenet_v2, 32 at 224 px for resnet50.

Designs (``design`` → gpu_acceptance's ``arm``):

- ``eager_streams`` (``unfused``): K members, one CUDA stream each, issued by one Python thread.
  host = aten ops of the cohort arm (host.jsonl, all K members) × µs/op;
  GPU = Σ members' training FLOPs, bytes and kernels (below), overlapped with the host.
- ``fused`` (``fused``): one module of grouped convs, every group padded to the cohort's widest member.
  host = aten ops of the fused arm × µs/op; GPU = K × the padded member's FLOPs, bytes and kernels.
- ``fused_graphs`` (``fused_graphs``): the fused step captured as a CUDA graph, one replay per step.
  host = replay (``--replay-us``: graph launch, scheduler step, loop) + the per-step batch copies and fills
  (``STEP_OPS`` ops × µs/op); GPU as ``fused``.

GPU time is a roofline with a kernel floor: max(FLOPs / (peak × efficiency), bytes / (HBM × bw_fraction),
kernels × kernel_us). Step time = max(host, GPU): host work and GPU work overlap perfectly (asynchronous launches;
nothing forces a sync inside a step). img/s = batch × K / step (images × members, as gpu_acceptance counts).

- FLOPs per member step: 3 (forward + backward) × forward MACs (the layer table's ``flops_of``) × 2 × batch.
- Bytes per member step: every aten op's inputs and outputs of one training step (forward, backward, SGD), counted
  with a TorchDispatchMode on the meta device with the model and data in bf16: each op a DRAM round trip, no L2
  reuse, no fusion (pessimistic), no fp32 master copies or autocast casts (optimistic). ``saved_activations_gb``:
  the bytes of the tensors autograd saves for the backward (bf16; eager: all K members, as they are all in flight).
- Kernels: aten ops per step (host.jsonl) stand in for kernel launches (views launch none: pessimistic). Eager
  members run on K streams, so their floor is one member's ops × kernel_us.

One JSON line per (model, design, K) at the defaults, with ``sensitivity``: img/s when one parameter changes
(µs/op 20 or the value measured on this CPU, efficiency 5 % / 20 %, no memory term and no kernel floor = the
plain FLOPs model, and for the fused designs the padding waste of cohorts formed by the driver's greedy forming).
First one line per model with the op cost measured on this CPU (host_ms_per_step / aten_ops_per_step).

usage: python tools/gpu_throughput_model.py [--host docs/gpu-throughput/host.jsonl] > predictions.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from nps.kernels.samplers import sample_space
from nps.kernels.spaces import parse_space
from nps.pipeline.network.layer_table import build_layer_table
from nps.pipeline.network.models import build_model
from nps.pipeline.network.prune import prune_model
from nps.pipeline.run import forming

ROOT = Path(__file__).resolve().parents[1]
PLANS = {"resnet20": (32, 128), "resnet56": (32, 128), "mobilenet_v2": (32, 128), "resnet50": (224, 32)}  # px, batch
DESIGNS = {"eager_streams": "unfused", "fused": "fused", "fused_graphs": "fused_graphs"}
HOST_ARM = {"eager_streams": "cohort", "fused": "fused", "fused_graphs": "fused"}
STEP_OPS = 7  # per replayed step: x.to, y.to, channels_last copy, 2 copy_ into the static buffers, 2 fill_
FORMING_POOL = 512  # rows sampled to form cohorts for the "waste=formed" sensitivity


class _Bytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten((args, kwargs, out))[0]:
            if isinstance(t, torch.Tensor):
                self.bytes += t.numel() * t.element_size()
        return out


def step_bytes(base, table, keep, batch: int, resolution: int) -> tuple[int, int]:
    """Bytes the aten ops of one bf16 training step (forward, backward, SGD with momentum) read and write, and the
    bytes of the tensors autograd saves for the backward (the activation memory a step holds at its peak)."""
    model = prune_model(base, table, keep).to(device="meta", dtype=torch.bfloat16).train()
    x = torch.empty(batch, 3, resolution, resolution, device="meta", dtype=torch.bfloat16)
    y = torch.zeros(batch, dtype=torch.int64, device="meta")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=True)
    with _Bytes():  # a first step, not counted: it creates the momentum buffers
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    saved = {}

    def pack(t):
        saved[id(t)] = t.numel() * t.element_size()
        return t

    with _Bytes() as counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # apart: the hooks change what is dispatched
        torch.nn.functional.cross_entropy(model(x), y)
    return counter.bytes, sum(saved.values())


def formed_waste(table, k: int) -> float:
    """Pooled padding waste of cohorts of k formed by the driver's greedy forming (``forming.form_cohorts``, no
    threshold) from FORMING_POOL rows of the same space."""
    if k == 1:
        return 0.0
    keeps = sample_space(table, parse_space("std-0.05", "c_flops", 0.25), FORMING_POOL, seed=0).keep
    return forming.pooled_waste(table, keeps, forming.form_cohorts(table, keeps, k, np.inf))


def host_figures(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            d = json.loads(line)
            out[(d["model"], d["arm"], d["k"])] = d
    return out


def predict(p: dict, a) -> dict:
    """Step time and img/s of one design from its host ops, FLOPs, bytes and kernels (see the module docstring)."""
    host_ms = p["host_ops"] * a.us_per_op / 1000 + p.get("host_fixed_us", 0.0) / 1000
    flops_ms = p["flops"] / (a.peak_tflops * 1e12 * a.efficiency) * 1000
    bytes_ms = p["bytes"] / (a.hbm_tbs * 1e12 * a.bw_fraction) * 1000 if a.memory else 0.0
    kernel_ms = p["kernels"] * a.kernel_us / 1000 if a.memory else 0.0
    gpu_ms = max(flops_ms, bytes_ms, kernel_ms)
    step_ms = max(host_ms, gpu_ms)
    bound = "host" if host_ms >= gpu_ms else {flops_ms: "compute", bytes_ms: "memory", kernel_ms: "kernels"}[gpu_ms]
    return {"host_ms": round(host_ms, 3), "gpu_ms_flops": round(flops_ms, 3), "gpu_ms_bytes": round(bytes_ms, 3),
            "gpu_ms_kernels": round(kernel_ms, 3), "step_ms": round(step_ms, 3), "bound": bound,
            "img_per_s": round(p["batch"] * p["k"] / step_ms * 1000, 0),
            "loader_img_per_s": round(p["batch"] / step_ms * 1000, 0)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default=str(ROOT / "docs/gpu-throughput/host.jsonl"), help="bench_cohort --host lines")
    ap.add_argument("--models", default=",".join(PLANS))
    ap.add_argument("--k", default="1,4,16,32")
    ap.add_argument("--us-per-op", type=float, default=10.0,
                    help="host µs per eager aten op on a GPU server: dispatcher + autograd + CUDA launch")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    ap.add_argument("--efficiency", type=float, default=0.10,
                    help="achieved fraction of the peak for these small (grouped) convs")
    ap.add_argument("--hbm-tbs", type=float, default=3.35, help="HBM bandwidth, TB/s (H100 SXM: 3.35; H200: 4.8)")
    ap.add_argument("--bw-fraction", type=float, default=0.7, help="achieved fraction of the HBM bandwidth")
    ap.add_argument("--kernel-us", type=float, default=2.0, help="shortest GPU time of one kernel, µs")
    ap.add_argument("--replay-us", type=float, default=20.0,
                    help="host µs per graph replay: cudaGraphLaunch, the LR scheduler's step, the Python loop")
    ap.add_argument("--no-bytes", action="store_true", help="skip the byte count (then no memory term)")
    args = ap.parse_args(argv)
    args.memory = not args.no_bytes
    torch.set_num_threads(1)
    host = host_figures(Path(args.host))
    ks = [int(v) for v in args.k.split(",")]
    defaults = {"us_per_op": args.us_per_op, "peak_tflops": args.peak_tflops, "efficiency": args.efficiency,
                "hbm_tbs": args.hbm_tbs, "bw_fraction": args.bw_fraction, "kernel_us": args.kernel_us,
                "replay_us": args.replay_us, "step_time": "max(host, gpu)", "torch_here": torch.__version__}

    for model in args.models.split(","):
        resolution, batch = PLANS[model]
        table = build_layer_table(model, "all", resolution, 10, 3)
        space = parse_space("std-0.05", "c_flops", 0.25)
        keeps_all = sample_space(table, space, max(ks), seed=0).keep
        torch.manual_seed(0)
        base = build_model(model, num_classes=10, in_channels=3)
        cache: dict[tuple, int] = {}

        def nbytes(keep, base=base, table=table, batch=batch, resolution=resolution, cache=cache):
            key = tuple(int(v) for v in keep)
            if key not in cache:
                cache[key] = step_bytes(base, table, np.asarray(keep), batch, resolution) if args.memory else (0, 0)
            return cache[key]

        measured = {f"{arm}_k{k}": round(1000 * d["host_ms_per_step"] / d["aten_ops_per_step"], 2)
                    for (m, arm, k), d in sorted(host.items()) if m == model}
        this_cpu = measured.get("cohort_k1")
        torch_there = next(d["torch"] for (m, _, _), d in host.items() if m == model)
        print(json.dumps({"kind": "host_op_cost", "model": model, "us_per_op_this_cpu": measured,
                          "note": "host_ms_per_step / aten_ops_per_step at batch 2, 8 px, 1 thread on the CPU of "
                                  "host.jsonl; includes that CPU's arithmetic (grows with K for the fused arm)",
                          "torch": torch_there}), flush=True)
        for k in ks:
            keeps = sample_space(table, space, k, seed=0).keep
            assert np.array_equal(keeps, keeps_all[:k])  # gpu_acceptance samples k rows; bench_cohort the first k
            member_macs = table.flops_of(keeps).astype(np.float64)
            padded = forming.padded_keeps(table, keeps)
            padded_macs = float(table.flops_of(padded[None])[0])
            waste = k * padded_macs / member_macs.sum() - 1.0
            w_formed = formed_waste(table, k)
            per_flop = 3 * 2 * batch
            eager_bytes = float(sum(nbytes(kp)[0] for kp in keeps))
            fused_bytes = k * float(nbytes(padded)[0])
            saved = {"eager_streams": float(sum(nbytes(kp)[1] for kp in keeps)), "fused": k * float(nbytes(padded)[1])}
            saved["fused_graphs"] = saved["fused"]
            cohort_ops = host[(model, "cohort", k)]["aten_ops_per_step"]
            fused_ops = host[(model, "fused", k)]["aten_ops_per_step"]
            parts = {
                "eager_streams": {"host_ops": cohort_ops, "flops": per_flop * member_macs.sum(), "bytes": eager_bytes,
                                  "kernels": cohort_ops / k, "waste": 0.0},
                "fused": {"host_ops": fused_ops, "flops": per_flop * k * padded_macs, "bytes": fused_bytes,
                          "kernels": fused_ops, "waste": waste},
                "fused_graphs": {"host_ops": STEP_OPS, "host_fixed_us": args.replay_us,
                                 "flops": per_flop * k * padded_macs, "bytes": fused_bytes, "kernels": fused_ops,
                                 "waste": waste},
            }
            for design, p in parts.items():
                p.update(batch=batch, k=k)
                main_ = predict(p, args)
                sens = {}
                variants = {"us_per_op=20": {"us_per_op": 20.0}, "efficiency=0.05": {"efficiency": 0.05},
                            "efficiency=0.20": {"efficiency": 0.20}, "flops_only": {"memory": False}}
                if this_cpu:
                    variants[f"us_per_op={this_cpu}(this cpu)"] = {"us_per_op": this_cpu}
                for name, change in variants.items():
                    sens[name] = predict(p, argparse.Namespace(**{**vars(args), **change}))["img_per_s"]
                if design != "eager_streams":
                    scale = (1 + w_formed) / (1 + waste)
                    q = {**p, "flops": p["flops"] * scale, "bytes": p["bytes"] * scale}
                    sens["waste=formed"] = predict(q, args)["img_per_s"]
                print(json.dumps({
                    "kind": "prediction", "model": model, "design": design, "acceptance_arm": DESIGNS[design],
                    "k": k, "resolution": resolution, "batch": batch, **main_,
                    "aten_ops_host": p["host_ops"], "train_gflop_per_step": round(p["flops"] / 1e9, 2),
                    "gb_per_step": round(p["bytes"] / 1e9, 3), "saved_activations_gb": round(saved[design] / 1e9, 2),
                    "kernels_floor_ops": round(p["kernels"], 1),
                    "waste": round(p["waste"], 4),
                    **({"waste_formed": round(w_formed, 4)} if design != "eager_streams" else {}),
                    "member_c_flops_mean": round(float(member_macs.mean() / table.base_flops), 4),
                    "member_fwd_mmacs_mean": round(float(member_macs.mean()) / 1e6, 2),
                    "sensitivity": sens, "params": defaults}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
