"""Cohort training vs one-after-another vs fused: the same K pruned subnetworks, the same data, the same steps.

(a) cohort: ``nps.pipeline.training.cohort.train_cohort`` — ONE pass of S batches, every batch loaded once and
    stepped by all K subnetworks (CUDA: one stream each; CPU: ``cpu_workers`` threads, one intra-op thread each);
(b) sequential: what a user does without nps — each subnetwork in turn gets its own pass of S batches from the same
    loader (loading and augmentation paid K times), a plain training loop, torch's default threading;
(c) fused (``--fused``): ``nps.pipeline.training.fused_cohort.FusedCohort`` — the K subnetworks as ONE module,
    one kernel per layer for the whole cohort, torch's default threading.

``--host`` measures the host side instead, where arithmetic is negligible (batch 2 at 8 px): per arm and K, the aten
ops one training step of all K members dispatches (``aten_ops_per_step``, counted with a TorchDispatchMode) and its
wall milliseconds on one thread (``host_ms_per_step``); the cohort arm steps its members from one thread, as on a
GPU. One JSON line per arm and K: ``{"bench": "host", "arm", "k", "aten_ops_per_step", "host_ms_per_step", ...}``.

Both arms use the same optimizer, LR schedule, autocast and memory format, and the same warm-up (``--warmup`` steps
per model, not timed). The arms alternate ``--repeats`` times so that load from other processes hits both alike.

On the CPU the headline ``ratio`` compares with the sequential arm at ``--threads`` (torch's default: every core).
A multi-threaded op on cores shared with other processes can be far slower than a single-threaded one (OpenMP
barriers wait for descheduled threads), so the line also gives ``sequential_1t_img_per_s`` — the same sequential
arm with ONE thread — and ``ratio_vs_best_sequential`` against the faster of the two sequential settings: that part
of the gain is what the cohort adds beyond picking the right thread count.
Prints one JSON line per K::

    {"bench": "cohort", "device", "model", "c_flops", "k", "cohort_img_per_s", "sequential_img_per_s", "ratio", ...}

img/s counts images × subnetworks. Defaults: CPU → ResNet-56 on Fashion-MNIST at 32 px; GPU → ResNet-50 at 224 px
on CIFAR-sized (32 px) images upsampled on the device (the paper's setting).

Data (``--data``): ``nps`` (the project's loaders on a dataset converted with ``nps convert``, converted into
``--data-dir`` if missing), ``idx`` (Fashion-MNIST IDX files read with numpy into memory, pad-crop + flip + resize
+ normalise per batch), ``synthetic`` (random uint8 images of the given size, same augmentation). ``auto`` tries
them in that order. The JSON says which one ran.
"""
from __future__ import annotations

import argparse
import copy
import gzip
import itertools
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tools_ops: the op counter the tests use

from nps.kernels.samplers import sample_space
from nps.kernels.spaces import parse_space
from nps.pipeline.network.layer_table import build_layer_table
from nps.pipeline.network.models import build_model
from nps.pipeline.network.prune import prune_model
from nps.pipeline.training.cohort import Cohort, CohortOptions, train_cohort
from nps.pipeline.training.devices import resolve_amp, resolve_channels_last, resolve_cpu_workers
from nps.pipeline.training.events import EpochEnded
from nps.pipeline.training.fused_cohort import FusedCohort, Fusion
from nps.pipeline.training.schedule import autocast_context, make_optimizer, make_scheduler
from nps.pipeline.training.spec import RetrainSpec as RetrainConfig

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


# --------------------------------------------------------------------------------------------------------------------
# Data


