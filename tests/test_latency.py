"""Measured latency (``nps latency``, ``[output] latency``): a measurement stable enough to rank networks, the
timings stored in and read back from the results file by its one writer, and the report's latency figure."""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

SPACE = "std-0.05@c_flops=0.1"


@pytest.fixture(scope="module")
def table():
    from nps.pipeline.network.layer_table import build_layer_table

    return build_layer_table("resnet20", "all", 28, 10, 1)  # the demo's base network


def make_file(path: Path, table, *, n: int = 4, done: int = 3) -> Path:
    """A results file of the demo's network: one space at c_flops 0.1 with ``done`` finished rows of ``n``."""
    from nps.kernels.spaces import parse_space
    from nps.pipeline.experiment.sampling import sample_rows
    from nps.pipeline.results.store import ResultsStore

    rows, attrs, _ = sample_rows(table, parse_space("std-0.05", "c_flops", 0.1), n, 0)
    config = '[experiment]\nname = "t"\n[model]\nname = "resnet20"\n[retrain]\namp = "off"\n'
    store = ResultsStore.create(path, table, config, {"base_top1": 90.0, "base_flops": table.base_flops,
                                                      "base_params": table.base_params})
    try:
        store.add_space(SPACE, rows, epochs=1, attrs=attrs)
        top1 = 80.0 + np.arange(done)
        store.record(SPACE, range(done), done=[True] * done, top1=top1, top5=top1, loss=top1 / 100,
                     bn_top1=top1, train_s=[1.0] * done, curves=[None] * done, errors=[""] * done)
    finally:
        store.close()
    return path


def test_the_base_is_slower_than_a_c_flops_0_1_subnetwork_in_10_of_10_repeats(table):
    """The measurement ranks: the demo's ResNet-20 against its uniform c_flops-0.1 subnetwork, each repeat a fresh
    measurement of both (few runs each, as a quick `nps latency --runs 5` would; one thread, channels_last, float32:
    what `[retrain] amp = "auto"` is on a CPU without bf16 instructions; with them, bf16 autocast's casts dominate a
    batch of one and the two are within about 15 %, see README), at batch 1 and 16."""
    from nps.pipeline.experiment.sampling import baseline_rows
    from nps.pipeline.network.models import build_model
    from nps.pipeline.network.prune import prune_model
    from nps.pipeline.results.latency import time_network

    torch.manual_seed(0)
    base = build_model("resnet20", num_classes=10, in_channels=1)
    rows, _ = baseline_rows(table, "c_flops", 0.1, 0, delta=0.002, R=0.95)
    sub = prune_model(base, table, rows["keep"][0])
    cpu = torch.device("cpu")
    for batch in (1, 16):
        wins = []
        for _ in range(10):
            t_base, t_sub = (time_network(m, table, batch, device=cpu, channels_last=True, amp_dtype=None, warmup=2,
                                          runs=5, min_run_s=0.01) for m in (base, sub))
            assert t_base.q25_s <= t_base.median_s <= t_base.q75_s and t_base.runs == 5
            wins.append(t_base.median_s > t_sub.median_s)
        assert sum(wins) == 10, (batch, wins)


