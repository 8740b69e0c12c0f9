"""`nps run EXPERIMENT`: an experiment end to end (base network, sampling, pruning, retraining), resumable."""
from __future__ import annotations

import argparse
import shlex
import sys

EPILOG = """\
EXPERIMENT is a TOML file or the name of a preset (`nps presets` lists them). Running the same command again
resumes: finished subnetworks are kept, the ones in flight when the run stopped are redone.

examples:
  nps run demo --out runs/demo
  nps run demo --print-config > my.toml        # every key with its default, commented
  nps run my.toml --devices 0,1 --set retrain.epochs=10
  nps run my.toml --ray                        # on the Ray cluster of RAY_ADDRESS (else a local Ray)
  nps run my.toml --ray 10.0.0.1:6379          # on the Ray cluster whose head is there
  nps status runs/demo/results.h5             # from another terminal, while it runs
"""


def register(sub) -> None:
    p = sub.add_parser("run", help="run an experiment end to end (resumable)",
                       description="Train or load the base network, sample every space, prune, adaptive-BN score, "
                                   "retrain in cohorts and store every subnetwork in DIR/results.h5.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", metavar="EXPERIMENT", help="a TOML file or a preset name")
    p.add_argument("--out", metavar="DIR", help="output directory (overrides experiment.out)")
    p.add_argument("--devices", metavar="LIST",
                   help="auto, cpu, or GPU indices like 0,1: one worker process per device (overrides "
                        "experiment.devices)")
    p.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                   help="run on a Ray cluster: one worker per GPU of every node (auto: RAY_ADDRESS, else a local "
                        "Ray; or HOST:PORT of the head node); overrides experiment.ray")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override one setting, e.g. retrain.epochs=5 or spaces.n=10 (repeatable)")
    p.add_argument("--retry-failed", action="store_true", help="run failed subnetworks again")
    p.add_argument("--print-config", action="store_true", help="print the experiment as TOML and exit")
    p.add_argument("--plain", action="store_true", help="plain log lines even on a terminal")
    p.set_defaults(func=run)


def resume_command(args) -> str:
    parts = ["nps", "run", args.experiment]
    if args.out:
        parts += ["--out", args.out]
    if args.devices:
        parts += ["--devices", args.devices]
    if args.ray:
        parts += ["--ray"] + ([args.ray] if args.ray != "auto" else [])
    for item in args.overrides:
        parts += ["--set", item]
    return shlex.join(parts)


def run(args) -> int:
    import logging

    from nps.pipeline.errors import NpsError
    from nps.pipeline.experiment.checks import check_ray_address, parse_devices
    from nps.pipeline.experiment.config import load_config
    from nps.pipeline.experiment.plan import validate
    from nps.pipeline.experiment.toml_text import dump
    from nps.pipeline.views.console import make_console
    from nps.pipeline.views.status import results_table
    from nps.pipeline.views.terminal import LiveView, PlainView
    from nps.pipeline.words import plural

    cfg = load_config(args.experiment, args.overrides, out=args.out)
    if args.print_config:
        sys.stdout.write(dump(cfg, comments=True))
        return 0
    devices = parse_devices(args.devices) if args.devices else None
    if args.ray is not None:
        if args.devices:
            raise NpsError("--devices and --ray: choose one (on Ray every GPU of the cluster gets a worker)")
        check_ray_address(args.ray)
    if args.ray is not None or cfg.experiment.ray:
        from nps.pipeline.run.ray_pool import probe_address, require_ray

        key = "--ray" if args.ray is not None else "experiment.ray"
        require_ray(key)
        probe_address(args.ray if args.ray is not None else cfg.experiment.ray, key)  # seconds, not ray.init's minutes
    plan = validate(cfg, devices)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from nps.pipeline.run import run_experiment

    console = make_console()
    view = LiveView(console) if console.is_terminal and not args.plain else PlainView()
    try:
        outcome = run_experiment(plan, view, devices=devices, ray=args.ray, retry_failed=args.retry_failed)
    except KeyboardInterrupt:  # before training started (sampling); nothing half-written is left
        print(f"interrupted; resume with: {resume_command(args)}", file=sys.stderr, flush=True)
        return 130
    # from the file, as `nps status` shows it (the run's in-memory top-1s are float64, the file's float32)
    console.print(results_table(outcome.results_path, title=f"{cfg.experiment.name}: {outcome.results_path}"))
    if outcome.status == "interrupted":
        print(f"interrupted: {plural(outcome.done, 'row')} done, {outcome.pending} pending; resume with: "
              f"{resume_command(args)}", file=sys.stderr, flush=True)
        return 130
    print(f"finished in {outcome.elapsed_s:.0f}s: {outcome.done} done, {outcome.failed} failed; "
          f"nps status {outcome.results_path}", flush=True)
    return 0
