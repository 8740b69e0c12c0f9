"""`nps sample`: draw recipes of one or more pruning spaces and write them to an HDF5 file (status 0)."""
from __future__ import annotations

import argparse
import contextlib
import os

from nps.kernels.defaults import DEFAULT_DELTA, DEFAULT_R
from nps.pipeline.catalog import CIFAR_MODELS, FLOPS_CONVENTIONS, TESTED_TORCHVISION
from nps.pipeline.errors import NpsError

EPILOG = """\
spaces (filter pruning: a recipe is one pruning ratio per channel group of the layer table):
  uniform         r_i ~ U[0, R] i.i.d. (the initial space; nearly empty below c_flops ~0.3)
  std-<sigma>     uniform ratio meeting the target + N(0, sigma) per group, std(r) in [0.5, 1.5]*sigma
  mcb-<lo>-<hi>   the same noise with sigma 0.1, no std band, mCB in [lo, hi] (paper section 4)

weight spaces (unstructured pruning: a recipe is one sparsity per conv and linear layer, counted on the weight
table; the layer's weights of smallest magnitude are masked):
  weights:std-<sigma>     the std space over layer sparsities (e.g. weights:std-0.05)
  weights:mcb-<lo>-<hi>   the mCB-refined space over layer sparsities
  weights:uniform, weights:global   one recipe each, not a distribution (the same sparsity in every layer; one
                  magnitude threshold across layers, which needs the trained base weights): use them in nps run

memory: every space's recipes are held until --out is written (about 24 bytes per recipe and group); a -n whose
recipes cannot fit in the memory available is refused before anything is drawn.

example:
  nps sample --model resnet50 --mode all --resolution 224 --classes 10 \\
             --space std-0.01 --c-flops 0.1 -n 1000 --seed 0 --out recipes.h5
"""


def register(sub) -> None:
    p = sub.add_parser("sample", help="draw recipes of pruning spaces into an HDF5 file",
                       description="Draw n distinct recipes per space, each meeting the target within ±delta on "
                                   "integer channel counts, and write /layers and /spaces/<space>@<target>=<value> "
                                   "rows (status 0, pending) to --out.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="base network: a torchvision classification model (tested: "
                        f"{', '.join(TESTED_TORCHVISION)}), a CIFAR ResNet ({', '.join(CIFAR_MODELS)}), "
                        "timm:<name>, or package.module:function (your own, taking num_classes and in_channels)")
    p.add_argument("--mode", choices=["internal", "all"], default="all",
                   help="all (default): every group but the image and the classes; internal: only channels "
                        "inside one block (bottleneck convs, expanded channels, squeeze-excitation)")
    p.add_argument("--channel-multiple", type=int, default=1, metavar="M",
                   help="keep channel counts in multiples of M where the width allows (e.g. 8; default 1)")
    p.add_argument("--flops", choices=list(FLOPS_CONVENTIONS), default="macs",
                   help="FLOPs convention: macs (conv+linear multiply-accumulates, default) or paper (ptflops' "
                        "count with BN, ReLU and pooling, what the paper reports)")
    p.add_argument("--resolution", type=int, required=True, help="input resolution FLOPs are counted at")
    p.add_argument("--classes", type=int, default=10, help="classifier outputs (default 10)")
    p.add_argument("--in-channels", type=int, default=3, choices=[1, 3])
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--c-flops", type=float, help="target FLOPs(sub)/FLOPs(base)")
    target.add_argument("--c-params", type=float, help="target Params(sub)/Params(base)")
    target.add_argument("--c-latency", type=float,
                        help="target predicted latency(sub)/latency(base), by --latency-model (filter spaces)")
    p.add_argument("--latency-model", metavar="FILE",
                   help="a latency model of this network (nps latency-model): needed by --c-latency; with another "
                        "target it adds each recipe's predicted latency")
    p.add_argument("--space", action="append", required=True,
                   help="uniform, std-<sigma>, mcb-<lo>-<hi>, or a weight space weights:std-<sigma> or "
                        "weights:mcb-<lo>-<hi> (see below); repeat for several")
    p.add_argument("-n", type=int, default=100, help="recipes per space (default 100)")
    p.add_argument("--delta", type=float, default=DEFAULT_DELTA, help=f"tolerance (default {DEFAULT_DELTA})")
    p.add_argument("--max-ratio", "-R", type=float, default=DEFAULT_R, dest="R",
                   help=f"largest pruning ratio of a group (default {DEFAULT_R})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=600.0,
                   help="give up on a space whose estimated sampling time exceeds this (default 600)")
    p.add_argument("--out", required=True, help="HDF5 file to write")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from nps.pipeline.views.console import make_console

    from nps.pipeline.results.h5file import writer_lock

    console = make_console()
    if args.n < 1:
        raise NpsError(f"-n {args.n}: ask for at least one recipe")
    if os.path.isdir(args.out):
        raise NpsError(f"--out {args.out} is a directory; give a file name, e.g. {os.path.join(args.out, 'recipes.h5')}")
    if os.path.exists(args.out) and not args.force:
        raise NpsError(f"{args.out} exists; pass --force to overwrite it")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    # The results file's one-writer rule holds for a file replaced too: refused while a run writes it, and no run
    # can start on it until it is written.
    with writer_lock(args.out):
        return _sample(args, console)


def _sample(args, console) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from nps.kernels.spaces import TARGETS, parse_space
    from nps.pipeline.experiment.sampling import check_recipes_fit, sample_rows
    from nps.pipeline.network.layer_table import build_layer_table
    from nps.pipeline.files import atomic_path
    from nps.pipeline.results.store import ResultsStore

    target, value = next((t, getattr(args, t)) for t in TARGETS if getattr(args, t) is not None)
    if target == "c_latency" and not args.latency_model:
        raise NpsError("--c-latency needs --latency-model FILE: measure one with nps latency-model --model "
                       f"{args.model} --resolution {args.resolution} --out FILE")
    latency_model = None
    if args.latency_model:
        from nps.pipeline.network.latency_model import LatencyModel

        latency_model = LatencyModel.load(args.latency_model)
    table = build_layer_table(args.model, args.mode, args.resolution, args.classes, args.in_channels,
                              flops=args.flops, channel_multiple=args.channel_multiple, latency_model=latency_model)
    spaces = [parse_space(name, target, value, delta=args.delta, R=args.R) for name in args.space]
    if len({s.regime for s in spaces}) != len(spaces):
        raise NpsError("--space: each space may be given once")
    one_recipe = [s.name for s in spaces if s.deterministic]
    if one_recipe:
        raise NpsError(f"--space {one_recipe[0]}: one recipe, not a distribution (weights:global needs the trained "
                       "base network's weights); sample it in an experiment (nps run)")
    weight_table = None
    if any(s.pruning == "weights" for s in spaces):
        from nps.pipeline.network.weight_table import build_weight_table

        weight_table = build_weight_table(args.model, args.resolution, args.classes, args.in_channels,
                                          flops=args.flops)

    check_recipes_fit([(args.n, len(_table_of(space, table, weight_table).channels), 0) for space in spaces],
                      f"-n {args.n}", "lower -n")

    results = []
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal) as bar:
        for space in spaces:
            task = bar.add_task(space.name, total=args.n)
            rows, attrs, sample = sample_rows(_table_of(space, table, weight_table), space,
                                              args.n, args.seed, max_seconds=args.max_seconds,
                                              progress=lambda done, n, t=task: bar.update(t, completed=done))
            results.append((space, rows, attrs, sample))

    # Write everything to a temporary name, then rename: never a half-written --out.
    with atomic_path(args.out) as tmp:
        try:
            config = f"# nps sample\n{vars_to_toml(args)}"
            store = ResultsStore.create(str(tmp), table, config, {"base_flops": table.base_flops,
                                                                  "base_params": table.base_params},
                                         overwrite=True, weight_table=weight_table,
                                         latency_model=latency_model)
            try:
                for space, rows, attrs, _ in results:
                    store.add_space(space.regime, rows, epochs=0, attrs=attrs)
                store.flush()
            finally:
                store.close()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(f"{tmp}.lock")

    console.print(summary_table([_table_of(space, table, weight_table) for space, *_ in results], results))
    console.print(f"wrote {args.out}")
    return 0


