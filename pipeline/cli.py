"""The `nps` command: one subcommand per module in nps.pipeline.commands.

Each command module defines ``register(subparsers)`` which adds its parser and sets ``func`` (called with the parsed
namespace, returns an exit code). Library code never prints; commands own the terminal (rich).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from nps.pipeline import __version__
from nps.pipeline.errors import environment_error, user_errors

# Errors that mean bad input, not a bug: printed as one line, exit status 2. Anything else is a bug and shows its
# traceback (exit status 1); `nps --debug` shows the traceback of bad input too.
USER_ERRORS = user_errors()

# Order here is the order `nps --help` lists them.
COMMANDS = ["convert", "sample", "run", "status", "report", "export", "latency", "latency-model", "table", "presets"]

DESCRIPTION = """\
nps - network pruning spaces.

Sample populations of pruned subnetworks of a trained CNN (any network torch.fx traces: ResNets, MobileNets,
EfficientNets, timm models) under tight FLOPs or Params constraints, pruning its filters or its weights; fine-tune
them in cohorts, store every subnetwork's metrics in HDF5 and analyse the population (accuracy-drop EDFs, mCB).

typical session:
  nps convert fashion-mnist --out data/fmnist        # once per dataset
  nps sample --model resnet56 --mode all --resolution 32 --classes 10 \\
             --space std-0.05 --c-flops 0.25 -n 100 --out recipes.h5
  nps run demo --out runs/demo                       # a whole experiment
"""


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line too (argparse prints the whole usage first); subcommands inherit the class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nps", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"nps {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of every error, and debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"nps.pipeline.commands.{name.replace('-', '_')}").register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.debug:
        import logging

        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        # One line naming the input and what to do; no traceback for bad input.
        if args.debug:
            import traceback

            traceback.print_exc()
        print(f"nps {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as exc:
        # The environment, not nps: a read-only or full filesystem, a path nps may not write. One line naming it.
        message = environment_error(exc)
        if message is None:
            raise
        if args.debug:
            import traceback

            traceback.print_exc()
        print(f"nps {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nps {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
