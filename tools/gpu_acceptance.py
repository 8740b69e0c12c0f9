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

Then what only a GPU can show of base training (docs/base-training.md): ``check_resume`` trains a small network with
dropout to a plateau on the GPU, once straight through and once stopped after an epoch of its cool-down and resumed
from that epoch's checkpoint in a fresh model (after other CUDA draws), under fp32, bf16 and fp16 autocast (fp16: the
loss scaler's state too), cuDNN in deterministic mode: one line per precision with whether the weights (SHA-256),
top-1 and curve are identical, and first whether the CUDA generator's state round-trips.

Then the GPU latency model (docs/latency-model.md): ``check_latency_model`` measures ResNet-20's per-layer latency
model at 32 px, batch 64, fp16 autocast, channels_last, as ``nps latency-model --device cuda`` does: one line with
the fit errors, the calibration (measured and predicted ms), the network error and whether every coefficient is
non-negative and the error stated.

    python tools/gpu_acceptance.py [--budget-s 420] [--models resnet20,resnet56,mobilenet_v2,resnet50]
    python tools/gpu_acceptance.py --only resume     # the base-training checks alone (under a minute)
    python tools/gpu_acceptance.py --only latency    # the latency model alone
    python tools/gpu_acceptance.py --only ffcv       # FFCV epochs left early (about 10 s)

Then ``check_ffcv_epochs``: an FFCV loader delivering to the GPU (96 px RGB unaugmented, batch 64), 10 epochs each
left after one batch (as adaptive BN leaves them, datasets/ffcv_epoch.py): one line with the loader threads left and
the device memory still allocated once they have ended (at most 10 s after the last). Before nps ended such epochs,
each kept its FFCV device buffers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts: cuBLAS may then be deterministic
import torch  # noqa: E402


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


class SeededBatches:
    """Synthetic batches on the device whose epoch is a function of (seed, epoch) alone, as nps's loaders are; an
    evaluation split (``advance`` False) is the same every pass."""

    def __init__(self, steps: int, batch: int, resolution: int, device, seed: int, advance: bool = True):
        self.steps, self.batch, self.resolution, self.device, self.seed = steps, batch, resolution, device, seed
        self.batch_size, self.epoch, self.advance = batch, 0, advance

    def __len__(self):
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        g = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += int(self.advance)
        for _ in range(self.steps):
            x = torch.randn(self.batch, 3, self.resolution, self.resolution, device=self.device, generator=g)
            yield x, (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()  # learnable labels


class Stop(Exception):
    """The kill, in-process: raised from the checkpoint of the epoch to stop after."""


def resume_network():
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1),
                         nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3),
                         nn.Linear(64, 4))


