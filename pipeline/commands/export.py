"""`nps export`: one trained subnetwork of a results file as a self-contained checkpoint, optionally re-evaluated."""
from __future__ import annotations

import argparse
import contextlib

EPILOG = """\
The fine-tuned weights come from weights/<space>/<row>.pt beside RESULTS.h5 (kept by nps run for the best rows of
each space). The export holds the weights, recipe, keep counts, architecture, resolution and the run's config:

  from nps.pipeline import load_subnetwork
  model = load_subnetwork("winner.pt")        # an nn.Module; no base checkpoint needed

--verify re-evaluates it on the val split of the run's dataset (config [dataset] dir, or --data DIR) and checks
that top-1 equals the stored one: the same number of correct images unless --tolerance says otherwise.

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
    p.add_argument("--data", metavar="DIR", help="converted dataset for --verify (default: config [dataset] dir)")
    p.add_argument("--device", default="cpu", help="device for --verify (default cpu: deterministic float32)")
    p.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"], default=None,
                   help="autocast for --verify (default: the run's [retrain] amp; auto is off on the CPU)")
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
    from nps.pipeline.results.export import export_info, save_atomic, subnetwork_checkpoint

    console = make_console()
    ckpt = None
    if not os.path.exists(args.source):
        raise NpsError(f"{args.source}: no such file")
    is_results = h5py.is_hdf5(args.source)
    if is_results:
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
            from nps.pipeline.results.onnx_export import require_onnx

            require_onnx()  # before any work
        ckpt, note = subnetwork_checkpoint(args.source, args.space, row=args.row, best=args.best)
        info = export_info(ckpt, note, save_atomic(ckpt, args.out) if args.out else None)
        if args.onnx:
            from nps.pipeline.results.onnx_export import export_onnx

            info["onnx"] = export_onnx(ckpt, args.onnx)
        if info["note"]:
            console.print(f"[yellow]note:[/yellow] {info['note']}")
        console.print(f"wrote {' and '.join(p for p in (args.out, args.onnx) if p)}: {info['model']} "
                      f"({info['mode']}, {info['resolution']} px) "
                      f"{info['space']} row {info['row']}, top-1 {info['top1']:.2f} % "
                      f"(drop {info['acc_drop']:.2f} pp), c_flops {info['c_flops']:.4f}, "
                      f"c_params {info['c_params']:.4f}, mCB {info['mcb']:.3f}")
        if args.onnx:
            o = info["onnx"]
            console.print(f"ONNX: opset {o['opset']} ({o['exporter']} exporter), input {o['input'][0]} "
                          f"(batch, {', '.join(map(str, o['input'][2:]))}) with a dynamic batch axis, output "
                          f"{o['output'][0]} (batch, {o['output'][2]})")
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
    if args.batch_size is not None and args.batch_size < 1:
        raise NpsError(f"--batch-size {args.batch_size}: use at least 1")
    if target is None:
        return _verify_onnx(console, args, args.onnx, ckpt)
    code = _verify_pt(console, args, target)
    if args.onnx:
        code = max(code, _verify_onnx(console, args, args.onnx, ckpt))
    return code


def _verify_pt(console, args, target) -> int:
    from nps.pipeline.results.verify import verify_subnetwork

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
    from nps.pipeline.errors import NpsError
    from nps.pipeline.results.onnx_export import verify_onnx

    if args.batch_size is not None and args.batch_size < 1:
        raise NpsError(f"--batch-size {args.batch_size}: use at least 1")
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