def _table_of(space, table, weight_table):
    """The table a space's recipes are drawn on: its pruning kind's (the weight table for a weight space)."""
    from nps.pipeline.network.pruning_kind import kind_of

    return kind_of(space.name).table(table, weight_table)


def vars_to_toml(args) -> str:
    """The settings that drew the file, as TOML (tomli-w: quotes and backslashes in a model path survive)."""
    from nps.pipeline.experiment.toml_text import toml_lines

    keep = ("model", "mode", "resolution", "classes", "in_channels", "channel_multiple", "flops", "c_flops",
            "c_params", "c_latency", "latency_model", "space", "n", "delta", "R", "seed")
    return toml_lines({key: getattr(args, key, None) for key in keep})


def _span(x) -> str:
    return f"{x.min():.4f} – {x.max():.4f}"


def summary_table(tables, results):
    """One column per space, one row per quantity (fits a narrow terminal): a rich Table, titled by the tables the
    spaces were drawn on (``tables``, one per space: the layer table's groups, the weight table's layers)."""
    from rich.table import Table

    t = Table(title="; ".join(dict.fromkeys(table.describe() for table in tables)))
    t.add_column("")
    for space, *_ in results:
        t.add_column(space.regime, justify="right", overflow="fold")
    samples = [s for *_, s in results]
    t.add_row("n", *[f"{len(s):,}" for s in samples])
    rows = [("c_flops", "c_flops"), ("c_params", "c_params"), ("std(r)", "std"), ("mCB", "mcb")]
    if any(s.c_latency is not None for s in samples):
        rows.insert(2, ("c_latency (predicted)", "c_latency"))
    for label, key in rows:
        t.add_row(label, *[_span(getattr(s, key)) if getattr(s, key) is not None else "–" for s in samples])
    t.add_row("recipes/s", *[f"{s.stats['recipes_per_s']:,.0f}" for s in samples])
    t.add_row("accepted", *[f"{s.stats['accepted'] / s.stats['proposals']:.3g} of proposals" for s in samples])
    t.add_row("kernel", *[s.stats.get("kernel", "–") for s in samples])
    return t
