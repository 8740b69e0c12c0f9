"""Which latency model would have predicted a measured population better? Model variants scored offline.

A study's latency model file keeps every layer's timing grid and its calibration networks' paired ratios; its
results file keeps every row's keep vector and, after ``nps latency``, its measured latency relative to the base
(the paired ratio). This script fits variants of the model from those stored timings alone (no new timing),
calibrates each on the model's own calibration networks (rebuilt from their seed; the script stops if they no
longer match the stored ones), and scores each on the measured rows: R² of predicted against measured c, relative
to the base, as the report computes it. The population is held out: nothing here is fitted to it, except the line
marked ``ceiling``, the affine map of the stored model's layer sum fitted to the population itself (no model
calibrated on other networks can do better with that sum; it is a bound, not a model).

Variants: ``stored, as calibrated`` (the model file as it is: the report's R²); ``as nps latency-model chooses
now`` (the block and input padding picked from the same grids and calibration timings by today's rule,
:func:`~nps.pipeline.deploy.latency_model.best_model`); ``stored`` (its layer fits, the
calibration fitted here: least squares of the relative error, where ``nps latency-model`` linearises it);
``unpadded``; ``block B`` (output counts
padded to B, each conv layer where its grid fit errs less) and ``block B, inputs padded`` for B in 8, 16, 32;
``per-term scales`` (the calibration fits one scale per term of the layer form, a, b, c, d, instead of one for
all), ``per-kind scales`` (one scale per layer kind: depthwise, other conv, linear); ``+ params`` (a term in the
network's parameter count, weights read from memory). One JSON line per network and variant, with the mean
residual (measured − predicted c) per space; then a line with the correlation of the stored model's residual with
each row's spread of kept fractions across its groups.

usage: python tools/latency_model_variants.py STUDY_DIR [STUDY_DIR ...] [--write-model DIR]
       (a directory with latency-model.h5 and results.h5, as tools/latency_study.py writes them)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def calibration_channels(model, table, base):
    """The calibration networks as ``nps latency-model`` built them (:func:`_calibration_networks`), and per network
    its layers' (cin, cout) and parameter count; SystemExit if their kept fractions differ from the ones stored in
    the model file."""
    from nps.pipeline.deploy.latency_model import _calibration_networks

    networks = _calibration_networks(base, table, model.layers)
    stored = np.asarray(model.calibration["keep_fraction"], dtype=np.float64)
    rebuilt = np.asarray([f for f, _, _, _ in networks])
    if rebuilt.shape != stored.shape or not np.allclose(rebuilt, stored, atol=1e-9):
        sys.exit(f"the calibration networks of {model.model} differ from the ones its model file was calibrated on "
                 "(CALIBRATION_* changed since): measure the model again with nps latency-model")
    return networks, [ch for _, _, ch, _ in networks], [sum(p.numel() for p in n.parameters()) for _, n, _, _ in
                                                         networks]


def rechosen(model, base, networks):
    """The model ``nps latency-model`` would choose now from this file's grids and calibration timings
    (:func:`best_model`: the block and input padding that predict the calibration networks best)."""
    from types import SimpleNamespace

    from nps.pipeline.deploy.latency_model import best_model
    from nps.pipeline.network.latency_model import LatencyModel
    from nps.pipeline.results.latency import Timing

    measured = np.asarray(model.calibration["measured_s"], dtype=np.float64)
    pairs = [(m / measured[0], q) for m, q in zip(measured[1:], model.calibration["iqr_over_median"][1:])]
    grids = {n: (SimpleNamespace(groups=int(g), depthwise=bool(dw), module=base.get_submodule(n)),
                 [tuple(p) for p in model.grid[n]]) for n, g, dw in zip(model.layers, model.groups, model.depthwise)}

    def make_model(block: int, fits: dict) -> LatencyModel:
        return LatencyModel(**{**model.__dict__, "coef": [fits[n][0] for n in model.layers],
                               "fit_error": [fits[n][1] for n in model.layers], "block": block,
                               "padded": [fits[n][2] for n in model.layers], "padded_in": None,
                               "scale": 1.0, "offset": 0.0, "network_error": np.nan, "calibration": {}})

    base_timing = Timing(measured[0], measured[0], measured[0], 3, 1)
    return best_model(make_model, grids, model.layers, networks, base_timing, pairs)


def relative_fit(cal: np.ndarray, c_cal: np.ndarray) -> np.ndarray:
    """Non-negative weights x of the columns (column 0 the constant) with the base (row 0) at 1 and
    ``cal[j] @ x ≈ c_cal[j]`` for the other networks (:func:`fit_relative_columns`, as ``nps latency-model``'s
    per-term calibration fits them)."""
    from nps.pipeline.network.latency_model import fit_relative_columns

    return fit_relative_columns(cal[1:], c_cal[1:], cal[0], 1.0)


def score(name: str, net: str, cal: np.ndarray, rows: np.ndarray, c_cal, c, spaces) -> dict:
    from nps.pipeline.results.latency_prediction import r_squared

    x = relative_fit(cal, c_cal)
    base = float(cal[0] @ x)
    predicted, predicted_cal = rows @ x / base, cal @ x / base
    residual = c - predicted
    return {"bench": "latency_model_variant", "network": net, "variant": name, "rows": int(c.size),
            "r2_relative": r_squared(predicted, c),
            "calibration_error": float(np.sqrt(np.mean(((predicted_cal - c_cal) / c_cal) ** 2))),
            "mean_residual": float(residual.mean()),
            "mean_residual_by_space": {s: round(float(residual[spaces == s].mean()), 4) for s in np.unique(spaces)}}


def variants(model):
    """(name, per-layer term function (i, cin, cout) -> the 4 terms times the layer's coefficients) per variant."""
    from nps.pipeline.network.latency_model import fit_layer, layer_terms

    def fitted(block: int, pad_in: bool):
        coefs, blocks = [], []
        for i, name in enumerate(model.layers):
            g = model.grid[name]
            groups, dw = int(model.groups[i]), bool(model.depthwise[i])
            best, chosen = fit_layer(g[:, 0], g[:, 1], g[:, 2], groups, dw), (1, 1)
            if block > 1:
                inb = block if pad_in else 1
                alt = fit_layer(g[:, 0], g[:, 1], g[:, 2], groups, dw, block, inb)
                if alt[1] < best[1]:
                    best, chosen = alt, (block, inb)
            coefs.append(best[0])
            blocks.append(chosen)
        return lambda i, cin, cout: layer_terms(cin, cout, int(model.groups[i]), bool(model.depthwise[i]),
                                                *blocks[i]) * coefs[i]

    def stored(i, cin, cout):
        return model.layer_form(i, cin, cout) * model.coef[i]

    out = [("stored", stored), ("unpadded", fitted(1, False))]
    for block in (8, 16, 32):
        out += [(f"block {block}", fitted(block, False)), (f"block {block}, inputs padded", fitted(block, True))]
    return out, stored


def study(directory: Path, write_model: Path | None = None) -> list[dict]:
    import torch

    from nps.pipeline.deploy.latency_model import _channels_of
    from nps.pipeline.network.layer_table import build_layer_table
    from nps.pipeline.network.latency_model import LatencyModel
    from nps.pipeline.network.models import build_model
    from nps.pipeline.network.prune import prune_model
    from nps.pipeline.results.latency import read_latency
    from nps.pipeline.results.reader import open_readonly

    model = LatencyModel.load(directory / "latency-model.h5")
    if not model.grid:
        sys.exit(f"{directory / 'latency-model.h5'} keeps no timing grids: nothing to refit")
    table = build_layer_table(model.model, model.mode, model.resolution, model.num_classes, model.in_channels)
    torch.manual_seed(0)
    base = build_model(model.model, num_classes=model.num_classes, in_channels=model.in_channels)
    networks, cal_channels, cal_params = calibration_channels(model, table, base)
    c_cal = np.asarray(model.calibration["measured_s"], dtype=np.float64) / model.calibration["measured_s"][0]
    with open_readonly(directory / "results.h5") as reader:
        measured = read_latency(reader).get(model.device)
        if measured is None:
            sys.exit(f"{directory / 'results.h5'} has no latency measured on {model.device}: run nps latency first")
        at = {(str(s), int(r)): i for i, (s, r, b) in enumerate(zip(measured["space"], measured["row"],
                                                                      measured["batch"])) if int(b) == model.batch}
        rows = []
        for space in reader.spaces():
            keep = reader.read(space, ["keep"])["keep"]
            rows += [(space, keep[j].astype(np.int64), 1.0 / float(measured["speedup"][at[space, j]]))
                     for j in range(len(keep)) if (space, j) in at and np.isfinite(measured["speedup"][at[space, j]])]
    if len(rows) < 3:
        sys.exit(f"{directory / 'results.h5'}: fewer than 3 rows measured at batch {model.batch}")
    nets = [prune_model(base, table, k) for _, k, _ in rows]
    row_channels = [_channels_of(n, model.layers) for n in nets]
    row_params = np.asarray([sum(p.numel() for p in n.parameters()) for n in nets], dtype=np.float64)
    spaces = np.asarray([s for s, _, _ in rows])
    c = np.asarray([v for _, _, v in rows])
    fractions = np.asarray([k / table.channels for _, k, _ in rows])

    def terms(fn, channels) -> np.ndarray:  # (networks, layers, 4)
        return np.asarray([[fn(i, *ch[n]) for i, n in enumerate(model.layers)] for ch in channels])

    def with_constant(x: np.ndarray) -> np.ndarray:
        return np.c_[np.ones(len(x)), x]

    from nps.pipeline.results.latency_prediction import r_squared

    stored_sums = np.asarray([model.predict(ch) for ch in row_channels]) / model.base_latency_s
    lines = [{"bench": "latency_model_variant", "network": model.model, "variant": "stored, as calibrated",
              "what": "the model file's own offset and scale (the report's R²)", "rows": int(c.size),
              "r2_relative": r_squared(stored_sums, c), "mean_residual": float(np.mean(c - stored_sums))}]
    now = rechosen(model, base, networks)
    if write_model is not None:
        write_model.mkdir(parents=True, exist_ok=True)
        now.save(write_model / f"{model.model}.h5")
    base_channels = _channels_of(base, model.layers)
    now_c = np.asarray([now.predict(ch) for ch in row_channels]) / now.predict(base_channels)
    lines.append({"bench": "latency_model_variant", "network": model.model,
                  "variant": "as nps latency-model chooses now",
                  "what": f"block {now.block}, {int(now.padded.sum())} layers padded, inputs "
                          f"{'padded' if now.padded_in.any() else 'not padded'}, "
                          f"{'one scale' if np.all(now.term_scale == 1.0) else 'one scale per term'} "
                          f"(stored: block {model.block})",
                  "rows": int(c.size), "calibration_error": now.network_error, "r2_relative": r_squared(now_c, c),
                  "mean_residual": float(np.mean(c - now_c))})
    fits, stored = variants(model)
    for name, fn in fits:
        cal_t, row_t = terms(fn, cal_channels), terms(fn, row_channels)
        lines.append(score(name, model.model, with_constant(cal_t.sum(axis=(1, 2))),
                           with_constant(row_t.sum(axis=(1, 2))), c_cal, c, spaces))
    cal_t, row_t = terms(stored, cal_channels), terms(stored, row_channels)
    lines.append(score("per-term scales", model.model, with_constant(cal_t.sum(axis=1)),
                       with_constant(row_t.sum(axis=1)), c_cal, c, spaces))
    linear = _linear_layers(base, model.layers)
    kind = np.asarray(["depthwise" if dw else "linear" if n in linear else "conv"
                       for n, dw in zip(model.layers, model.depthwise)])
    per_kind = [k for k in ("conv", "depthwise", "linear") if np.any(kind == k)]

    def by_kind(t: np.ndarray) -> np.ndarray:
        return np.stack([t[:, kind == k].sum(axis=(1, 2)) for k in per_kind], axis=1)

    lines.append(score("per-kind scales", model.model, with_constant(by_kind(cal_t)), with_constant(by_kind(row_t)),
                       c_cal, c, spaces))
    lines.append(score("+ params", model.model,
                       with_constant(np.c_[cal_t.sum(axis=(1, 2)), np.asarray(cal_params, dtype=np.float64)]),
                       with_constant(np.c_[row_t.sum(axis=(1, 2)), row_params]), c_cal, c, spaces))
    sums = with_constant(row_t.sum(axis=(1, 2)))
    x, *_ = np.linalg.lstsq(sums, c, rcond=None)
    lines.append({"bench": "latency_model_variant", "network": model.model, "variant": "ceiling",
                  "what": "the stored model's layer sum, its affine map fitted to the measured rows themselves",
                  "rows": int(c.size), "r2_relative": r_squared(sums @ x, c)})
    stored_residual = c - stored_sums
    spread = (fractions - fractions.mean(axis=1, keepdims=True)).std(axis=1)
    lines.append({"bench": "latency_model_residual", "network": model.model, "rows": int(c.size),
                  "corr_residual_spread_of_kept_fractions": float(np.corrcoef(stored_residual, spread)[0, 1]),
                  "corr_residual_mean_kept_fraction": float(np.corrcoef(stored_residual, fractions.mean(1))[0, 1])})
    return lines


def _linear_layers(model, names) -> set[str]:
    from torch import nn

    return {n for n in names if isinstance(model.get_submodule(n), nn.Linear)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("studies", nargs="+", type=Path)
    ap.add_argument("--write-model", type=Path, default=None, metavar="DIR",
                    help="also save the model nps latency-model would make now from each study's grids and "
                         "calibration timings, as DIR/<network>.h5 (to sample or benchmark with it)")
    args = ap.parse_args()
    for directory in args.studies:
        for line in study(directory, args.write_model):
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