class TensorBatches:
    """An in-memory uint8 dataset served as augmented float batches: shuffled each pass, pad-and-crop + flip,
    resized to ``resolution`` and normalised — per batch, with torch ops, on ``device``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, resolution: int,
                 device: torch.device, mean: float, std: float, channels: int, seed: int = 0):
        self.images = images.to(device)  # N x H x W (grey) or N x H x W x 3, uint8
        self.labels = labels.to(device)
        self.batch_size, self.resolution, self.device = batch_size, resolution, device
        self.mean, self.std, self.channels = mean, std, channels
        self.pad = max(1, round(self.images.shape[1] / 8))
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __len__(self):
        return len(self.labels) // self.batch_size

    def __iter__(self):
        order = torch.randperm(len(self.labels), generator=self.generator, device=self.device)
        for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
            idx = order[start:start + self.batch_size]
            x = self.images[idx]
            x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
            x = x.float().div_(255)
            b, _, h, w = x.shape
            x = nn.functional.pad(x, (self.pad,) * 4)
            dy, dx = (int(v) for v in torch.randint(0, 2 * self.pad + 1, (2,), generator=self.generator,
                                                     device=self.device))
            x = x[:, :, dy:dy + h, dx:dx + w]
            flip = torch.rand(b, generator=self.generator, device=self.device) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
            if (h, w) != (self.resolution, self.resolution):
                x = nn.functional.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear",
                                              align_corners=False, antialias=False)
            x = (x - self.mean) / self.std
            if x.shape[1] != self.channels:
                x = x.expand(-1, self.channels, -1, -1)
            yield x.contiguous(), self.labels[idx]


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def nps_loaders(args, device, in_channels):
    from nps.datasets.convert import convert_dataset
    from nps.datasets.loaders import make_loaders

    data_dir = Path(args.data_dir)
    if not (data_dir / "meta.json").exists():
        convert_dataset("fashion-mnist", data_dir, src=FASHION_MNIST)
    train, _, info = make_loaders(data_dir, batch_size=args.batch_size, resolution=args.resolution, device=device,
                                  in_channels=in_channels)
    return train, f"nps loaders ({getattr(info, 'implementation', '?')}) on Fashion-MNIST .beton", 10


def make_data(args, device, in_channels):
    """(loader, description, num_classes)."""
    kinds = ["nps", "idx", "synthetic"] if args.data == "auto" else [args.data]
    errors = []
    for kind in kinds:
        try:
            if kind == "nps":
                if not FASHION_MNIST.exists() and not (Path(args.data_dir) / "meta.json").exists():
                    raise FileNotFoundError(f"{FASHION_MNIST} missing")
                return nps_loaders(args, device, in_channels)
            if kind == "idx":
                images = torch.from_numpy(read_idx(FASHION_MNIST / "train-images-idx3-ubyte.gz").copy())
                labels = torch.from_numpy(read_idx(FASHION_MNIST / "train-labels-idx1-ubyte.gz").astype(np.int64))
                loader = TensorBatches(images, labels, batch_size=args.batch_size, resolution=args.resolution,
                                       device=device, mean=FASHION_MEAN, std=FASHION_STD, channels=in_channels)
                return loader, "Fashion-MNIST IDX in memory (numpy), per-batch torch augmentation", 10
            if kind == "synthetic":
                g = torch.Generator().manual_seed(0)
                n = 50_000
                shape = (n, 32, 32, 3) if in_channels == 3 else (n, 28, 28)
                images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
                labels = torch.randint(0, 10, (n,), generator=g)
                loader = TensorBatches(images, labels, batch_size=args.batch_size, resolution=args.resolution,
                                       device=device, mean=0.5, std=0.25, channels=in_channels)
                return loader, f"synthetic uint8 {tuple(shape[1:])} in memory, per-batch torch augmentation", 10
        except Exception as exc:  # noqa: BLE001 - fall through to the next kind, say why at the end
            errors.append(f"{kind}: {exc}")
    raise SystemExit("no data: " + "; ".join(errors))


class Steps:
    """``steps`` batches of ``loader``; each iteration is a new pass (new shuffle, new augmentation)."""

    def __init__(self, loader, steps):
        self.loader, self.steps = loader, steps

    def __len__(self):
        return self.steps

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.steps)


# --------------------------------------------------------------------------------------------------------------------
# Arms


def sequential_pass(model, loader, config, device, amp_dtype, nhwc, steps):
    """A plain training loop over its own pass of the loader (what one would write without nps)."""
    model.train()
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, steps)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and amp_dtype == torch.float16 else None
    criterion = nn.CrossEntropyLoss()
    for x, y in Steps(loader, steps):
        x = x.to(device, non_blocking=True)
        if nhwc:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with autocast_context(device, amp_dtype):
            loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_sequential(models, loader, config, device, amp_dtype, nhwc, steps, warmup):
    total = 0.0
    for model in models:
        if warmup:
            sequential_pass(model, loader, config, device, amp_dtype, nhwc, warmup)
        start = time.perf_counter()
        sequential_pass(model, loader, config, device, amp_dtype, nhwc, steps)
        total += time.perf_counter() - start
    return total


def time_cohort(models, loader, val, config, device, args, steps, warmup):
    kwargs = dict(amp=args.amp, channels_last=args.channels_last, compile=args.compile, cpu_workers=args.cpu_workers)
    if warmup:
        train_cohort(models, Steps(loader, warmup), val, config, device, **kwargs)
    seconds = []
    train_cohort(models, Steps(loader, steps), val, config, device,
                 on_event=lambda e: seconds.append(e.seconds) if isinstance(e, EpochEnded) else None, **kwargs)
    return seconds[0]  # the training loop only (the engine's final evaluation is not timed)


def time_fused(models, loader, val, config, device, args, steps, warmup, fusion):
    options = CohortOptions(amp=args.amp, channels_last=args.channels_last)
    if warmup:
        FusedCohort([copy.deepcopy(m) for m in models], Steps(loader, warmup), val, config, device, fusion=fusion,
                    options=options).run()
    seconds = []
    FusedCohort(models, Steps(loader, steps), val, config, device, fusion=fusion, options=options,
                on_event=lambda e: seconds.append(e.seconds) if isinstance(e, EpochEnded) else None).run()
    return seconds[0]


# --------------------------------------------------------------------------------------------------------------------


def build_subnetworks(args, num_classes, in_channels, k):
    """(members, mean c_flops, their Fusion)."""
    table = build_layer_table(args.model, args.mode, args.resolution, num_classes, in_channels)
    space = parse_space(args.space, "c_flops", args.c_flops)
    sample = sample_space(table, space, k, seed=args.seed)
    torch.manual_seed(args.seed)
    base = build_model(args.model, num_classes=num_classes, in_channels=in_channels)
    members = [prune_model(base, table, keep) for keep in sample.keep]
    return members, float(np.mean(sample.c_flops)), Fusion(base, table, sample.keep)


def host_cost(args, ks) -> None:
    """The --host measurement (see the module docstring)."""
    import statistics

    from tools_ops import count_ops

    torch.set_num_threads(1)
    in_channels = args.in_channels or 3
    members, c_flops, fusion = build_subnetworks(args, 10, in_channels, max(ks))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, in_channels, 8, 8, generator=g), torch.randint(0, 10, (2,), generator=g)
    data = [(x, y)]
    config = RetrainConfig(epochs=1, lr=0.01)
    options = CohortOptions(amp="off", channels_last=False, cpu_workers=1, member_threads=None)

    def timed(step, repeats=7):
        for _ in range(2):
            step()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1000

    for k in ks:
        models = [copy.deepcopy(m) for m in members[:k]]
        plain = [(m, make_optimizer(m, config)) for m in models]
        criterion = nn.CrossEntropyLoss()

        def sequential_step():
            for m, opt in plain:
                m.train()
                loss = criterion(m(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        cohort = Cohort([copy.deepcopy(m) for m in models], data, data, config, "cpu", options=options)
        cohort.set_up()
        fused = FusedCohort([copy.deepcopy(m) for m in models], data, data, config, "cpu",
                            fusion=Fusion(fusion.base, fusion.table, fusion.keeps[:k]), options=options)
        fused.set_up()
        fused.net.train()
        arms = {"sequential": sequential_step,
                "cohort": lambda: cohort._step_all(x, y, 1, None),
                "fused": lambda: fused._step(x, y, 1)}
        for arm, step in arms.items():
            print(json.dumps({"bench": "host", "arm": arm, "k": k, "aten_ops_per_step": count_ops(step),
                              "host_ms_per_step": round(timed(step), 3), "model": args.model,
                              "table_resolution": args.resolution, "input": "2 x 8 px", "c_flops": round(c_flops, 4),
                              "space": args.space, "threads": 1, "torch": torch.__version__}), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", help="default: resnet56 on CPU, resnet50 on GPU")
    p.add_argument("--resolution", type=int, help="default: 32 on CPU, 224 on GPU")
    p.add_argument("--mode", default="all", choices=["all", "internal"])
    p.add_argument("--space", default="std-0.05")
    p.add_argument("--c-flops", type=float, default=0.25)
    p.add_argument("--k", default="1,4,8", help="comma-separated cohort sizes")
    p.add_argument("--steps", type=int, help="timed steps per subnetwork (default: 8 on CPU, 50 on GPU)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per subnetwork before each arm")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1, help="alternate the arms this many times; report totals")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch.set_num_threads (default: every core this process may use)")
    p.add_argument("--cpu-workers", default="auto", help="engine threads on the CPU ('auto' = --threads)")
    p.add_argument("--channels-last", default="auto", help="auto | on | off")
    p.add_argument("--amp", default="auto", help="auto | bf16 | fp16 | off")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-one-thread-arm", action="store_true", help="CPU: skip the 1-thread sequential reference")
    p.add_argument("--data", default="auto", choices=["auto", "nps", "idx", "synthetic"])
    p.add_argument("--data-dir", default=os.path.expanduser("~/.cache/nps/bench/fashion-mnist"))
    p.add_argument("--in-channels", type=int, help="default: 1 on CPU (Fashion-MNIST), 3 on GPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fused", action="store_true", help="add the fused arm")
    p.add_argument("--host", action="store_true", help="measure host cost per step (see the docstring) and exit")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    if args.host:
        args.model, args.resolution = args.model or "resnet20", args.resolution or 32
        return host_cost(args, [int(v) for v in args.k.split(",")])
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.model = args.model or ("resnet50" if gpu else "resnet56")
    args.resolution = args.resolution or (224 if gpu else 32)
    args.steps = args.steps or (50 if gpu else 8)
    in_channels = args.in_channels or (3 if gpu else 1)
    args.channels_last = {"on": True, "off": False}.get(args.channels_last, args.channels_last)
    if args.cpu_workers != "auto":
        args.cpu_workers = int(args.cpu_workers)
    if gpu and args.data == "auto":
        args.data = "synthetic" if in_channels == 3 else "auto"
    torch.set_num_threads(args.threads)
    if gpu:
        torch.backends.cudnn.benchmark = True

    loader, data_desc, num_classes = make_data(args, device, in_channels)
    torch.set_num_threads(args.threads)  # building FFCV loaders may change it (FFCV sets torch's thread count)
    first_x, first_y = next(iter(loader))
    val = [(first_x[:8].clone(), first_y[:8].clone())]  # the engine's final evaluation: one tiny batch, not timed
    config = RetrainConfig(epochs=1, lr=0.01)
    amp_dtype = resolve_amp(args.amp, device)
    nhwc = resolve_channels_last(args.channels_last, device)

    ks = [int(v) for v in args.k.split(",")]
    subnets, c_flops, fusion = build_subnetworks(args, num_classes, in_channels, max(ks))
    for k in ks:
        cohort_s = sequential_s = sequential_1t_s = fused_s = 0.0
        cpu = {"cohort": 0.0, "sequential": 0.0, "sequential_1t": 0.0, "fused": 0.0}  # CPU seconds per arm
        ratios = []
        one_thread_arm = not gpu and args.threads > 1 and not args.no_one_thread_arm

        def fresh():
            models = [copy.deepcopy(m).to(device) for m in subnets[:k]]
            return [m.to(memory_format=torch.channels_last) for m in models] if nhwc else models

        for _ in range(args.repeats):
            t_cpu = time.process_time()
            c = time_cohort(fresh(), loader, val, config, device, args, args.steps, args.warmup)
            cpu["cohort"] += time.process_time() - t_cpu
            t_cpu = time.process_time()
            s = time_sequential(fresh(), loader, config, device, amp_dtype, nhwc, args.steps, args.warmup)
            cpu["sequential"] += time.process_time() - t_cpu
            if one_thread_arm:
                torch.set_num_threads(1)
                t_cpu = time.process_time()
                sequential_1t_s += time_sequential(fresh(), loader, config, device, amp_dtype, nhwc, args.steps,
                                                   args.warmup)
                cpu["sequential_1t"] += time.process_time() - t_cpu
                torch.set_num_threads(args.threads)
            if args.fused:
                t_cpu = time.process_time()
                fused_s += time_fused(fresh(), loader, val, config, device, args, args.steps, args.warmup,
                                      Fusion(fusion.base, fusion.table, fusion.keeps[:k]))
                cpu["fused"] += time.process_time() - t_cpu
            cohort_s += c
            sequential_s += s
            ratios.append(s / c)
        images = args.steps * args.batch_size * k * args.repeats
        line = {
            "bench": "cohort", "device": torch.cuda.get_device_name(device) if gpu else f"cpu ({os.cpu_count()} cores)",
            "model": args.model, "c_flops": round(c_flops, 4), "k": k,
            "cohort_img_per_s": round(images / cohort_s, 1), "sequential_img_per_s": round(images / sequential_s, 1),
            "ratio": round(sequential_s / cohort_s, 3),
            "ratios": [round(r, 3) for r in ratios],
            **({"fused_img_per_s": round(images / fused_s, 1), "fused_vs_cohort": round(cohort_s / fused_s, 3)}
               if args.fused else {}),
            **({"sequential_1t_img_per_s": round(images / sequential_1t_s, 1),
                "ratio_vs_best_sequential": round(min(sequential_s, sequential_1t_s) / cohort_s, 3)}
               if one_thread_arm else {}),
            **({"cpu_s_per_arm": {arm: round(v, 1) for arm, v in cpu.items() if v}} if not gpu else {}),
            "resolution": args.resolution, "batch_size": args.batch_size,
            "steps": args.steps, "repeats": args.repeats, "threads": args.threads,
            "cpu_workers": resolve_cpu_workers(args.cpu_workers, device, k), "channels_last": nhwc,
            "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off", "compile": args.compile,
            "space": args.space, "mode": args.mode, "data": data_desc, "load_avg": round(os.getloadavg()[0], 2),
            "torch": torch.__version__,
        }
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    sys.exit(main())
