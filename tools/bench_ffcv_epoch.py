"""FFCV epochs left early: what each way of ending them costs the consumer, and what it leaves behind.

Each policy runs in its own process on the same synthetic dataset (--images RGB images of --side px, converted once
into --data): an FFCV train loader (nps.datasets.loaders.make_loaders, on_device=False) is compiled by one whole
pass, then --stops epochs are each left after their first batch (as adaptive BN, a limited pass or a verification
leave them). One JSON line per policy:
  {"bench": "ffcv_epoch", "policy", "stops", "consumer_s", "s_per_stop", "threads_left", "rss_growth_mib",
   "baseline"}
``consumer_s``: the consumer's wall time for the stops, not counting --gap seconds after each (its own work between
stops: a cohort's training; 0 is a burst). ``threads_left`` and ``rss_growth_mib`` (resident memory
over the process's after the compiling pass): --settle seconds after the last stop.
Policies:
  leave  -- the baseline, nps before datasets/ffcv_epoch.py: nothing ends the epoch (FFCV's thread lives on).
  wait   -- ffcv_epoch.end_epoch in the consumer (it waits for FFCV's 0.5 s put timeout).
  later  -- what nps does: ffcv_epoch.end_epoch_later (a daemon thread ends it; the consumer goes on, unless
            MAX_ENDING epochs are still ending: then it waits for the oldest).

usage: python tools/bench_ffcv_epoch.py [--stops 30] [--gap 0] [--images 3000] [--side 64] [--batch 64]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

POLICIES = ("leave", "wait", "later")


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 / 2**20


def dataset(data: Path, images: int, side: int) -> Path:
    import numpy as np

    from nps.datasets.convert import convert_dataset

    out = data / f"rgb-{images}-{side}"
    if not (out / "meta.json").exists():
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (images, side, side, 3), dtype=np.uint8)
        train = images * 2 // 3
        np.savez(data / "d.npz", x_train=x[:train], y_train=np.arange(train) % 10, x_test=x[train:],
                 y_test=np.arange(images - train) % 10)
        convert_dataset("npz", out, src=data / "d.npz", workers=1)
    return out


def stop_early(train, stops: int, gap: float = 0.0) -> float:
    """Leave ``stops`` epochs of ``train`` after their first batch, ``gap`` seconds apart (the consumer's own work
    between stops: training a cohort); the consumer's seconds for the stops, the gaps not counted."""
    took = 0.0
    for epoch in range(stops):
        started = time.perf_counter()
        train.set_epoch(epoch)
        for _ in train:
            break
        took += time.perf_counter() - started
        time.sleep(gap)
    return took


def one(policy: str, args) -> dict:
    """Runs in the child process."""
    import nps.datasets.loaders as loaders
    from nps.datasets import ffcv_epoch

    if policy == "leave":
        loaders.end_epoch_later = lambda batches: None
    elif policy == "wait":
        loaders.end_epoch_later = ffcv_epoch.end_epoch
    train, _, info = loaders.make_loaders(dataset(Path(args.data), args.images, args.side), batch_size=args.batch,
                                          on_device=False, num_workers=1)
    assert info.implementation == "ffcv", info
    for _ in train:  # compiles FFCV's pipeline; a whole pass leaves nothing running
        pass
    time.sleep(args.settle)
    threads, rss = threading.active_count(), rss_mib()
    took = stop_early(train, args.stops, args.gap)
    time.sleep(args.settle)
    return {"bench": "ffcv_epoch", "policy": policy, "stops": args.stops, "consumer_s": round(took, 3),
            "s_per_stop": round(took / args.stops, 4), "threads_left": threading.active_count() - threads,
            "rss_growth_mib": round(rss_mib() - rss, 1), "images": args.images, "side": args.side,
            "batch": args.batch, "gap_s": args.gap,
            "baseline": "leave (nps before ffcv_epoch: nothing ends an epoch left early)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stops", type=int, default=30)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--gap", type=float, default=0.0, help="seconds between stops (the consumer's own work)")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds to wait before measuring what is left")
    parser.add_argument("--data", default=None, help="folder for the converted dataset (default: a temporary one)")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one(args.child, args)), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        args.data = args.data or tmp
        dataset(Path(args.data), args.images, args.side)
        for policy in args.policies.split(","):
            if policy not in POLICIES:
                sys.exit(f"--policies: unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
            argv = [sys.executable, __file__, "--child", policy, "--data", args.data]
            for name in ("stops", "images", "side", "batch", "gap", "settle"):
                argv += [f"--{name}", str(getattr(args, name))]
            result = subprocess.run(argv, capture_output=True, text=True, check=False)
            lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
            if result.returncode or not lines:
                sys.exit(f"policy {policy} failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}")
            print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
