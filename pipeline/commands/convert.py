"""``nps convert``: raw dataset -> DIR/train.beton, DIR/val.beton, DIR/meta.json; ``--verify DIR`` checks them."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Dict

from nps.datasets.errors import DatasetError
from nps.datasets.kinds import KINDS

HELP = """\
Convert a dataset once; every subnetwork then trains from the FFCV .beton files.

kinds (--src):
  fashion-mnist  MNIST-family IDX files, default --src /usr/share/datasets/fashion-mnist/
  idx            folder with train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-... (gzip or raw)
  cifar10        folder with data_batch_1..5 and test_batch (python pickles)
  cifar100       folder with train and test (python pickles)
  imagefolder    tree SRC/train/<class>/*.jpg and SRC/val/<class>/*.jpg, classes sorted by name
  npz            one .npz with x_train, y_train, x_test, y_test (uint8 images)

examples:
  nps convert fashion-mnist --out data/fmnist
  nps convert imagefolder --src /data/imagenet --out data/imagenet --write-mode smart --max-resolution 256
  nps convert --verify data/fmnist
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert a dataset to FFCV .beton files (once per dataset)", description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("kind", nargs="?", choices=KINDS, metavar="KIND", help=f"one of: {', '.join(KINDS)}")
    parser.add_argument("--src", help="source folder or file (fashion-mnist has a default)")
    parser.add_argument("--out", metavar="DIR", help="output directory for train.beton, val.beton, meta.json")
    parser.add_argument("--write-mode", choices=("raw", "jpg", "smart"), default="raw",
                        help="raw pixels, JPEG, or smart (JPEG only for images above 32 KiB of pixels); default raw")
    parser.add_argument("--max-resolution", type=int, metavar="PX",
                        help="downscale images whose longer side exceeds PX before storing")
    parser.add_argument("--jpeg-quality", type=int, default=90, metavar="Q", help="JPEG quality (default 90)")
    parser.add_argument("--workers", type=int, metavar="N", help="writer processes (default: CPUs, at most 8)")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N images of each split (trials)")
    parser.add_argument("--force", action="store_true", help="overwrite existing output")
    parser.add_argument("--verify", metavar="DIR", help="re-read DIR and check counts, labels and fingerprint")
    parser.set_defaults(func=run)


def _rich_progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn(),
    )
    tasks: Dict[str, int] = {}

    def update(split: str, done: int, total: int) -> None:
        if split not in tasks:
            tasks[split] = bar.add_task(split, total=total, rate="")
        task = bar.tasks[tasks[split]]
        speed = task.speed
        bar.update(tasks[split], completed=done, total=total,
                   rate=f"{speed:,.0f} img/s" if speed else "")

    return bar, update


def _line_progress(every_s: float = 2.0) -> Callable[[str, int, int], None]:
    """A plain line every ``every_s`` seconds and at the end of each split (stdout is not a terminal)."""
    state: Dict[str, list] = {}

    def update(split: str, done: int, total: int) -> None:
        now = time.monotonic()
        start, last = state.setdefault(split, [now, 0.0])
        if done < total and now - last < every_s:
            return
        state[split][1] = now
        rate = done / max(now - start, 1e-9)
        eta = (total - done) / rate if rate > 0 else float("inf")
        eta_text = f"ETA {eta:.0f}s" if done < total and eta != float("inf") else "done" if done >= total else ""
        print(f"convert {split}: {done}/{total} images ({rate:,.0f} img/s) {eta_text}".rstrip(), flush=True)

    return update


def run(args) -> int:
    from nps.datasets.convert import convert_dataset, verify_dataset

    if args.verify:
        if args.kind or args.out:
            raise DatasetError("--verify DIR takes no KIND or --out")
        report = verify_dataset(args.verify)
        counts = ", ".join(f"{k} {v}" for k, v in report["counts"].items())
        print(f"{args.verify}: ok ({counts} images; fingerprint {report['fingerprint'][:16]})")
        return 0
    if not args.kind:
        raise DatasetError("KIND is required (or --verify DIR)")
    if not args.out:
        raise DatasetError("--out DIR is required")

    options = dict(src=args.src, write_mode=args.write_mode, max_resolution=args.max_resolution,
                   jpeg_quality=args.jpeg_quality, workers=args.workers, limit=args.limit, force=args.force)
    started = time.monotonic()
    if sys.stdout.isatty():
        bar, update = _rich_progress()
        with bar:
            meta = convert_dataset(args.kind, args.out, progress=update, **options)
    else:
        meta = convert_dataset(args.kind, args.out, progress=_line_progress(), **options)
    counts = meta["counts"]
    shape = "x".join(map(str, meta["image_shape"])) if meta["image_shape"] else "variable size"
    print(f"wrote {args.out}: train.beton {counts['train']}, val.beton {counts['val']} images "
          f"({meta['num_classes']} classes, {shape}, {meta['write_mode']}) in {time.monotonic() - started:.1f}s; "
          f"fingerprint {meta['fingerprint'][:16]}")
    return 0