def check_resume(device) -> None:
    """Base training resumed on the GPU equals it uninterrupted: CUDA random state, autocast, the fp16 scaler."""
    from nps.pipeline.training.network_training import (
        NetworkTraining,
        rng_state,
        set_rng_state,
        train_to_plateau,
        weights_digest,
    )
    from nps.pipeline.training.plateau import PlateauRule
    from nps.pipeline.training.spec import RetrainSpec

    state = rng_state(device)
    first = torch.rand(4, device=device).tolist()
    set_rng_state(state, device)
    emit(check="the CUDA generator's state round-trips", identical=torch.rand(4, device=device).tolist() == first)
    benchmark, deterministic = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        train = SeededBatches(20, 64, 32, device, 0)
        holdout, val = (SeededBatches(5, 128, 32, device, seed, advance=False) for seed in (1, 2))
        spec = RetrainSpec(method="rewind", epochs=8, rewind_lr=0.1, warmup_epochs=0.5)
        for amp in ("off", "bf16", "fp16"):
            # min_delta 100: the rule fires at epoch 2, then 3 epochs of cool-down; stopped after epoch 3
            plan = NetworkTraining("gpu-resume", spec, PlateauRule(1, 100.0, 3, 8, 0.5), 1280, amp, "gpu")
            t0 = time.perf_counter()
            result, curve = train_to_plateau(resume_network(), train, holdout, val, plan, device)
            saved = {}

            def stop_after_3(epoch, data, saved=saved):
                saved[epoch] = data
                if epoch == 3:
                    raise Stop

            try:
                train_to_plateau(resume_network(), train, holdout, val, plan, device, on_checkpoint=stop_after_3)
            except Stop:
                pass
            torch.rand(1000, device=device)  # other CUDA draws between the kill and the resume
            again, curve_again = train_to_plateau(resume_network(), train, holdout, val, plan, device,
                                                  resume=saved[3])
            same_curve = ({k: v for k, v in curve.as_dict().items() if k != "seconds"}
                          == {k: v for k, v in curve_again.as_dict().items() if k != "seconds"})
            emit(check="base training resumed after epoch 3 equals it uninterrupted", amp=amp,
                 identical_weights=weights_digest(result.model) == weights_digest(again.model),
                 identical_top1=result.top1 == again.top1, identical_curve=same_curve, top1=result.top1,
                 epochs=curve.epochs, plateau_epoch=curve.plateau_epoch,
                 seconds=round(time.perf_counter() - t0, 1))
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = benchmark, deterministic


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
    ap.add_argument("--only", choices=["resume", "latency", "ffcv"],
                    help="run only these checks (resume: base training's; latency: the latency model; ffcv: FFCV "
                         "epochs left early)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        emit(error="no CUDA device: this script measures what only a GPU can show")
        return 1
    device = torch.device("cuda:0")
    emit(device=torch.cuda.get_device_name(device), torch=torch.__version__, cuda=torch.version.cuda,
         cpu_cores=len(os.sched_getaffinity(0)))
    if args.only in (None, "resume"):
        check_resume(device)
    if args.only in (None, "latency"):
        check_latency_model(device)  # before cudnn.benchmark: as nps latency-model runs
    if args.only in (None, "ffcv"):
        check_ffcv_epochs(device)
    if args.only is not None:
        return 0
    torch.backends.cudnn.benchmark = True
    check_forward(device)
    check_distill(device)
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


def check_distill(device) -> None:
    """Distillation on the GPU (issue 30): the teacher's forward captured inside the fused step's CUDA graph, and
    distillation under bf16 autocast, fused and unfused (one CUDA stream per member). ResNet-20 at 32 px, K = 4, 12
    fresh batches. One JSON line each; ``ok`` says whether it holds:

    - fused + graphs: the graph is captured, the teacher is called from Python only before and while capturing (2
      eager steps, the capture's warm-up, the capture: 4 calls for 12 batches; the replays run the captured
      teacher on each new batch), and the members end where eager fused steps put them: their distance from the
      eager run is under a tenth of distillation's own effect (the same run without it), which a teacher output
      frozen at the capture's batch would not be;
    - unfused with streams: one teacher forward per batch (12), every member finished;
    - bf16 soft targets are float32 and within 0.02 of fp32's probabilities.
    """
    from nps.pipeline.training.cohort import Cohort, CohortOptions
    from nps.pipeline.training.distill import Teacher
    from nps.pipeline.training.fused_cohort import FusedCohort
    from nps.pipeline.training.spec import RetrainSpec

    g = torch.Generator(device=device).manual_seed(3)
    data = [(torch.randn(64, 3, 32, 32, device=device, generator=g),
             torch.randint(0, 10, (64,), device=device, generator=g)) for _ in range(12)]

    def run(fused: bool, distill: bool, graphs: bool):
        members, fusion = members_of("resnet20", 32, 4, device)
        calls = []
        fusion.base.register_forward_hook(lambda *args: calls.append(1))  # kept by the teacher's copy
        spec = RetrainSpec(epochs=1, lr=0.05, distill=distill)
        opts = CohortOptions(amp="bf16", channels_last=True, cuda_graphs=graphs, keep_models=True)
        teacher = Teacher(fusion.base) if distill else None
        cohort = (FusedCohort(members, data, data[:2], spec, device, fusion=fusion, options=opts, teacher=teacher)
                  if fused else Cohort(members, data, data[:2], spec, device, options=opts, teacher=teacher))
        results = cohort.run()
        weights = torch.cat([torch.cat([p.detach().reshape(-1).double() for p in r.model.parameters()])
                             for r in results if r.ok])
        return bool(getattr(cohort, "_graph", None)), len(calls), sum(r.ok for r in results), weights

    try:
        captured, calls, done, graph_w = run(True, True, True)
        _, eager_calls, _, eager_w = run(True, True, False)
        _, _, _, plain_w = run(True, False, True)
        to_eager = float((graph_w - eager_w).norm() / eager_w.norm())
        effect = float((graph_w - plain_w).norm() / plain_w.norm())
        emit(check="distillation: the teacher inside the fused step's CUDA graph (bf16)", graph_captured=captured,
             teacher_calls=calls, teacher_calls_eager=eager_calls, members_done=done, graph_vs_eager=to_eager,
             distill_vs_plain=effect,
             ok=captured and calls == 4 and eager_calls == 12 and done == 4 and to_eager < 0.1 * effect)
        _, calls, done, _ = run(False, True, False)
        emit(check="distillation: unfused cohort, CUDA streams (bf16)", teacher_calls=calls, members_done=done,
             ok=calls == 12 and done == 4)
        members, fusion = members_of("resnet20", 32, 1, device)
        x = data[0][0].contiguous(memory_format=torch.channels_last)
        soft = {amp: Teacher(fusion.base).for_cohort(RetrainSpec(distill=True), device, True, amp).targets(x)
                for amp in (None, torch.bfloat16)}
        gap = float((soft[None].p - soft[torch.bfloat16].p).abs().max())
        emit(check="distillation: bf16 soft targets", dtype=str(soft[torch.bfloat16].p.dtype), max_p_gap_to_fp32=gap,
             ok=soft[torch.bfloat16].p.dtype == torch.float32 and gap < 0.02)
    except Exception as exc:  # noqa: BLE001 - reported; the measurements after it still run
        emit(check="distillation", error=f"{type(exc).__name__}: {exc}"[:300], ok=False)


def check_latency_model(device) -> None:
    """The latency model on the GPU (``nps latency-model --device cuda``, docs/latency-model.md): ResNet-20 at 32 px,
    batch 64, fp16 autocast, channels_last; ``ok`` when every coefficient is non-negative, the scale positive, the
    offset non-negative, the per-layer and network errors are stated (finite) and every calibration network (the
    base, uniformly and randomly pruned copies, each paired with the base) was timed."""
    import numpy as np

    from nps.pipeline.deploy.latency_model import CALIBRATION_KEEPS, CALIBRATION_RANDOM, measure_latency_model

    what = "latency model on the GPU (resnet20, 32 px, batch 64, fp16)"
    try:
        t0 = time.perf_counter()
        m = measure_latency_model("resnet20", 32, num_classes=10, in_channels=3, device=str(device), batch=64,
                                  precision="fp16")
        cal = m.calibration
        emit(check=what, device_name=m.device_name, layers=len(m.layers),
             fit_error_min=round(float(m.fit_error.min()), 4), fit_error_max=round(float(m.fit_error.max()), 4),
             network_error=round(m.network_error, 4), scale=round(m.scale, 4), offset_ms=round(1e3 * m.offset, 4),
             term_scale=[round(float(v), 4) for v in m.term_scale],
             block=m.block, padded=int(m.padded.sum()), padded_in=int(m.padded_in.sum()),
             keep=cal["keep_fraction"], measured_ms=[round(1e3 * v, 4) for v in cal["measured_s"]],
             predicted_ms=[round(1e3 * v, 4) for v in cal["predicted_s"]],
             iqr_over_median=[round(v, 3) for v in cal["iqr_over_median"]], seconds=round(time.perf_counter() - t0, 1),
             ok=bool(np.all(m.coef >= 0) and m.scale > 0 and m.offset >= 0 and np.all(m.term_scale >= 0)
                     and np.all(np.isfinite(m.fit_error))
                     and np.isfinite(m.network_error)
                     and len(cal["measured_s"]) == len(CALIBRATION_KEEPS) + CALIBRATION_RANDOM))
    except Exception as exc:  # noqa: BLE001 - reported; the measurements after it still run
        emit(check=what, error=f"{type(exc).__name__}: {exc}"[:300], ok=False)


def check_ffcv_epochs(device, stops: int = 10, settle_s: float = 10.0, images: int = 1200, side: int = 96) -> None:
    """FFCV epochs left after one batch end (datasets/ffcv_epoch.py): ``ok`` when no loader thread is left and the
    device memory allocated after ``stops`` early stops is within one epoch's buffers of what it was before (left
    running, each held its batches on the device). Runs on the CPU too (no memory figure there). The dataset and
    the stops are tools/bench_ffcv_epoch.py's."""
    import tempfile
    import threading
    from pathlib import Path

    from bench_ffcv_epoch import dataset, stop_early  # tools/, beside this script

    from nps.datasets.loaders import make_loaders

    what = f"FFCV epochs left early ({stops}, {side} px RGB, batch 64)"
    cuda = torch.device(device).type == "cuda"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            train, _, info = make_loaders(dataset(Path(tmp), images, side), batch_size=64, device=device,
                                          on_device=False, resolution=side, augment=False)
            threads = threading.active_count()

            def settled() -> None:  # the loader's threads gone, or settle_s passed
                deadline = time.monotonic() + settle_s
                while threading.active_count() > threads and time.monotonic() < deadline:
                    time.sleep(0.05)

            for _ in train:  # compiles; a whole pass leaves nothing running
                pass
            settled()
            allocated = torch.cuda.memory_allocated(device) if cuda else 0
            stop_early(train, stops)
            settled()
            grown = (torch.cuda.memory_allocated(device) - allocated) if cuda else 0
            epoch_bytes = 64 * 3 * side * side * (train.loader.batches_ahead + 2)  # uint8 batches FFCV keeps
            left = threading.active_count() - threads
            emit(check=what, loader=info.implementation, threads_left=left, device_mib_grown=round(grown / 2**20, 2),
                 one_epoch_mib=round(epoch_bytes / 2**20, 2), ok=bool(left == 0 and grown <= epoch_bytes))
    except Exception as exc:  # noqa: BLE001 - reported; the measurements after it still run
        emit(check=what, error=f"{type(exc).__name__}: {exc}"[:300], ok=False)

if __name__ == "__main__":
    sys.exit(main())
