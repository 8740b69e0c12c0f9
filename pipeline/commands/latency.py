"""`nps latency`: time the base network and the subnetworks of a results file, and store the timings in it."""
from __future__ import annotations

import argparse
import contextlib

EPILOG = """\
Each network is timed in eval mode, in the run's memory format (channels_last) and precision ([retrain] amp as the
run resolved it on that device), on random input of the run's resolution: --warmup forwards, then --runs timed runs
(each long enough for the clock: at least 20 ms of back-to-back forwards); the median and interquartile range of the
time per forward are kept. The base network is timed first in the same session, and each subnetwork paired with it
(below), so each speed-up comes from one process. On the CPU one intra-op thread by default (--threads), as
the run steps each subnetwork: on cores shared with other work, more threads mostly measure OpenMP's waiting. Rows
whose fine-tuned weights are kept are timed with them, the others as their architecture alone (a freshly
initialised base pruned to the row's keep counts). Weight spaces are not timed: their masked weights run at the
dense base network's speed.

Every network is timed in --passes passes over them all (default 3: the first in file order, the others each in a
shuffled order) and keeps its least median: other work and a virtual machine's slower spells only add time, and the
shuffle spreads a slow spell over different networks in each pass. Each subnetwork is timed paired with the base
network: its runs interleaved with the base's (base, row, row, base, ...), each divided by the base's run beside it;
the median ratio (the middle one of the passes') is its latency relative to the base, and its speed-up the
reciprocal. A slower spell lengthens both runs of a pair alike and cancels in their ratio, where timings taken apart
carry it (on a virtual machine whose speed moves by a third within minutes, docs/study-latency.md). Pairing doubles
the time a session takes; --unpaired times each network alone and divides the medians. On the CPU with one thread
each network is timed in a child process forked for it, so that every network starts from the same process state:
in one process, a MobileNetV2 subnetwork measured 6 % slower relative to its base once some 50 other subnetworks had
run there (oneDNN's kernel cache and the heap keep what they left; the session records it as isolation). The
table shows each timing's noise, IQR/median; a timing above 5 % is taken again (twice at most, the least noisy
kept), and a line warns when some still exceed 10 % (a shared or busy machine, or more threads than free cores):
their speed-ups are unreliable, time again with fewer threads on a quiet machine. A results file with a latency
model (c_latency regimes, nps latency-model) is timed at the model's device, batch and threads unless told
otherwise, so that nps report can set each row's predicted latency against its measured one.

The timings go into RESULTS.h5 under /latency/<device> (with the device's name, the thread count and the library
versions); nps report draws them and nps table adds them as columns. A run holding the file refuses this command:
measure after it, or set [output] latency = true to measure at the end of the run.

examples:
  nps latency runs/demo/results.h5                          # every finished row, batch 1 and 64, on the CPU
  nps latency runs/demo/results.h5 --space std-0.05 --batch 1 --threads 0  # all of torch's threads
  nps latency runs/demo/results.h5 --all-rows --device cuda # also rows not trained (the architecture suffices)
"""


def register(sub) -> None:
    p = sub.add_parser("latency", help="time the subnetworks of a results file and store the timings in it",
                       description="Measure the latency (median and interquartile range over repeated timed runs) "
                                   "of the base network and of the subnetworks of a results file, and the speed-up "
                                   "of each over the base, in one session; store them in the file.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", metavar="RESULTS.h5", help="results file written by nps run (or nps sample)")
    p.add_argument("--space", action="append", metavar="S",
                   help="a space key (std-0.05@c_flops=0.25), or its space part if unique; repeatable "
                        "(default: every space)")
    p.add_argument("--device", default=None,
                   help="cpu or cuda (default cpu; a file with a latency model: the model's device)")
    p.add_argument("--batch", default=None, metavar="LIST",
                   help="batch sizes (default 1,64; a file with a latency model: the model's batch, so that "
                        "the report can set predicted against measured)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads on the CPU (default 1, as the run steps each subnetwork; a file with "
                        "a latency model: the model's; 0: torch's default, the machine's cores)")
    p.add_argument("--all-rows", action="store_true",
                   help="every row, also those not trained yet (default: the finished rows)")
    p.add_argument("--missing", action="store_true", help="only rows this device has no timing of yet")
    p.add_argument("--runs", type=int, default=20, help="timed runs per network and batch (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed forwards first (default 5)")
    p.add_argument("--passes", type=int, default=None,
                   help="passes over all the networks, each after the first in a shuffled order; each network keeps "
                        "its least median (default 3; 1: one timing each, in file order)")
    p.add_argument("--unpaired", action="store_true",
                   help="time each subnetwork alone, its speed-up the base median over its median (half the time; "
                        "default: paired with the base network, run by run)")
    p.set_defaults(func=run)


