"""`nps latency-model`: measure a network's per-layer latency model on this machine and write it to a file."""
from __future__ import annotations

import argparse
import contextlib

EPILOG = """\
Each conv and linear layer is timed alone, as the network runs it (the layer, then the normalisation and the
activation that follow it in the traced graph), on random input of its own spatial size at the batch, at a grid of
about 5 input x 8 output channel counts (fractions 0.1 to 1 of its width, multiples of its conv groups; a count the
pruning mode cannot change stays at its width), and fitted as

  t(cin, cout) = a + b * cin * P / groups + c * P + d * cin        (a, b, c, d >= 0; depthwise: a + c * P)

where P is cout, or for a padded layer cout rounded up to the model's channel block (CPU kernels compute output
channels in blocks: with AVX-512, 17 channels cost as 32). For each block tried (--block auto, the default: 1, 8, 16
and 32; --block N: N alone, 1 pads no layer) each conv layer is padded where its grid fits better so.

Then the base network, copies pruned uniformly to 0.75, 0.5 and 0.3 of their channels and 8 copies pruned at
random (each group's ratio uniform in [0, 0.7], seeded) are timed whole, as nps latency times them (each copy paired
with the base, run by run), and network = offset + scale * sum of the layer terms is fitted to their ratios to the
base. With a block, the padded layers are fitted again with their input counts padded too. Of these models (each
block, inputs padded or not) the one whose calibration predicts the pruned networks best is kept: the layers' grids
hardly tell the blocks apart and a layer timed alone does not show its input's padding; whole networks do. The
model kept is calibrated again with one scale per term (a, b, c, d). The tables state each layer's fit error
(relative RMS over its grid) and the calibration networks' errors; their RMS is the model's network error.
Everything runs in eval mode, channels_last, under autocast at --precision (fp32: none).

Defaults: --device cpu; --batch 32 on the CPU (at batch 1 a small network's latency is mostly per-layer overhead
and barely follows the channel counts), 64 on a GPU; --threads: torch's current thread count; --precision fp32 on
the CPU, fp16 on a GPU. See docs/latency-model.md. nps sample --c-latency and --latency-model read FILE.

examples:
  nps latency-model --model resnet20 --resolution 28 --in-channels 1 --threads 1 --out resnet20-cpu.h5
  nps latency-model --model resnet56 --resolution 32 --device cuda --out resnet56-gpu.h5
"""


def register(sub) -> None:
    p = sub.add_parser("latency-model", help="measure a per-layer latency model of a network on this machine",
                       description="Time every conv and linear layer of a network at a grid of channel counts, fit "
                                   "each a non-negative latency form, calibrate the sum on whole pruned networks, "
                                   "and write the model (with its error) to --out.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="base network: a registry or torchvision model, timm:<name>, or package.module:function")
    p.add_argument("--resolution", type=int, required=True, help="input resolution (pixels)")
    p.add_argument("--mode", choices=["internal", "all"], default="all",
                   help="the pruning mode the model serves: which channel counts vary (default all)")
    p.add_argument("--classes", type=int, default=10, help="classifier outputs (default 10)")
    p.add_argument("--in-channels", type=int, default=3, choices=[1, 3])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--batch", type=int, help="batch size (default 32 on the CPU, 64 on a GPU)")
    p.add_argument("--threads", type=int,
                   help="torch intra-op threads (default: torch's current count, stored with the model)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"],
                   help="autocast precision (default fp32 on the CPU, fp16 on a GPU)")
    p.add_argument("--block", default="auto", metavar="N",
                   help="channel block output counts are rounded up to in padded layers: auto (default: chosen by "
                        "the calibration networks among 1, 8, 16 and 32), or a number (1: no padding)")
    p.add_argument("--out", required=True, metavar="FILE", help="HDF5 file to write the model to")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(func=run)


def check_out(out: str, force: bool) -> None:
    """--out before a minute of measuring: a file name in an existing folder, not an existing file unless
    ``force``."""
    import os

    from nps.pipeline.errors import NpsError

    folder = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out):
        raise NpsError(f"--out {out} is a directory; give a file name, e.g. {os.path.join(out, 'latency.h5')}")
    if not os.path.isdir(folder):
        raise NpsError(f"--out {out}: no folder {folder}; create it first, or choose another --out")
    if os.path.exists(out) and not force:
        raise NpsError(f"{out} exists; pass --force to overwrite it")


