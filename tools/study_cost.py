"""The cost side of a family study: seconds to produce each space's pruned networks from the trained base, against
training each reference (a smaller family member) to its plateau.

One JSON line per space, per reference training and for the base network:
  {"bench": "study_cost", "kind": "space", "space", "rows", "cohorts", "wall_s", "per_row_s", "cpu_s"}
  {"bench": "study_cost", "kind": "reference", "name", "model", "seed", "train_s", "cpu_s"}
  {"bench": "study_cost", "kind": "base", "train_s", "cpu_s"}

A space's ``wall_s`` is the sum over its cohorts of the time from the cohort's dispatch to its last row's result in
the run's log.jsonl (pruning, adaptive BN, fine-tuning and evaluation of its K rows, on one worker); ``per_row_s`` is
that over its rows (what one row costs when trained in cohorts of the run's size). Producing the *best* network of a
space costs the whole space: which row is best is known only after all are trained. A reference's ``train_s`` is its
training to the plateau rule's end, precise BN included (results.h5). ``cpu_s`` = seconds × the worker's threads
(``--threads``, the cores the run used: an upper bound on CPU-seconds; the worker ran alone on them).

Baseline: training the smaller family member from scratch to its plateau by the same recipe (its reference
training), on the same machine in the same run.

usage: python tools/study_cost.py runs/regnetx-fashion-mnist [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict


def space_costs(log_path: str) -> dict[str, dict]:
    """Per space: rows, cohorts and the wall seconds of its cohorts (dispatch to last result), from log.jsonl. A
    cohort dispatched again after a stop counts from its last dispatch."""
    events = [json.loads(line) for line in open(log_path, encoding="utf-8") if line.strip()]
    cohort_of: dict[tuple, tuple] = {}
    finished: dict[tuple, float] = {}  # cohort id -> time of its last result so far
    for e in events:
        if e["event"] == "dispatch":
            cohort = (e["space"], tuple(e["rows"]), e["t"])
            for row in e["rows"]:
                cohort_of[(e["space"], row)] = cohort
        elif e["event"] in ("done", "failed") and (e.get("space"), e.get("row")) in cohort_of:
            cohort = cohort_of[(e["space"], e["row"])]
            finished[cohort] = max(finished.get(cohort, 0.0), e["t"])
    out: dict[str, dict] = defaultdict(lambda: {"rows": 0, "cohorts": 0, "wall_s": 0.0})
    for (space, rows, t0), t1 in finished.items():
        s = out[space]
        s["rows"] += len(rows)
        s["cohorts"] += 1
        s["wall_s"] += t1 - t0
    return dict(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="the run's directory (log.jsonl and results.h5)")
    ap.add_argument("--threads", type=int, default=2, help="threads the run's worker used (default 2)")
    args = ap.parse_args()
    from nps.pipeline.results.reader import open_readonly

    for space, s in sorted(space_costs(os.path.join(args.run, "log.jsonl")).items()):
        print(json.dumps({"bench": "study_cost", "kind": "space", "space": space, **s,
                          "per_row_s": round(s["wall_s"] / s["rows"], 2), "wall_s": round(s["wall_s"], 1),
                          "cpu_s": round(s["wall_s"] * args.threads, 1)}))
    with open_readonly(os.path.join(args.run, "results.h5")) as reader:
        base = float(reader.attrs.get("base_train_s", float("nan")))
        print(json.dumps({"bench": "study_cost", "kind": "base", "train_s": round(base, 1),
                          "cpu_s": round(base * args.threads, 1)}))
        for name, ref in sorted(reader.references().items()):
            t = float(ref.get("train_s", float("nan")))
            print(json.dumps({"bench": "study_cost", "kind": "reference", "name": name, "model": ref.get("model"),
                              "seed": ref.get("seed"), "train_s": round(t, 1), "cpu_s": round(t * args.threads, 1)}))


if __name__ == "__main__":
    main()
