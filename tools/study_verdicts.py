"""The verdict tables of a family study (docs/study-compact-convnets.md), from a report's summary.json: per reference
network (a smaller family member) and every space of the regime nearest its FLOPs, the space's mean top-1 with its
interval, the gain over the reference's mean over seeds with its interval (subnetworks and seeds resampled), the
best subnetwork's gain and how many subnetworks beat it; and the fine-tuning curves' last-epoch gains.

Prints Markdown (one table per reference) and, with --json, one JSON line per (reference, space) instead.

usage: python tools/study_verdicts.py docs/study-compact-convnets/regnetx/summary.json [--json]
"""
from __future__ import annotations

import argparse
import json


def _ci(ci, spec: str = "+.2f") -> str:
    return f"[{ci[0]:{spec}}, {ci[1]:{spec}}]" if ci else "(n < 10)"


def rows(summary: dict):
    for ref in summary.get("references") or []:
        for space, sp in (ref.get("spaces") or {}).items():
            yield ref, space, sp


def paired_distillation(results: str, n_boot: int = 10_000) -> None:
    """Per space fine-tuned without and with distillation (``<space>+distill=false@...`` and ``...=true@...``, the
    same recipes row by row: checked on their keep vectors): the mean of the per-row top-1 differences with a
    bootstrap interval over the rows, and how many rows gained."""
    import numpy as np

    from nps.pipeline.results.reader import DONE, open_readonly
    from nps.pipeline.results.stats import bootstrap_weights

    print("\nDistillation, paired (the same recipe without and with it; top-1 with − without, pp):\n")
    print("| space | regime | pairs | mean difference [95 % CI] | rows that gained |")
    print("| --- | --- | --- | --- | --- |")
    with open_readonly(results) as reader:
        for off in sorted(k for k in reader.spaces() if "+distill=false@" in k):
            on = off.replace("+distill=false@", "+distill=true@")
            a, b = (reader.read(k, ["status", "top1", "keep"]) for k in (off, on))
            assert np.array_equal(a["keep"], b["keep"]), f"{off} and {on} hold different recipes"
            ok = (a["status"] == DONE) & (b["status"] == DONE)
            d = b["top1"][ok].astype(np.float64) - a["top1"][ok].astype(np.float64)
            rng = np.random.default_rng(0)
            boot = bootstrap_weights(d.size, n_boot, rng) @ d / d.size
            lo, hi = np.percentile(boot, [2.5, 97.5])
            space, regime = off.split("@")
            print(f"| {space.replace('+distill=false', '')} | {regime} | {d.size} | {d.mean():+.2f} "
                  f"[{lo:+.2f}, {hi:+.2f}] | {int(np.count_nonzero(d > 0))} of {d.size} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("summary")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--results", help="the run's results.h5: adds the paired effect of distillation (the same "
                                      "recipes fine-tuned without and with it, row by row)")
    args = ap.parse_args()
    with open(args.summary, encoding="utf-8") as fh:
        summary = json.load(fh)
    base = summary["base"]["top1"]
    current = None
    for ref, space, sp in rows(summary):
        if args.json:
            print(json.dumps({"reference": ref["model"], "seeds": ref.get("top1_values"), "reference_top1":
                              ref["top1"], "regime": ref["regime"], "space": space, "n": sp["n"],
                              "gain": sp["gain"], "gain_ci": sp["gain_ci"], "best_gain": sp["best_gain"],
                              "beats": sp["beats"]["wins"], "mean_drop": sp["mean_drop"],
                              "mean_drop_ci": sp["mean_drop_ci"]}))
            continue
        if ref["model"] != current:
            current = ref["model"]
            values = ", ".join(f"{v:.2f}" for v in ref.get("top1_values") or [])
            print(f"\n**{ref['model']}** at c_flops {ref['c_flops']:.3f} ({ref['regime']}): top-1 {ref['top1']:.2f} "
                  f"(mean of {ref.get('seeds', 1)} seeds: {values}); base network {base:.2f}\n")
            print("| space | n | mean top-1 | mean drop [95 % CI] | gain over the reference [95 % CI] | best gain "
                  "| beat it |")
            print("| --- | --- | --- | --- | --- | --- | --- |")
        mean_top1 = base - sp["mean_drop"] if sp.get("mean_drop") is not None else float("nan")
        print(f"| {space} | {sp['n']} | {mean_top1:.2f} | {sp['mean_drop']:.2f} {_ci(sp['mean_drop_ci'], '.2f')} "
              f"| {sp['gain']:+.2f} {_ci(sp['gain_ci'])} | {sp['best_gain']:+.2f} | {sp['beats']['wins']} of "
              f"{sp['n']} |")
    if args.results and not args.json:
        paired_distillation(args.results)
    curves = summary.get("finetune_curves") or []
    if curves and not args.json:
        print("\nFine-tuning curves (median val top-1 after adaptive BN and each epoch; last epoch's median gain):\n")
        print("| space | regime | n | curve | last epoch |")
        print("| --- | --- | --- | --- | --- |")
        for c in curves:
            curve = " → ".join("–" if v is None else f"{v:.2f}" for v in c["median"])
            last = "–" if c["last_gain"] is None else f"{c['last_gain']:+.2f}"
            print(f"| {c['space']} | {c['target']}={c['value']:g} | {c['n']} | {curve} | {last} |")


if __name__ == "__main__":
    main()
