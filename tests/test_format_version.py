"""A results file names its format (root attribute ``format_version``); this nps reads, resumes, reports and exports a
file of format 1 (the layout before the attribute: tests/data/results-format1.h5, written by the nps of commit
f03adfa, see tests/data/make_results_format1.py), and every command refuses a file of a newer format in one line
naming both formats and what to do, changing nothing."""
from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import StandInTable, cpu_experiment_head, rows_for_store

from nps.pipeline.cli import main

KEPT = Path(__file__).parent / "data" / "results-format1.h5"
DOCS = Path(__file__).parent.parent / "docs" / "results-format.md"
FILTERS = "std-0.05@c_flops=0.25"  # the kept file's filter space: rows 0-2 done, 3 failed, 4 pending


def current_format() -> int:
    from nps.pipeline.results.format import FORMAT_VERSION

    return FORMAT_VERSION


def format_attr(path) -> object:
    with h5py.File(path, "r") as f:
        return f.attrs.get("format_version")


@pytest.fixture
def format1(tmp_path) -> Path:
    """A copy of the kept format-1 file (the kept one is never opened for writing)."""
    path = tmp_path / "format1" / "results.h5"
    path.parent.mkdir()
    shutil.copyfile(KEPT, path)
    return path


@pytest.fixture
def newer(format1) -> Path:
    """The kept file as a newer nps's format 99 would name itself."""
    with h5py.File(format1, "r+") as f:
        f.attrs["format_version"] = 99
    return format1


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_the_kept_file_is_format_1():
    """The kept file has today's layout before the attribute: without it, and written by nps 0.1.0."""
    from nps.pipeline.results.format import file_format

    with h5py.File(KEPT, "r") as f:
        assert "format_version" not in f.attrs
        assert f.attrs["nps_version"] == "0.1.0"
        assert {"layers", "spaces", "weight_layers", "references", "latency"} <= set(f)
        assert file_format(f.attrs, str(KEPT)) == 1


def test_a_new_file_names_the_current_format(tmp_path):
    from nps.pipeline.results.store import ResultsStore, open_readonly

    store = ResultsStore.create(tmp_path / "r.h5", StandInTable(), "[experiment]\nname = 'x'\n", {"base_top1": 90.0})
    store.add_space("std-0.05@c_flops=0.25", rows_for_store(3), epochs=1)
    store.close()
    assert format_attr(tmp_path / "r.h5") == current_format() == 4
    with open_readonly(tmp_path / "r.h5") as reader:
        assert reader.format == 4