def run(args) -> int:
    import time

    from nps.pipeline.deploy.latency_model import measure_latency_model
    from nps.pipeline.errors import NpsError
    from nps.pipeline.views.console import make_console

    check_out(args.out, args.force)
    block = None if args.block == "auto" else (int(args.block) if str(args.block).isdigit() else 0)
    if block is not None and block < 1:
        raise NpsError(f"--block {args.block}: use auto or a positive channel block (1: no padding)")
    for flag, value in (("--resolution", args.resolution), ("--classes", args.classes),
                        ("--batch", args.batch), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise NpsError(f"{flag} {value}: use a positive integer")
    console = make_console()
    started = time.perf_counter()
    status = console.status("building the network", spinner="dots") if console.is_terminal \
        else contextlib.nullcontext()
    with status as spinner:
        def progress(i, n, what):
            if spinner is not None:
                spinner.update(f"timing {what} ({i + 1}/{n})")

        model = measure_latency_model(args.model, args.resolution, num_classes=args.classes,
                                      in_channels=args.in_channels, mode=args.mode, device=args.device,
                                      batch=args.batch, threads=args.threads, precision=args.precision,
                                      block=block, progress=progress)
    model.save(args.out)
    console.print(layer_table(model))
    console.print(calibration_table(model))
    padded, padded_in = int(model.padded.sum()), int(model.padded_in.sum())
    blocks = f"output counts in blocks of {model.block} in {padded} of {len(model.layers)} layers" if padded else \
        "no layer padded"
    if padded:
        blocks += f", input counts too in {padded_in}" if padded_in else ", input counts not padded"
    ts = model.term_scale * model.scale
    one_scale = all(model.term_scale == 1.0)
    summed = f"{model.scale:.3f} x sum of layers" if one_scale else \
        f"sum of layers with a x {ts[0]:.2f}, b x {ts[1]:.2f}, c x {ts[2]:.2f}, d x {ts[3]:.2f}"
    offset = f"{1e3 * model.offset:.3f} ms + " if one_scale or model.offset > 0 else ""  # else a's scale holds it
    console.print(f"{len(model.layers)} layers on {model.device} ({model.device_name}), batch {model.batch}, "
                  f"{model.precision}, {blocks}: network = {offset}{summed}, network error "
                  f"{100 * model.network_error:.1f} % (RMS over "
                  f"{len(model.calibration['measured_s'])} calibration networks); measured in "
                  f"{time.perf_counter() - started:.0f} s; wrote {args.out}")
    return 0


def layer_table(model):
    """One line per layer: its kind, base counts, grid points, time at its base width and the fit's error."""
    import numpy as np
    from rich.table import Table

    t = Table(title=f"latency model of {model.model} at {model.resolution} px: per layer (ms at batch {model.batch})")
    for name in ("layer", "kind", "cin→cout", "points", "measured", "fitted", "fit error"):
        t.add_column(name, justify="left" if name in ("layer", "kind") else "right", no_wrap=True)
    for i, name in enumerate(model.layers):
        kind = "depthwise" if model.depthwise[i] else (f"groups {model.groups[i]}" if model.groups[i] > 1 else "")
        if model.padded[i]:
            kind = f"{kind}, padded to {model.block}" if kind else f"padded to {model.block}"
        cells = [name, kind]
        grid = model.grid.get(name) if model.grid else None
        if grid is not None and len(grid):
            cin, cout, seconds = grid[np.lexsort((grid[:, 1], grid[:, 0]))[-1]]
            cells += [f"{int(cin)}→{int(cout)}", str(len(grid)), f"{1e3 * seconds:.3f}",
                      f"{1e3 * model.layer_seconds(i, cin, cout):.3f}"]
        else:
            cells += ["", "", "", ""]
        t.add_row(*cells, f"{100 * model.fit_error[i]:.1f} %")
    return t


def calibration_table(model):
    """One line per calibration network: how it was pruned and the fraction of channels it keeps, measured and
    predicted ms, error, IQR/median (a pruned copy's: of its ratio to the base)."""
    from rich.table import Table

    cal = model.calibration
    t = Table(title="whole networks: the base, then pruned copies timed paired with it; measured and predicted "
                    "(offset + scale x sum of layers)")
    for name in ("pruned", "channels kept", "measured ms", "predicted ms", "error", "IQR/median"):
        t.add_column(name, justify="right", no_wrap=True)
    at_random = cal.get("pruned_at_random", [0.0] * len(cal["measured_s"]))  # files before it: uniform copies
    rows = zip(cal["keep_fraction"], cal["measured_s"], cal["predicted_s"], cal["iqr_over_median"], at_random)
    for i, (f, m, p, noise, random) in enumerate(rows):
        how = "base" if i == 0 else ("at random" if random else "uniformly")
        t.add_row(how, f"{f:.2f}", f"{1e3 * m:.3f}", f"{1e3 * p:.3f}", f"{100 * (p - m) / m:+.1f} %",
                  f"{100 * noise:.1f} %")
    return t