def test_nps_latency_stores_the_timings_and_reads_them_back(table, tmp_path, capsys):
    from nps.pipeline.cli import main
    from nps.pipeline.results.latency import read_latency
    from nps.pipeline.results.reader import open_readonly

    path = make_file(tmp_path / "results.h5", table)
    argv = ["latency", str(path), "--runs", "3", "--warmup", "1", "--batch", "1,4", "--threads", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "base network" in out and SPACE in out and "/latency/cpu" in out and "1 threads" in out
    with open_readonly(path) as reader:
        cpu = read_latency(reader)["cpu"]
    assert sorted(zip(cpu["space"], cpu["row"].tolist(), cpu["batch"].tolist())) == sorted(
        [("base", -1, 1), ("base", -1, 4)] + [(SPACE, r, b) for r in range(3) for b in (1, 4)])
    assert np.all(cpu["median_s"] > 0) and np.all(cpu["iqr_s"] >= 0) and np.all(cpu["runs"] == 3)
    assert np.all(np.isfinite(cpu["speedup"]))
    base = cpu["space"] == "base"
    np.testing.assert_allclose(cpu["speedup"][base], 1.0)
    attrs = cpu["attrs"]
    assert attrs["threads"] == 1 and attrs["channels_last"] and attrs["amp"] == "off"  # the run's [retrain] amp
    assert attrs["versions"]["torch"] == torch.__version__ and attrs["device_name"]
    assert attrs["batches"] == [1, 4] and len(attrs["sessions"]) == 1

    # Any row has an architecture: --all-rows --missing times the one row not trained (and the base, again).
    assert main(argv + ["--all-rows", "--missing"]) == 0
    with open_readonly(path) as reader:
        cpu = read_latency(reader)["cpu"]
    assert sorted(set(zip(cpu["space"], cpu["row"].tolist()))) == [("base", -1)] + [(SPACE, r) for r in range(4)]
    assert set(cpu["session"][cpu["row"] == 3]) == {1} and set(cpu["session"][cpu["row"] == 0]) == {0}
    assert len(cpu["attrs"]["sessions"]) == 2


def test_latency_is_refused_while_a_run_holds_the_file(table, tmp_path, capsys):
    from nps.pipeline.cli import main
    from nps.pipeline.errors import NpsError
    from nps.pipeline.results import h5file
    from nps.pipeline.results.latency import Timing, store_latency

    path = make_file(tmp_path / "results.h5", table, n=2, done=1)
    with h5file.writer_lock(str(path)):
        assert main(["latency", str(path), "--runs", "3"]) == 2
        err = capsys.readouterr().err
        assert "being written by a run" in err and "[output] latency" in err and len(err.strip().splitlines()) == 1
        session = {"device": "cpu", "settings": {}, "records": [
            {"space": "base", "row": -1, "batch": 1, "timing": Timing(1.0, 1.0, 1.0, 3, 1), "weights": False}]}
        with pytest.raises(NpsError, match="being written by another process"):
            store_latency(path, session)
    assert main(["latency", str(path), "--batch", "0"]) == 2
    assert "--batch" in capsys.readouterr().err


def test_output_latency_measures_at_the_end_of_a_run(table, tmp_path, monkeypatch):
    """``[output] latency = true``: the run's end times every finished row not timed yet (here: the session's
    hook on a finished file; tests/test_onnx.py runs it at the end of a real run)."""
    from nps.pipeline.experiment.config import load_config
    from nps.pipeline.results import latency
    from nps.pipeline.results.reader import open_readonly
    from nps.pipeline.run.session import measure_latency

    cfg = load_config("demo", ["output.latency=true"])
    assert cfg.output.latency is True and load_config("demo", []).output.latency is False
    monkeypatch.setattr(latency, "DEFAULT_RUNS", 3)
    monkeypatch.setattr(latency, "DEFAULT_BATCHES", (1,))
    path = make_file(tmp_path / "results.h5", table)
    notes = []
    plan = SimpleNamespace(results_path=str(path), config=SimpleNamespace(
        experiment=SimpleNamespace(devices="cpu", ray=""), output=cfg.output))
    measure_latency(plan, SimpleNamespace(note=notes.append), devices=None, ray=None)
    assert "3 subnetworks and the base network timed at batch 1" in notes[-1]
    with open_readonly(path) as reader:
        assert sorted(read(reader)) == [("base", -1)] + [(SPACE, r) for r in range(3)]
    measure_latency(plan, SimpleNamespace(note=notes.append), devices=["cpu"], ray=None)  # nothing new to time
    assert "every finished row is timed on cpu already" in notes[-1]
    with open_readonly(path) as reader:
        assert len(latency.read_latency(reader)["cpu"]["attrs"]["sessions"]) == 1


def read(reader):
    from nps.pipeline.results.latency import read_latency

    cpu = read_latency(reader)["cpu"]
    return set(zip(cpu["space"], cpu["row"].tolist()))


def test_the_report_draws_the_latency(table, tmp_path):
    from nps.pipeline.results.latency import measure_results, store_latency
    from nps.pipeline.results.report import write_report

    path = make_file(tmp_path / "results.h5", table)
    store_latency(path, measure_results(path, batches=(1, 8), runs=3, warmup=1, threads=1))
    summary = write_report(path, tmp_path / "report", n_boot=50)
    info = summary["latency"]["cpu"]
    assert info["batches"] == [1, 8] and info["threads"] == 1
    assert set(info["base"]) == {"1", "8"} and info["base"]["1"]["speedup"] == pytest.approx(1.0)
    (space,) = info["spaces"]
    assert space["group"] == SPACE and space["rows"] == [0, 1, 2] and len(space["speedup"]["8"]) == 3
    (winner,) = info["winners"]
    assert winner["row"] == 2 and winner["top1"] == pytest.approx(82.0)  # the lowest drop
    assert winner["latency"]["1"]["median_ms"] > 0
    for batch in ("1", "8"):
        front = info["frontier"][batch]
        assert front and all(a["latency_ms"] <= b["latency_ms"] and a["top1"] < b["top1"]
                             for a, b in itertools.pairwise(front))
        assert front[-1]["group"] == "base"  # the most accurate network
    assert (tmp_path / "report" / "latency_cpu.png").stat().st_size > 10_000
    assert "latency_cpu.png" in (tmp_path / "report" / "index.html").read_text()
    on_disk = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert on_disk["latency"]["cpu"]["winners"][0]["row"] == 2
    assert all(math.isfinite(v) for v in on_disk["latency"]["cpu"]["spaces"][0]["latency_ms"]["1"])