def run(args) -> int:
    import os

    from nps.pipeline.views.console import make_console

    from nps.pipeline.errors import NpsError
    from nps.pipeline.deploy.latency import TimingOptions, measure_results
    from nps.pipeline.results.latency import noise_warning, parse_batches, store_latency

    if not os.path.exists(args.results):
        raise NpsError(f"{args.results}: no such file")
    if args.runs < 3:
        raise NpsError(f"--runs {args.runs}: use at least 3 (the interquartile range needs them)")
    from nps.pipeline.deploy.latency import DEFAULT_PASSES

    if args.passes is not None and args.passes < 1:
        raise NpsError(f"--passes {args.passes}: use 1 or more")
    passes = DEFAULT_PASSES if args.passes is None else args.passes
    if args.warmup < 0 or (args.threads or 0) < 0:
        raise NpsError("--warmup and --threads: use 0 or more")
    _model_defaults(args)
    batches = parse_batches(args.batch)
    console = make_console()
    status = console.status("timing", spinner="dots") if console.is_terminal else contextlib.nullcontext()
    with status as spinner:
        def progress(i, n, target):
            if spinner is not None:
                what = "the base network" if target.row < 0 else f"{target.space} row {target.row}"
                which = f", pass {i // max(1, n // passes) + 1} of {passes}" if passes > 1 else ""
                spinner.update(f"timing {what} ({i + 1}/{n}{which})")

        options = TimingOptions(batches=batches, threads=args.threads, warmup=args.warmup, runs=args.runs,
                                passes=passes, paired=not args.unpaired)
        session = measure_results(args.results, spaces=args.space, device=args.device, options=options,
                                  all_rows=args.all_rows, only_missing=args.missing, progress=progress)
    if not session["records"]:
        console.print(f"nothing to time: every {'' if args.all_rows else 'finished '}row of "
                      f"{', '.join(args.space) if args.space else 'the file'} is timed on {session['device']} already")
        return 0
    store_latency(args.results, session)
    console.print(latency_table(args.results, session))
    s = session["settings"]
    if session["untimed"]:
        console.print(f"[yellow]note:[/yellow] {', '.join(session['untimed'])} not timed: weight spaces run at the "
                      "dense base network's speed (masked weights; dense kernels skip no zero weight)")
    if len(session["records"]) == len(batches) and not args.all_rows and session["spaces"]:
        console.print("[yellow]note:[/yellow] no finished rows to time (--all-rows times every row by its "
                      "architecture)")
    noisy = noise_warning(session)
    if noisy:
        console.print(f"[yellow]warning:[/yellow] {noisy}")
    paired = "each paired with the base network" if s.get("paired") else "unpaired"
    console.print(f"{_plural(len(session['records']) // len(batches) - 1, 'subnetwork')} ({paired}) and the base "
                  f"network on {session['device']} ({s['device_name']}), {_plural(s['threads'], 'thread')}, "
                  f"amp {s['amp']}, "
                  f"channels_last {s['channels_last']}, torch {s['versions']['torch']}; stored in {args.results} "
                  f"under /latency/{session['device']}")
    return 0


def _model_defaults(args) -> None:
    """Device, batch and threads not given: the latency model's when the file has one (the setting its predictions
    are for), else cpu, 1 and 64, one thread."""
    from nps.pipeline.results.reader import open_readonly

    with open_readonly(args.results) as reader:
        model = reader.latency_model()
    if model is not None and (args.device is None or args.device.startswith(model.device)):
        args.device = args.device or model.device
        args.batch = args.batch or str(model.batch)
        args.threads = model.threads if args.threads is None else args.threads
    args.device, args.batch = args.device or "cpu", args.batch or "1,64"
    args.threads = 1 if args.threads is None else args.threads


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun if n == 1 else noun + 's'}"


def latency_table(results, session: dict):
    """One line per network: its space, row, c_flops and top-1, and per batch the median, IQR, IQR / median (in
    yellow above the noise limit) and speed-up (a paired timing's: the reciprocal of its median ratio to the base,
    with that ratio's IQR / median in a column of its own)."""
    import math

    from rich.table import Table

    from nps.pipeline.results.latency import NOISE_LIMIT
    from nps.pipeline.results.reader import open_readonly

    records = session["records"]
    batches = session["settings"]["batches"]
    paired = any(r.get("paired") is not None for r in records)
    info = {}
    with open_readonly(results) as reader:
        for space in {r["space"] for r in records if r["row"] >= 0}:
            cols = reader.read(space, ["c_flops", "top1"])
            info[space] = cols
    base = {r["batch"]: r["timing"].median_s for r in records if r["row"] < 0}
    t = Table(title=f"latency on {session['device']}: median and interquartile range per forward (ms)")
    for name in ("space", "row", "c_flops", "top-1"):
        t.add_column(name, justify="left" if name == "space" else "right", no_wrap=True)
    for b in batches:
        t.add_column(f"b{b} median", justify="right")
        t.add_column(f"b{b} IQR", justify="right")
        t.add_column(f"b{b} IQR/med", justify="right")
        t.add_column(f"b{b} speed-up", justify="right")
        if paired:
            t.add_column(f"b{b} ratio IQR/med", justify="right")
    lines: dict[tuple, dict] = {}
    for r in records:
        lines.setdefault((r["space"], r["row"]), {})[r["batch"]] = r

    def percent(noise: float) -> str:
        text = f"{100 * noise:.1f} %"
        return f"[yellow]{text}[/yellow]" if noise > NOISE_LIMIT else text

    for (space, row), by_batch in lines.items():
        if row < 0:
            cells = ["base network", "", "1.0000", ""]
        else:
            top1 = float(info[space]["top1"][row])
            cells = [space, str(row), f"{float(info[space]['c_flops'][row]):.4f}",
                     f"{top1:.2f}" if math.isfinite(top1) else "–"]
        for b in batches:
            tm, pair = by_batch[b]["timing"], by_batch[b].get("paired")
            speedup = 1.0 / pair.ratio if pair is not None else base[b] / tm.median_s
            cells += [f"{1e3 * tm.median_s:.3f}", f"{1e3 * tm.iqr_s:.3f}", percent(tm.noise), f"{speedup:.2f}×"]
            if paired:
                cells.append(percent(pair.noise) if pair is not None else "")
        t.add_row(*cells)
    return t
