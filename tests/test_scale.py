"""Population scale: `nps report` and `nps status` on 5,000 finished rows in 12 regimes (a synthetic file from
tools/make_synthetic_results.py) read each column of the file once and draw each figure once, with every figure
written (tools/bench_scale.py measures their seconds)."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import h5py
import pytest
from matplotlib.figure import Figure

from nps.pipeline import cli

ROOT = Path(__file__).resolve().parents[1]


def counted_reads(monkeypatch) -> Counter:
    """Reads of each HDF5 dataset (by its path in the file) from now on."""
    reads: Counter = Counter()
    read = h5py.Dataset.__getitem__

    def counting(self, key, *args, **kwargs):
        reads[self.name] += 1
        return read(self, key, *args, **kwargs)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", counting)
    return reads


def counted_figures(monkeypatch) -> Counter:
    """Figures saved, by file name, from now on."""
    saved: Counter = Counter()
    save = Figure.savefig

    def counting(self, path, *args, **kwargs):
        saved[Path(path).name] += 1
        return save(self, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", counting)
    return saved


@pytest.mark.slow
def test_report_and_status_on_5000_rows_in_12_regimes(tmp_path, monkeypatch, capsys):
    results = tmp_path / "synthetic.h5"
    made = subprocess.run([sys.executable, str(ROOT / "tools" / "make_synthetic_results.py"), str(results),
                           "--rows", "5000"], capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr
    reads, saved = counted_reads(monkeypatch), counted_figures(monkeypatch)
    with h5py.File(results, "r") as f:
        spaces = list(f["spaces"])
    assert len(spaces) == 48

    assert cli.main(["status", str(results)]) == 0
    assert "complete: 5000 done, 0 failed of 5000 subnetworks" in capsys.readouterr().out
    # status reads two columns of each space, once each
    assert reads == Counter({f"/spaces/{s}/{c}": 1 for s in spaces for c in ("status", "top1")})

    reads.clear()
    assert cli.main(["report", str(results), "--out", str(tmp_path / "report")]) == 0
    assert reads and set(reads.values()) == {1}, [name for name, n in reads.items() if n > 1]  # each column once
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["counts"]["done"] == 5000 and len(summary["regimes"]) == 12
    assert all((tmp_path / "report" / f["file"]).is_file() for f in summary["figures"].values())
    # each figure drawn once: none drawn again, none drawn and thrown away
    assert saved == Counter({f["file"]: 1 for f in summary["figures"].values()})
