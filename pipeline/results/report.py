"""``nps report``: figures, ``index.html`` and ``summary.json`` from a results file (paper §3, Figures 2–5).

:func:`build_summary` reads results.h5 (read-only, SWMR: a file a run is still writing works) and returns the
analysis of :func:`nps.pipeline.results.analysis.summarize` plus what the file says about its model; :func:`render` draws
every figure from that summary alone, so ``summary.json`` holds every number a figure shows. :func:`write_report`
does both into a temporary directory and renames it into place: a report directory is never half written.

Rows that count: ``status == done`` with a finite top-1 and accuracy drop ("finished"). Pending and running rows are
counted and reported, failed rows are counted and excluded, done rows with a NaN score are counted (``nan``) and
excluded. A file with no finished row still gets ``summary.json`` (the counts) and an ``index.html`` that says so,
but no figures.
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np

from nps.kernels.spaces import BASELINE, RATIOS, continuous_form, parse_space_key
from nps.pipeline import __version__ as NPS_VERSION
from nps.pipeline.errors import NpsError, environment_error
from nps.pipeline.results.analysis import Population, regime_key, summarize
from nps.pipeline.results.curve_figures import render_curves
from nps.pipeline.results.figures import render
from nps.pipeline.results.latency import read_latency
from nps.pipeline.results.latency_figures import latency_summary, render_latency
from nps.pipeline.results.reader import DONE, FAILED, PENDING, RUNNING, open_readonly
from nps.pipeline.results.finetune_curves import finetune_curves, render_finetune_curves
from nps.pipeline.results.latency_prediction import prediction_summary, render_prediction
from nps.pipeline.results.reference_figures import render_references
from nps.pipeline.results.references import compare as compare_references
from nps.pipeline.results.references import cost as reference_cost
from nps.pipeline.results.report_html import render_html
from nps.pipeline.results.stats import DEFAULT_BAND, DEFAULT_BOOTSTRAP, DEFAULT_EDF_POINTS
from nps.pipeline.words import plural

log = logging.getLogger(__name__)

FORMAT = "nps-report-1"
_FIELDS = ("status", "top1", "acc_drop", "c_flops", "c_params", "mcb", "std", "flops", "params", "recipe", "keep")


# --------------------------------------------------------------------------------------------------------------------
# Reading.


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def space_regime(group: str, attrs) -> tuple[str, str, float]:
    """(space, target, value) of a space group: from its attributes, else parsed from its space key."""
    key = parse_space_key(group)
    space = _text(attrs["space"]) if "space" in attrs else (key.label if key else group)
    if "target" in attrs and "value" in attrs:
        return space, _text(attrs["target"]), float(attrs["value"])
    if key:
        return space, key.target, key.value
    return space, "unspecified", math.nan


def read_population(reader, group: str) -> Population:
    """The finished rows of one space and the counts of all its rows."""
    g = reader.file["spaces"][group]
    space, target, value = space_regime(group, g.attrs)
    cols = reader.read(group, _FIELDS)  # status first: a row done in this snapshot has its values on disk
    # A run may append rows between two column reads: look only at the rows every column already has.
    n = min(len(c) for c in cols.values())
    status = cols["status"][:n]
    appended = len(cols["status"]) - n
    cols = {name: c[:n] for name, c in cols.items()}
    done = status == DONE
    finite = np.isfinite(cols["top1"].astype(np.float64)) & np.isfinite(cols["acc_drop"].astype(np.float64))
    ok = done & finite
    counts = {"total": int(n + appended), "pending": int(np.count_nonzero(status == PENDING) + appended),
              "running": int(np.count_nonzero(status == RUNNING)), "done": int(np.count_nonzero(done)),
              "failed": int(np.count_nonzero(status == FAILED)), "nan": int(np.count_nonzero(done & ~finite))}
    pick = {name: cols[name][ok] for name in _FIELDS if name != "status"}
    delta = float(g.attrs["delta"]) if "delta" in g.attrs else math.nan
    overrides = _text(g.attrs.get("overrides", ""))
    if overrides and space not in (RATIOS, BASELINE):  # one space in several settings: tell them apart
        space = f"{space} ({overrides})"
    method = _text(g.attrs.get("method", ""))
    if "retrain_spec" in g.attrs:  # the space's own retraining recipe (nps.pipeline.training.spec.SpaceSpec)
        method = json.loads(_text(g.attrs["retrain_spec"])).get("method", method)
    return Population(group=group, space=space, target=target, value=value, counts=counts,
                      row=np.flatnonzero(ok), delta=delta, criterion=_text(g.attrs.get("criterion", "")),
                      method=method, epochs=int(g.attrs.get("epochs", 0)), **pick)


def _layer_table(reader):
    from nps.pipeline.network.table import LayerTable

    try:
        return LayerTable.from_hdf5(reader.layers)
    except Exception as error:  # a file without a full layer table (older or hand-made): report without it
        log.info("no usable layer table in %s: %s", reader.path, error)
        return None


def _weight_layer_names(reader) -> list[str] | None:
    """The prunable layers of the weight table (a weight space's recipe has one entry per layer), or None."""
    group = reader.weight_layers
    if group is None or "names" not in group:
        return None
    return [_text(n) for n in group["names"][()]]


def _uniform(table, pops, notes) -> tuple[dict, dict | None]:
    """The uniform recipe meeting each regime's target, and the uniform recipes' curve over all ratios."""
    from nps.kernels.spaces import DEFAULT_R, uniform_ratio

    if table is None:
        notes.append("the file has no usable layer table (/layers): uniform-recipe references are not shown")
        return {}, None
    out = {}
    G = len(table.channels)
    for p in pops:
        key = regime_key(p.target, p.value)
        priced = p.target in ("c_flops", "c_params") or (p.target == "c_latency" and table.latency is not None)
        if key in out or not priced or not math.isfinite(p.value):
            continue
        u = uniform_ratio(table, p.target, p.value)
        keep = table.keep(np.full(G, min(max(u, 0.0), 1.0)))
        out[key] = {"ratio": float(u), "keep": [int(v) for v in keep], "c_flops": float(table.c_flops(keep)),
                    "c_params": float(table.c_params(keep)), "mcb": float(table.mcb(keep))}
        if table.latency is not None:
            out[key]["c_latency"] = float(table.c_latency(keep))
    # The curve uses continuous channel counts (1 − u)·c: at integer counts a small network's uniform recipes
    # zig-zag by rounding, which hides the trend; the per-regime points above are the real (integer) recipes.
    units = np.asarray(table.units, dtype=np.float64)  # the forms are written over units (channels / granularity)
    r_max = 1.0 - 0.5 / float(np.min(units))
    ratios = np.linspace(0.0, min(DEFAULT_R, r_max), 400)
    keep = (1.0 - ratios[:, None]) * units[None, :]
    c_flops = continuous_form(table.flops, keep) / table.base_flops
    c_params = continuous_form(table.params, keep) / table.base_params
    curve = {"ratio": ratios.tolist(), "c_flops": c_flops.tolist(), "c_params": c_params.tolist(),
             "mcb": (c_flops / c_params).tolist(), "channels": "continuous"}
    return out, curve


def _json_ready(x):
    """Recursively: numpy to Python, non-finite floats to None (JSON has no NaN)."""
    if isinstance(x, dict):
        return {str(k): _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    if isinstance(x, np.ndarray):
        return _json_ready(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def build_summary(results: str | os.PathLike, *, k: int = 40, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                  edf_points: int = DEFAULT_EDF_POINTS, band=DEFAULT_BAND) -> dict:
    """The whole analysis of a results file as a JSON-ready dict (see the module docstring)."""
    if k < 1:
        raise NpsError(f"--k {k}: the number of best subnetworks must be at least 1")
    if n_boot < 1:
        raise NpsError(f"--bootstrap {n_boot}: use at least 1 resample (1000 is the default)")
    with open_readonly(results) as reader:
        attrs = reader.attrs
        groups = reader.spaces()
        pops = [read_population(reader, g) for g in groups]
        table = _layer_table(reader)
        weight_layers = _weight_layer_names(reader)
        measured = read_latency(reader)
        latency = latency_summary(pops, measured, attrs.get("base_top1", math.nan))
        references = reader.references()
        costs = reference_cost(reader, attrs)
        curves = reader.curves()
        finetune = finetune_curves(reader, pops)
        prediction = prediction_summary(reader, table, pops, measured)
    notes = []
    uniform, curve = _uniform(table, pops, notes)
    summary = summarize(pops, k=k, n_boot=n_boot, seed=seed, edf_points=edf_points, band=band, uniform=uniform)
    counts = summary["counts"]
    base_top1 = attrs.get("base_top1", math.nan)
    if not groups:
        notes.append("the file has no spaces yet")
    if counts["pending"] or counts["running"]:
        notes.append(f"{plural(counts['pending'], 'row')} pending and {counts['running']} running: this report "
                     f"covers the {plural(counts['finished'], 'finished row')}")
    if counts["failed"]:
        n = counts["failed"]
        notes.append(f"{plural(n, 'failed row')} {'is' if n == 1 else 'are'} excluded (their errors are in the "
                     "file's 'error' column)")
    if counts["nan"]:
        n = counts["nan"]
        notes.append(f"{plural(n, 'done row')} {'has' if n == 1 else 'have'} no finite top-1 or accuracy drop and "
                     f"{'is' if n == 1 else 'are'} excluded"
                     + (" (the file has no base_top1)" if not _finite(base_top1) else ""))
    if counts["finished"] == 0:
        notes.append("no finished rows yet: no figures")
    for pruning, fits in summary["fits"].items():
        for fit_name, label in (("optimal_mcb", "optimal-mCB fit"), ("drop_vs_mcb", "drop-vs-mCB fit")):
            fit = fits[fit_name]["fit"]
            said = [t for t in (fit["note"], fit.get("not_drawn")) if t]
            if said and counts["finished"]:
                notes.append(f"{label} ({pruning.removesuffix('s')} spaces): {'; '.join(dict.fromkeys(said))}")
    if any(r["pruning"] == "weights" for r in summary["regimes"]):
        notes.append("filter and weight spaces are analysed apart: each kind has its own regimes, fits, "
                     "histograms and uniform baseline (baseline for filters, weights:uniform for weights)")
    model = None
    if table is not None:
        model = {"name": table.model, "mode": table.mode, "resolution": table.resolution,
                 "num_classes": table.num_classes, "in_channels": table.in_channels, "groups": list(table.names),
                 "channels": [int(c) for c in table.channels], "base_flops": int(table.base_flops),
                 "base_params": int(table.base_params), "granularity": [int(g) for g in table.granularity],
                 "members": [list(m) for m in table.members], "flops_convention": table.flops_convention,
                 "channel_multiple": int(table.channel_multiple), "layers": weight_layers}
    summary.update({
        "format": FORMAT, "nps_version": NPS_VERSION, "results": os.path.abspath(os.fspath(results)),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": model, "uniform_curve": curve, "notes": notes, "latency": latency,
        "base": {name: attrs.get(f"base_{name}") for name in ("top1", "top5", "flops", "params")},
        "references": compare_references(references, pops, summary["regimes"], float(base_top1), n_boot=n_boot,
                                         seed=seed, band=band),
        "cost": costs,
        "curves": _with_final_top1(curves, base_top1, references),
        "finetune_curves": finetune,
        "latency_prediction": prediction,
    })
    return _json_ready(summary)


def _with_final_top1(curves: list[dict], base_top1, references: dict) -> list[dict]:
    """The learning curves (:meth:`~nps.pipeline.results.reader._ResultsFile.curves`), each with its network's
    final top-1 (after precise BN: the number the study uses)."""
    for curve in curves:
        top1 = base_top1 if curve["role"] == "base" else references.get(curve["network"], {}).get("top1")
        curve["top1"] = float(top1) if _finite(top1) else None
    return curves


def _finite(x) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------------------------
# Writing.


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NpsError(f"--out {out}: exists and is not a directory; choose a directory name")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise NpsError(f"--out {out}: directory exists and is not empty; pass --force to replace it")


def write_report(results: str | os.PathLike, out_dir: str | os.PathLike, *, k: int = 40,
                 n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0, edf_points: int = DEFAULT_EDF_POINTS,
                 force: bool = False) -> dict:
    """Write ``out_dir/index.html``, ``out_dir/summary.json`` and the PNG figures; returns the summary.

    The directory is assembled under a temporary name beside it and renamed into place; an existing non-empty
    ``out_dir`` is replaced only with ``force=True``.
    """
    out = Path(out_dir)
    _check_out(out, force)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    try:  # before the analysis: an --out that cannot be written is said at once, naming it
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as exc:
        raise NpsError(environment_error(exc, str(out)) or f"--out {out}: {exc}") from None
    try:
        summary = build_summary(results, k=k, n_boot=n_boot, seed=seed, edf_points=edf_points)
        summary["figures"] = render(summary, tmp)
        summary["figures"].update(render_latency(summary, tmp))
        summary["figures"].update(render_references(summary, tmp))
        summary["figures"].update(render_curves(summary, tmp))
        summary["figures"].update(render_finetune_curves(summary, tmp))
        summary["figures"].update(render_prediction(summary, tmp))
        with open(tmp / "summary.json", "w") as fh:
            json.dump(summary, fh, indent=1, allow_nan=False)
            fh.write("\n")
        (tmp / "index.html").write_text(render_html(summary))
        _check_out(out, force)  # again: someone may have written there meanwhile
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    except OSError as exc:
        message = environment_error(exc, str(out))
        if message is None:
            raise
        raise NpsError(message) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return summary


# --------------------------------------------------------------------------------------------------------------------
# index.html
