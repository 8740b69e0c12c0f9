"""Population scale: `nps report` and `nps status` on 5,000 finished rows in 12 regimes (a synthetic file from
tools/make_synthetic_results.py) each finish within 30 s, with every figure written."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NPS = [sys.executable, "-m", "nps.pipeline.cli"]


@pytest.mark.slow
def test_report_and_status_on_5000_rows_in_12_regimes(tmp_path):
    results = tmp_path / "synthetic.h5"
    made = subprocess.run([sys.executable, str(ROOT / "tools" / "make_synthetic_results.py"), str(results),
                           "--rows", "5000"], capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr
    t0 = time.perf_counter()
    report = subprocess.run([*NPS, "report", str(results), "--out", str(tmp_path / "report")], capture_output=True,
                            text=True, timeout=120)
    report_s = time.perf_counter() - t0
    assert report.returncode == 0, report.stderr
    t0 = time.perf_counter()
    status = subprocess.run([*NPS, "status", str(results)], capture_output=True, text=True, timeout=120)
    status_s = time.perf_counter() - t0
    assert status.returncode == 0, status.stderr
    assert "complete: 5000 done, 0 failed of 5000 subnetworks" in status.stdout
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["counts"]["done"] == 5000 and len(summary["regimes"]) == 12
    assert all((tmp_path / "report" / f["file"]).is_file() for f in summary["figures"].values())
    assert report_s <= 30 and status_s <= 30, (report_s, status_s)