def test_status_table_and_report_read_a_format_1_file(format1, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps at 80 columns off a terminal
    before = format1.read_bytes()
    assert main(["status", str(format1)]) == 0
    out = capsys.readouterr().out
    assert "experiment format1" in out and "5 done, 1 failed of 7 subnetworks" in out
    assert main(["table", str(format1), "--out", str(tmp_path / "rows.csv")]) == 0
    with open(tmp_path / "rows.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 7
    done = [r for r in rows if r["space"] == FILTERS and r["status"] == "done"]
    assert sorted(float(r["top1"]) for r in done) == [78.5, 80.25, 81.0]
    assert main(["report", str(format1), "--out", str(tmp_path / "report")]) == 0
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["counts"]["total"] == 7 and summary["counts"]["finished"] == 5
    assert format1.read_bytes() == before  # readers never change a file, nor its format


def test_export_reads_a_format_1_file_and_refuses_for_its_own_reason(format1, tmp_path, capsys):
    """The kept file has no fine-tuned weights beside it: export gets past the format and says what is missing."""
    out = tmp_path / "w.pt"
    assert main(["export", str(format1), "--space", "std-0.05", "--best", "--out", str(out)]) == 2
    line = one_line_error(capsys)
    assert "weights" in line and "results format" not in line
    assert main(["export", str(format1), "--space", "std-0.05", "--row", "4", "--out", str(out)]) == 2
    line = one_line_error(capsys)
    assert "pending" in line and "results format" not in line
    assert not out.exists()


def test_a_writer_records_the_current_format_on_a_format_1_file_when_it_writes(format1):
    from nps.pipeline.results.store import DONE, PENDING, ResultsStore, open_readonly

    store = ResultsStore.open(format1)  # opened, nothing written: the file stays format 1
    assert store.format == 1
    store.close()
    assert format_attr(format1) is None
    store = ResultsStore.open(format1)
    store.reset_running(FILTERS)  # what a resume does first: its first write
    assert store.format == current_format()
    store.reset_failed(FILTERS)  # and the rows it writes are the file's as before
    store.close()
    assert format_attr(format1) == current_format()
    with open_readonly(format1) as reader:
        assert reader.format == current_format()
        cols = reader.read(FILTERS, ["status", "top1", "error"])
    assert cols["status"].tolist() == [DONE, DONE, DONE, PENDING, PENDING]
    np.testing.assert_array_equal(cols["top1"], [80.25, 78.5, 81.0, np.nan, np.nan])
    assert cols["error"].tolist() == [""] * 5


def test_storing_latency_on_a_format_1_file_records_the_current_format(format1):
    """``nps latency``'s writer path (``editing``, never in SWMR mode) writes to the file too."""
    from nps.pipeline.results.store import ResultsStore

    store = ResultsStore.open(format1)
    with store.editing() as f:
        f["latency"]["cpu"].attrs["note"] = "re-measured"
    store.close()
    assert format_attr(format1) == current_format()


@pytest.mark.parametrize("command", ["status", "report", "table", "export", "latency"])
def test_every_command_refuses_a_newer_format_in_one_line(newer, tmp_path, capsys, command):
    out = tmp_path / "out"
    argv = {"status": ["status", newer], "report": ["report", newer, "--out", out],
            "table": ["table", newer, "--out", tmp_path / "rows.csv"],
            "export": ["export", newer, "--space", "std-0.05", "--best", "--out", tmp_path / "w.pt"],
            "latency": ["latency", newer, "--batch", "1", "--runs", "3", "--warmup", "0"]}[command]
    before = newer.read_bytes()
    assert main([str(a) for a in argv]) == 2
    line = one_line_error(capsys)
    assert f"{newer} is results format 99 (written by nps 0.1.0)" in line
    assert line.endswith(f"; this nps reads results formats up to {current_format()}: upgrade nps "
                         "(pip install -U nps) to read it"), line
    assert newer.read_bytes() == before
    assert not out.exists() and not (tmp_path / "rows.csv").exists() and not (tmp_path / "w.pt").exists()


def test_the_writer_refuses_a_newer_format_and_leaves_it_unchanged(newer):
    from nps.pipeline.errors import NpsError
    from nps.pipeline.results.store import ResultsStore

    before = newer.read_bytes()
    with pytest.raises(NpsError, match=rf"is results format 99 .* up to {current_format()}: upgrade nps "
                                       r"\(pip install -U nps\) to write it$"):
        ResultsStore.open(newer)
    assert newer.read_bytes() == before


@pytest.mark.parametrize("value", ["two", -1, 0, 2.5])
def test_a_format_attribute_that_is_not_a_format_number_is_one_line(format1, capsys, value):
    with h5py.File(format1, "r+") as f:
        f.attrs["format_version"] = value
    assert main(["status", str(format1)]) == 2
    line = one_line_error(capsys)
    assert f"{format1}: its root attribute format_version is" in line and "damaged" in line


def test_a_damaged_root_group_is_one_line_for_readers_and_the_writer(format1, capsys):
    """The format is the first thing read: a root object HDF5 cannot read is a damaged file, not a bug."""
    from nps.pipeline.errors import NpsError
    from nps.pipeline.results.store import ResultsStore

    data = bytearray(format1.read_bytes())
    data[64:320] = b"\xff" * 256  # the root object's header
    format1.write_bytes(bytes(data))
    assert main(["status", str(format1)]) == 2
    assert "the file is damaged" in one_line_error(capsys)
    with pytest.raises(NpsError, match="the file is damaged"):
        ResultsStore.open(format1)


def test_every_format_is_documented():
    """docs/results-format.md has a row for each format this nps knows, and names the newest as the current one."""
    from nps.pipeline.results.format import VERSIONS, format_after_write

    assert [v.number for v in VERSIONS] == list(range(1, len(VERSIONS) + 1))
    assert format_after_write(1) == current_format() and format_after_write(current_format()) == current_format()
    text = DOCS.read_text()
    for version in VERSIONS:
        assert re.search(rf"^\| {version.number} \|", text, re.M), f"docs/results-format.md: no row for {version}"
    assert f"format_version = {current_format()}" in text


@pytest.fixture
def tiny_experiment(tmp_path, fmnist_dir, base_checkpoint) -> Path:
    text = cpu_experiment_head("format", 1, tmp_path / "run", fmnist_dir(256), base_checkpoint) + """
[[spaces]]
name = "std-0.05"
c_flops = 0.25
n = 2

[retrain]
epochs = 1
batch_size = 32
bn_images = 64
"""
    path = tmp_path / "format.toml"
    path.write_text(text)
    return path


@pytest.mark.fmnist
def test_a_run_resumes_a_format_1_file_and_records_the_current_format(tiny_experiment, tmp_path):
    """A run's own file made format 1 (the attribute removed: the layouts are otherwise the same) resumes: the
    same experiment, its rows kept, and the file is of the current format from its first write on."""
    from nps.pipeline.experiment.config import parse_config
    from nps.pipeline.experiment.plan import validate
    from nps.pipeline.run import open_results, sample_missing_spaces

    plan = validate(parse_config(tiny_experiment.read_text()))
    store, resumed = open_results(plan)
    sample_missing_spaces(store, plan)
    recipes = {space: store.read(space, ["recipe"])["recipe"] for space in store.spaces()}
    store.close()
    with h5py.File(plan.results_path, "r+") as f:
        del f.attrs["format_version"]
    plan = validate(parse_config(tiny_experiment.read_text()))
    store, resumed = open_results(plan)
    try:
        assert resumed and store.format == current_format()
        assert sorted(store.spaces()) == sorted(recipes)
        for space, recipe in recipes.items():
            np.testing.assert_array_equal(store.read(space, ["recipe"])["recipe"], recipe)
    finally:
        store.close()
    assert format_attr(plan.results_path) == current_format()


@pytest.mark.fmnist
def test_a_run_refuses_to_resume_a_newer_format_in_one_line(tiny_experiment, tmp_path, capsys):
    results = tmp_path / "run" / "results.h5"
    results.parent.mkdir()
    shutil.copyfile(KEPT, results)
    with h5py.File(results, "r+") as f:
        f.attrs["format_version"] = 99
    before = results.read_bytes()
    assert main(["run", str(tiny_experiment)]) == 2
    line = one_line_error(capsys)
    assert f"{results} is results format 99" in line and f"up to {current_format()}: upgrade nps" in line
    assert results.read_bytes() == before
    assert sorted(p.name for p in results.parent.iterdir()) == ["results.h5"]
