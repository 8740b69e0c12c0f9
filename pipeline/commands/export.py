"""`nps export`: one trained subnetwork of a results file as a self-contained checkpoint, optionally re-evaluated."""
from __future__ import annotations

import argparse
import contextlib

EPILOG = """\
The fine-tuned weights come from weights/<space>/<row>.pt beside RESULTS.h5 (kept by nps run for the best rows of
each space). The export holds the weights, recipe, keep counts, architecture, resolution, the run's config and the
input's preprocessing: the network takes float32 N x C x H x W images normalised per channel as
(pixel - mean) / std, with the dataset's train mean and std on the 0-255 scale (not 0-1), at its input size and
channel order (RGB, or gray: BT.601 luma). The .pt holds it as "preprocessing"; the ONNX file in its metadata_props
(nps_preprocessing as JSON, and mean, std, scale, input_size, channel_order, layout, formula, val_transform):

  from nps.pipeline import load_subnetwork
  model = load_subnetwork("winner.pt")        # an nn.Module taking normalised input; no base checkpoint needed
  model = load_subnetwork("winner.pt", with_preprocessing=True)   # takes the images: uint8 or 0-255, NCHW

--verify re-evaluates it on the val split of the run's dataset (config [dataset] dir, or --data DIR) and checks
that top-1 equals the stored one: the same number of correct images unless --tolerance says otherwise. Everything
it needs is checked before the export is written: a missing dataset leaves no file behind.

--onnx FILE.onnx writes the same subnetwork as ONNX (opset 18, input "input" with a dynamic batch axis, output
"logits"; pip install 'nps[onnx]'); with --verify onnxruntime runs it on the val split (CPU, float32) and must count
the same correct images as the stored top-1 (as torch's float32 evaluation, when the run evaluated under autocast).

examples:
  nps export runs/demo/results.h5 --space std-0.01@c_flops=0.1 --best --out winner.pt --verify
  nps export runs/demo/results.h5 --space std-0.05 --row 17 --out row17.pt
  nps export --verify winner.pt --data data/fmnist       # check an existing export
  nps export runs/demo/results.h5 --space std-0.05 --best --onnx winner.onnx --verify
  nps export --verify winner.onnx                         # check an existing ONNX export
"""


def register(sub) -> None:
    p = sub.add_parser("export", help="save a trained subnetwork as a self-contained checkpoint",
                       description="Save one finished subnetwork of a results file (weights, recipe, keep counts, "
                                   "architecture, config) as a file that nps.pipeline.load_subnetwork turns back "
                                   "into an nn.Module.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="RESULTS.h5",
                   help="results file (or, with --verify and no --space, an export to check)")
    p.add_argument("--space", help="space group name (std-0.05@c_flops=0.25), or its space part if unique")
    pick = p.add_mutually_exclusive_group()
    pick.add_argument("--best", action="store_true", help="the finished row with the highest top-1 that has weights")
    pick.add_argument("--row", type=int, help="a row index of the space")
    p.add_argument("--out", metavar="FILE.pt", help="export file to write")
    p.add_argument("--onnx", metavar="FILE.onnx", help="also (or only) write the subnetwork as ONNX")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--verify", action="store_true", help="re-evaluate on the val split and compare with the stored "
                                                         "top-1 (exit status 1 when they differ)")
    p.add_argument("--data", metavar="DIR", help="the run's converted dataset, for --verify and for the "
                                                 "preprocessing of a results file that does not record its mean "
                                                 "and std (default: config [dataset] dir)")
    p.add_argument("--device", default="cpu", help="device for --verify (default cpu: deterministic float32)")
    p.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"], default=None,
                   help="autocast for --verify (default: the run's [retrain] amp; auto resolves as the run did on "
                        "the device: bf16 on a CPU with native bf16 instructions (AVX512-BF16, AMX) unless the "
                        "network has depthwise convs, else off; bf16, or fp16 without bf16 support, on a GPU)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="val batch size for --verify (default: the run's [dataset] val_batch_size)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="allowed |top-1 difference| in percentage points (default: half an image, i.e. the same "
                        "number of correct images)")
    p.set_defaults(func=run)


def run(args) -> int:
    import os

    import h5py
    from nps.pipeline.views.console import make_console

    from nps.pipeline.errors import NpsError

    console = make_console()
    ckpt = None
    if not os.path.exists(args.source):
        raise NpsError(f"{args.source}: no such file")
    if args.batch_size is not None and args.batch_size < 1:
        raise NpsError(f"--batch-size {args.batch_size}: use at least 1")
    if h5py.is_hdf5(args.source):
        ckpt = _export(console, args)
        target = args.out
    else:
        if args.source.endswith(".onnx") and args.verify and not (args.space or args.out or args.onnx):
            return _verify_onnx(console, args, args.source, None)
        if not args.verify or args.space or args.out or args.onnx:
            raise NpsError(f"{args.source} is not an HDF5 results file; to check an export, run "
                           f"nps export --verify {args.source}")
        target = args.source
    if not args.verify:
        return 0
    if target is None:
        return _verify_onnx(console, args, args.onnx, ckpt)
    code = _verify_pt(console, args, target)
    if args.onnx:
        code = max(code, _verify_onnx(console, args, args.onnx, ckpt))
    return code


