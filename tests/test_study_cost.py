"""tools/study_cost.py: a space's cost is the wall time of its cohorts, dispatch to last result, counted once per
cohort (not once per row, as the rows' train_s would be)."""
from __future__ import annotations

import json

from helpers import load_tool


def _tool():
    return load_tool("study_cost")


def test_cohorts_are_timed_from_dispatch_to_their_last_result(tmp_path):
    events = [{"t": 0.0, "event": "dispatch", "space": "a", "rows": [0, 1]},
              {"t": 1.0, "event": "dispatch", "space": "b", "rows": [0]},
              {"t": 10.0, "event": "done", "space": "a", "row": 1},
              {"t": 12.0, "event": "done", "space": "a", "row": 0},
              {"t": 13.0, "event": "dispatch", "space": "a", "rows": [2]},  # dispatched again after a stop
              {"t": 14.0, "event": "dispatch", "space": "a", "rows": [2]},
              {"t": 20.0, "event": "failed", "space": "a", "row": 2},
              {"t": 21.0, "event": "done", "space": "b", "row": 0}]
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(e) + "\n" for e in events))
    costs = _tool().space_costs(str(log))
    assert costs["a"] == {"rows": 3, "cohorts": 2, "wall_s": 12.0 + 6.0}
    assert costs["b"] == {"rows": 1, "cohorts": 1, "wall_s": 20.0}
