"""The fine-tuning curves: had the pruned subnetworks finished learning when their fine-tuning budget ended?

With ``retrain.eval_every_epoch`` a results file holds every row's val top-1 after each fine-tuning epoch (the
``curve`` column) beside ``bn_top1``, its top-1 after pruning and adaptive BN (epoch 0). :func:`finetune_curves`
summarises them per space: the median and the quartiles of the finished rows at every epoch, and the median gain of
the last epoch (``last_gain``, percentage points): above :data:`RISING` the space was still learning when its budget
ended, a fixed budget that stopped short of its plateau (the base and reference trainings use the holdout rule
instead: learning_curves.png). :func:`render_finetune_curves` draws them, one panel per regime.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from nps.pipeline.results.figures import _UNIFORM, _colors, _figure, _nan_array

FILE = "finetune_curves.png"
RISING = 0.1  # pp: the plateau rule's default min_delta: a last epoch that gained more was still learning


def finetune_curves(reader, pops) -> list[dict]:
    """Per space with finished rows that have a curve: ``space``, ``group``, ``regime`` (its key), ``pruning``, ``n``,
    ``median``/``q25``/``q75`` (one value per epoch, epoch 0 the adaptive-BN top-1), ``last_gain`` and ``rising``."""
    out = []
    for p in pops:
        if not p.n:
            continue
        cols = reader.read(p.group, ["curve", "bn_top1"])
        curve = np.asarray(cols["curve"], dtype=np.float64)[p.row]
        if curve.ndim != 2 or not np.isfinite(curve).any():
            continue
        epochs = int(np.max(np.sum(np.isfinite(curve), axis=1)))
        lines = np.column_stack([np.asarray(cols["bn_top1"], dtype=np.float64)[p.row], curve[:, :epochs]])
        lines = lines[np.isfinite(lines[:, 1:]).all(axis=1)]  # rows with every epoch scored
        if not lines.size:
            continue
        with np.errstate(all="ignore"):
            q25, median, q75 = (np.nanpercentile(lines, q, axis=0) for q in (25, 50, 75))
        step = lines[:, -1] - lines[:, -2]
        gain = float(np.median(step[np.isfinite(step)])) if np.isfinite(step).any() else None  # (no bn_top1)
        q25, median, q75 = ([None if not math.isfinite(v) else float(v) for v in q] for q in (q25, median, q75))
        out.append({"space": p.space, "group": p.group, "regime": p.regime, "pruning": p.pruning,
                    "target": p.target, "value": p.value,
                    "n": int(lines.shape[0]), "epochs": epochs, "median": median, "q25": q25, "q75": q75,
                    "last_gain": gain, "rising": gain is not None and gain > RISING})
    return out


def render_finetune_curves(summary: dict, out_dir: str | Path) -> dict:
    """Draw ``finetune_curves.png`` when the summary has fine-tuning curves; returns ``{name: {"file", "caption"}}``."""
    curves = summary.get("finetune_curves") or []
    if not curves:
        return {}
    panels: dict[str, list[dict]] = {}
    for c in curves:
        panels.setdefault(c["regime"], []).append(c)
    colors = _colors(summary)  # the spaces' colours of every other figure; the uniform baselines in its orange
    fig = _figure(6.0 * len(panels), 4.8)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, group) in zip(axes, panels.items()):
        for c in group:
            x = np.arange(len(c["median"]))
            color = colors.get(c["space"], _UNIFORM)  # baseline, weights:uniform: the uniform recipe
            last = "" if c["last_gain"] is None else f"; last epoch {c['last_gain']:+.2f} pp"
            style = "--" if c["n"] == 1 else "-"  # one row (a baseline, a one-recipe space): no quartiles
            ax.plot(x, _nan_array(c["median"]), marker="s" if c["pruning"] == "weights" else "o", color=color,
                    linestyle=style, label=f"{c['space']} (n={c['n']}{last})")
            if c["n"] > 1:
                ax.fill_between(x, _nan_array(c["q25"]), _nan_array(c["q75"]), color=color, alpha=0.12)
        ax.set_xticks(range(max(len(c["median"]) for c in group)))
        ax.set_xlabel("fine-tuning epoch (0: after pruning and adaptive BN)")
        ax.set_ylabel("val top-1 (%): median, quartiles shaded")
        ax.set_title(f"{key}: fine-tuning curves")
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
    rising = [f"{c['space']} at {c['regime']}" for c in curves if c["rising"]]
    path = Path(out_dir) / FILE
    fig.savefig(path, dpi=110)
    said = (f"still learning in the last epoch (median gain > {RISING} pp): {', '.join(rising)}" if rising
            else f"every space's median gain in the last epoch is at most {RISING} pp")
    return {"finetune_curves": {"file": path.name, "caption": "Fine-tuning curves of the pruned subnetworks "
                                "(val top-1 after every epoch of the fixed budget; epoch 0 after adaptive BN): "
                                + said + "."}}