def _check_request(args) -> None:
    """The command line of an export from a results file, checked before anything is computed."""
    import os

    from nps.pipeline.errors import NpsError

    if not args.space:
        raise NpsError("--space NAME is required to export from a results file")
    if not args.best and args.row is None:
        raise NpsError("choose the subnetwork: --best or --row I")
    if not args.out and not args.onnx:
        raise NpsError("--out FILE.pt (or --onnx FILE.onnx) is required")
    for flag, path in (("--out", args.out), ("--onnx", args.onnx)):
        if path and os.path.exists(path) and not args.force:
            raise NpsError(f"{flag} {path} exists; pass --force to overwrite it")
    if args.onnx:
        from nps.pipeline.deploy.onnx_export import require_onnx

        require_onnx()
    if args.verify:
        _check_device(args.device)


def _check_device(device: str) -> None:
    from nps.pipeline.training.devices import parse_device

    parse_device(device, then="verify on the CPU (--device cpu)")


def _export(console, args) -> dict:
    """Write the export (and/or its ONNX file) of one row; every check (the request, the row and its weights, the
    preprocessing, the dataset that --verify needs, the ONNX graph) comes before the first file is written."""
    from nps.pipeline.deploy.export import export_info, save_atomic, subnetwork_checkpoint

    _check_request(args)
    ckpt, note = subnetwork_checkpoint(args.source, args.space, row=args.row, best=args.best, data_dir=args.data)
    if args.verify:
        from nps.pipeline.deploy.verify import check_verifiable

        check_verifiable(ckpt, args.data, where=args.source)
    proto = None
    if args.onnx:
        from nps.pipeline.deploy.onnx_export import onnx_model

        proto, onnx_info = onnx_model(ckpt)
    info = export_info(ckpt, note, save_atomic(ckpt, args.out) if args.out else None)
    if proto is not None:
        from nps.pipeline.deploy.onnx_export import save_onnx

        info["onnx"] = {"onnx": str(save_onnx(proto, args.onnx)), **onnx_info}
    _print_export(console, args, info)
    return ckpt


def _print_export(console, args, info: dict) -> None:
    if info["note"]:
        console.print(f"[yellow]note:[/yellow] {info['note']}")
    console.print(f"wrote {' and '.join(p for p in (args.out, args.onnx) if p)}: {info['model']} "
                  f"({info['mode']}, {info['resolution']} px) "
                  f"{info['space']} row {info['row']}, top-1 {info['top1']:.2f} % "
                  f"(drop {info['acc_drop']:.2f} pp), c_flops {info['c_flops']:.4f}, "
                  f"c_params {info['c_params']:.4f}, mCB {info['mcb']:.3f}")
    pre = info["preprocessing"]
    console.print(f"input: {'x'.join(map(str, pre['input_size']))} {pre['channel_order']} {pre['layout']} float32, "
                  f"(pixel - mean) / std on the 0-255 scale, mean {_floats(pre['mean'])}, std {_floats(pre['std'])} "
                  "(stored in the export)", soft_wrap=True)
    if args.onnx:
        o = info["onnx"]
        console.print(f"ONNX: opset {o['opset']} ({o['exporter']} exporter), input {o['input'][0]} "
                      f"(batch, {', '.join(map(str, o['input'][2:]))}) with a dynamic batch axis, output "
                      f"{o['output'][0]} (batch, {o['output'][2]})")


def _floats(values) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def _verify_pt(console, args, target) -> int:
    from nps.pipeline.deploy.verify import verify_subnetwork

    spinner = console.status("evaluating on the val split", spinner="dots") if console.is_terminal else None
    with spinner or contextlib.nullcontext():
        result = verify_subnetwork(target, data_dir=args.data, device=args.device, batch_size=args.batch_size,
                                   tolerance=args.tolerance, amp=args.amp)
    diff = result["diff"] if abs(result["diff"]) >= 5e-5 else 0.0  # no "-0.0000" for float32 rounding
    line = (f"top-1 {result['top1']:.4f} % on {result['images']} val images; stored {result['stored_top1']:.4f} %; "
            f"difference {diff:+.4f} pp ({result['diff_images'] or 0:+d} images)")
    if result["ok"]:
        console.print(f"[green]verified:[/green] {line}")
        return 0
    console.print(f"[red]mismatch:[/red] {line}, tolerance {result['tolerance']:.4g} pp. If the run evaluated on a "
                  "GPU under autocast, verify the same way (--device cuda --amp bf16), or pass --tolerance.")
    return 1


def _verify_onnx(console, args, path, ckpt) -> int:
    """Run the ONNX file with onnxruntime on the val split; ``ckpt`` (right after exporting: the export with its
    weights) gives a float32 reference when the run evaluated under autocast."""
    from nps.pipeline.deploy.onnx_export import verify_onnx

    with console.status("running the ONNX model on the val split", spinner="dots") if console.is_terminal \
            else contextlib.nullcontext():
        result = verify_onnx(path, ckpt=ckpt, data_dir=args.data, batch_size=args.batch_size,
                             tolerance=args.tolerance)
    diff = "n/a" if result["diff_images"] is None else f"{result['diff_images']:+d} images"
    line = (f"{path} (onnxruntime, CPU float32): {result['correct']} of {result['images']} val images correct, "
            f"top-1 {result['top1']:.4f} %; reference {result['reference']}: {result['reference_correct']} correct; "
            f"difference {diff}")
    if result["ok"]:
        console.print(f"[green]verified:[/green] {line}")
        return 0
    console.print(f"[red]mismatch:[/red] {line}, tolerance {result['tolerance']:.4g} pp")
    return 1
