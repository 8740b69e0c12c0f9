"""The learning-curve figure: had the networks the study compares finished learning?

One line per network nps trained (the base network, every reference), from the summary's ``curves`` alone
(:meth:`nps.pipeline.results.reader._ResultsFile.curves`, results format 3): left, top-1 after every epoch on the
holdout carved from the training set (solid: what the plateau rule decides on) and on the val split (dashed: the
test images that score the study, shown, never used to decide), the final top-1 after precise BN as a star; right,
the mean training loss of every epoch. A vertical dotted line marks the epoch the plateau rule stopped a training,
the shaded span after it the cool-down; a training without one ran all its epochs (``max_epochs``), and the caption
says which, so a reader sees at a glance whether a network was still learning when it stopped.
"""
from __future__ import annotations

import math
from pathlib import Path

from nps.pipeline.results.figures import _figure, _nan_array
from nps.pipeline.training.plateau import describe_ending

FILE = "learning_curves.png"


def render_curves(summary: dict, out_dir: str | Path) -> dict:
    """Draw ``learning_curves.png`` when the summary has learning curves; returns ``{name: {"file", "caption"}}``."""
    curves = [c for c in summary.get("curves") or [] if c.get("train_loss")]
    if not curves:
        return {}
    from matplotlib.ticker import MaxNLocator

    fig = _figure(13.0, 5.0)
    ax_top, ax_loss = fig.subplots(1, 2)
    late: list[float] = []  # the last two thirds of every curve: where a plateau shows
    for i, c in enumerate(curves):
        color = f"C{i}"
        epochs = list(range(1, len(c["train_loss"]) + 1))
        label = f"{c['network']} ({c['role']})"
        holdout = _nan_array(c.get("holdout_top1") or []).tolist()  # lists: the slices below are joined with +
        val = _nan_array(c.get("val_top1") or []).tolist()
        final = f", final {c['top1']:.2f}" if c.get("top1") is not None else ""
        many = len(curves) > 3  # a legend line per network (its style said once below), not three
        if any(math.isfinite(v) for v in holdout):
            ax_top.plot(epochs, holdout, color=color, marker="o", markersize=3,
                        label=f"{label}{final}" if many else f"{label}: holdout")
        if any(math.isfinite(v) for v in val):
            ax_top.plot(epochs, val, color=color, linestyle="--", label=None if many else f"{label}: val")
        if c.get("top1") is not None:
            ax_top.plot([epochs[-1]], [c["top1"]], marker="*", markersize=12, color=color, linestyle="none",
                        label=None if many else f"{label}: final top-1 {c['top1']:.2f}")
        late.extend(v for v in holdout[len(holdout) // 3:] + val[len(val) // 3:] if math.isfinite(v))
        ax_loss.plot(epochs, _nan_array(c["train_loss"]), color=color, marker="o", markersize=3, label=label)
        plateau = int(c.get("plateau_epoch") or 0)
        for ax in (ax_top, ax_loss):
            if plateau:
                ax.axvline(plateau, color=color, linestyle=":", linewidth=1.5)
                ax.axvspan(plateau, epochs[-1], color=color, alpha=0.08)
    ax_top.set_xlabel("epoch")
    ax_top.set_ylabel("top-1 (%)")
    stopped = [c for c in curves if c.get("plateau_epoch")]
    ax_top.set_title("Top-1 after every epoch" + ("\n(dotted: plateau, shaded: cool-down)" if stopped else
                                                  "\n(no network reached a plateau: each trained its maximum epochs)"),
                     fontsize=10)
    if len(curves) > 3:
        ax_top.plot([], [], color="0.4", marker="o", markersize=3, label="solid: holdout; dashed: val; star: final")
    if late:  # the axis shows the last two thirds of training, where a plateau is told from a rise
        lo, hi = min(late), max(late + [c["top1"] for c in curves if c.get("top1") is not None])
        ax_top.set_ylim(lo - 0.1 * (hi - lo) - 0.2, hi + 0.1 * (hi - lo) + 0.2)
    ax_top.legend(fontsize=7, loc="lower right")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("mean training loss of the epoch")
    ax_loss.set_title("Training loss")
    ax_loss.legend(fontsize=7, loc="best")
    for ax in (ax_top, ax_loss):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
    path = Path(out_dir) / FILE
    fig.savefig(path, dpi=110)
    endings = "; ".join(f"{c['network']} {describe_ending(c)}" for c in curves)
    caption = ("Learning curves of the networks nps trained: top-1 on the holdout carved from the training set "
               "(solid, what the plateau rule scores) and on the val split (dashed), the final top-1 after precise BN "
               f"(star), and the training loss. {endings}.")
    return {"learning_curves": {"file": path.name, "caption": caption}}
