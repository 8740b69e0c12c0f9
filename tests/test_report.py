"""nps report on results files written here with the store: summary.json against the raw HDF5 datasets, partial
files (a writer still open), one space / one regime, no finished rows, and the output-directory rules."""
import json
import math
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from nps.kernels.samplers import sample_space
from nps.kernels.spaces import parse_space, uniform_ratio
from nps.pipeline.cli import main
from nps.pipeline.errors import NpsError
from nps.pipeline.network.layer_table import build_layer_table
from nps.pipeline.results.report import write_report
from nps.pipeline.results.store import DONE, FAILED, PENDING, RUNNING, ResultsStore
from nps.pipeline.row_status import Result

torch.set_num_threads(1)

BASE_TOP1 = 91.0
CONFIG = '[model]\nname = "resnet20"\nmode = "all"\nresolution = 32\n'
SPACES = [("std-0.01", "c_flops", 0.5), ("std-0.1", "c_flops", 0.5), ("std-0.01", "c_flops", 0.25),
          ("std-0.1", "c_flops", 0.25), ("std-0.05", "c_params", 0.3)]
N = 24
K = 5
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def table():
    return build_layer_table("resnet20", "all", 32, 10)


def outcome(space_index: int, row: int) -> str:
    """Which state the synthetic run leaves each row in."""
    if row % 7 == 3:
        return "failed"
    if row % 11 == 5:
        return "pending"
    if row % 13 == 6:
        return "running"
    if space_index == 0 and row == 2:
        return "nan"
    return "done"


def make_results(path, table, spaces=SPACES, n=N, outcome=outcome, keep_open=False):
    """A results file as a run writes it: real sampled recipes, synthetic distinct top-1 values."""
    store = ResultsStore.create(path, table, CONFIG, {"base_top1": BASE_TOP1, "base_top5": 99.0,
                                                      "base_flops": table.base_flops,
                                                      "base_params": table.base_params})
    rng = np.random.default_rng(0)
    drops = rng.permutation(len(spaces) * n) * 0.01 - 0.5  # distinct, some negative (better than the base)
    for s, (name, target, value) in enumerate(spaces):
        space = parse_space(name, target, value)
        sample = sample_space(table, space, n, seed=s)
        rows = {"recipe": sample.recipe, "keep": sample.keep, "flops": sample.flops, "params": sample.params,
                "c_flops": sample.c_flops, "c_params": sample.c_params, "mcb": sample.mcb, "std": sample.std,
                "seed": np.arange(n) + 100 * s}
        store.add_space(space.regime, rows, epochs=2,
                        attrs={"space": name, "target": target, "value": value, "delta": space.delta})
    for s, (name, target, value) in enumerate(spaces):
        regime = parse_space(name, target, value).regime
        for row in range(n):
            what = outcome(s, row)
            if what == "failed":
                store.record(regime, [row], [Result.failed(error="loss became NaN")])
            elif what == "running":
                store.mark_running(regime, [row])
            elif what == "nan":
                store.record(regime, [row], [Result.done(top1=math.nan, top5=math.nan, loss=math.nan)])
            elif what == "done":
                store.record(regime, [row], [Result.done(top1=BASE_TOP1 - drops[s * n + row], top5=99.0, loss=0.5)])
    if keep_open:
        return store
    store.close()
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory, table):
    root = tmp_path_factory.mktemp("report")
    results = make_results(root / "results.h5", table)
    summary = write_report(results, root / "out", k=K, n_boot=200, seed=1)
    return results, root / "out", summary


def raw_finished(results):
    """Per group, straight from h5py: (rows, drops, the whole group) of done rows with finite scores."""
    out = {}
    with h5py.File(results, "r") as f:
        for name, g in f["spaces"].items():
            status, drop, top1 = g["status"][()], g["acc_drop"][()].astype(np.float64), g["top1"][()]
            ok = (status == DONE) & np.isfinite(drop) & np.isfinite(top1)
            out[name] = {"rows": np.flatnonzero(ok), "drop": drop[ok], "status": status,
                         **{k: g[k][()][ok] for k in ("std", "c_flops", "c_params", "mcb", "recipe")}}
    return out


def test_summary_numbers_equal_the_raw_hdf5(report, table):
    results, out, summary = report
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["regimes"][0]["edf_grid"] == summary["regimes"][0]["edf_grid"]
    raw = raw_finished(results)
    assert [r["key"] for r in on_disk["regimes"]] == ["c_flops=0.5", "c_flops=0.25", "c_params=0.3"]
    total = 0
    for reg in on_disk["regimes"]:
        grid = np.asarray(reg["edf_grid"])
        everyone = []
        for sp in reg["spaces"]:
            r = raw[sp["group"]]
            status = r["status"]
            assert sp["counts"] == {"total": N, "pending": int((status == PENDING).sum()),
                                    "running": int((status == RUNNING).sum()), "done": int((status == DONE).sum()),
                                    "failed": int((status == FAILED).sum()),
                                    "nan": int((status == DONE).sum()) - r["rows"].size}
            total += r["rows"].size
            assert sp["n"] == r["rows"].size and sp["finished"]["row"] == r["rows"].tolist()
            # Eq. 1, computed here from the raw drops
            assert sp["edf"]["F"] == [float(np.mean(r["drop"] < e)) for e in grid]
            for field in ("std", "c_flops", "c_params", "mcb"):
                counts, _ = np.histogram(r[field].astype(np.float64), bins=np.asarray(reg["hist_edges"][field]))
                assert sp["hist"][field] == counts.tolist(), field
            best = int(np.argmin(r["drop"]))
            assert sp["winner"]["row"] == int(r["rows"][best])
            assert sp["winner"]["recipe"] == r["recipe"][best].astype(np.float64).tolist()
            everyone += [(float(d), sp["space"], int(row)) for d, row in zip(r["drop"], r["rows"])]
        everyone.sort()
        bk = reg["best_k"]
        assert list(zip(bk["acc_drop"], bk["space"], bk["row"])) == everyone[:K]
        assert reg["winner"]["acc_drop"] == everyone[0][0]
        assert len(reg["rest"]["c_params"]) == len(everyone) - K  # grey in best_k.png: the finished not in best-k
        u = uniform_ratio(table, reg["target"], reg["value"])
        keep = table.keep(np.full(len(table), u))
        assert reg["uniform"]["mcb"] == pytest.approx(float(table.mcb(keep)))
    assert on_disk["counts"]["finished"] == total
    assert on_disk["counts"]["failed"] == sum(int((r["status"] == FAILED).sum()) for r in raw.values())
    om = on_disk["optimal_mcb"]
    assert len(om["points"]["mcb"]) == 3 * K and om["fit"]["kind"] == "power"
    assert on_disk["drop_vs_mcb"]["fit"]["kind"] == "linear"  # 3 regimes: too few winners for three parameters
    assert any("pending" in n for n in on_disk["notes"]) and any("failed" in n for n in on_disk["notes"])


def test_report_files_are_complete(report):
    _, out, summary = report
    html = (out / "index.html").read_text()
    assert summary["figures"] and set(summary["figures"]) >= {"best_k", "optimal_mcb", "drop_vs_mcb", "spaces"}
    for fig in summary["figures"].values():
        assert (out / fig["file"]).read_bytes()[:8] == PNG
        assert f'src="{fig["file"]}"' in html
    assert "P(highest EDF)" in html and "pending" in html
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []


class ReaderProcess:
    """What a user does while a run writes the file: read it from another process (SWMR), as nps report does.

    One process (one torch import) answers every request: each line on its stdin asks for a fresh summary.
    """

    CODE = ("import json, sys\nfrom nps.pipeline.results.report import build_summary\nfor _ in sys.stdin:\n"
            "    print(json.dumps(build_summary(sys.argv[1], k=3, n_boot=50)), flush=True)\n")

    def __init__(self, results):
        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE, str(results)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def summary(self) -> dict:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, self.proc.stderr.read()
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0, self.proc.stderr.read()


@pytest.mark.e2e
def test_report_on_a_file_a_run_is_still_writing(tmp_path, table):
    store = make_results(tmp_path / "live.h5", table, SPACES[:2], n=10,
                         outcome=lambda s, row: "done" if row < 4 else "pending", keep_open=True)
    reader = ReaderProcess(tmp_path / "live.h5")
    try:
        assert store.swmr  # a writer holds the file, as during nps run
        first = reader.summary()
        assert first["counts"]["finished"] == 8 and first["counts"]["pending"] == 12
        assert any("12 rows pending" in n for n in first["notes"])
        store.record("std-0.01@c_flops=0.5", [7], [Result.done(top1=95.0, top5=99.0, loss=0.1)])
        second = reader.summary()
        assert second["counts"]["finished"] == 9
        assert second["regimes"][0]["winner"]["row"] == 7 and second["regimes"][0]["winner"]["acc_drop"] == -4.0
        reader.close()
    finally:
        if reader.proc.poll() is None:
            reader.proc.kill()
        store.close()


def test_single_space_single_regime(tmp_path, table):
    path = make_results(tmp_path / "one.h5", table, SPACES[:1], n=12, outcome=lambda s, row: "done")
    s = write_report(path, tmp_path / "out", k=40, n_boot=50)
    (reg,) = s["regimes"]
    assert reg["comparison"] is None and reg["best_k"]["n"] == 12
    assert s["optimal_mcb"]["fit"]["kind"] == "constant" and s["drop_vs_mcb"]["fit"]["kind"] == "none"
    assert any("two regimes" in n for n in s["notes"])
    assert (tmp_path / "out" / "regime_c_flops_0.5.png").read_bytes()[:8] == PNG


def test_no_finished_rows_still_writes_counts(tmp_path, table, capsys):
    path = make_results(tmp_path / "fresh.h5", table, SPACES[:2], n=6, outcome=lambda s, row: "pending")
    assert main(["report", str(path), "--out", str(tmp_path / "out")]) == 0
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["counts"] == {"total": 12, "pending": 12, "running": 0, "done": 0, "failed": 0, "nan": 0,
                           "finished": 0}
    assert s["figures"] == {} and all(r["best_k"] is None for r in s["regimes"])
    assert "no finished rows yet" in (tmp_path / "out" / "index.html").read_text()
    assert "no finished rows yet" in capsys.readouterr().out


def test_output_directory_rules(tmp_path, table, capsys):
    path = make_results(tmp_path / "r.h5", table, SPACES[:1], n=4, outcome=lambda s, row: "pending")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    assert main(["report", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not empty; pass --force" in err and len(err.strip().splitlines()) == 1
    assert (out / "old.txt").exists()
    assert main(["report", str(path), "--out", str(out), "--force"]) == 0
    assert not (out / "old.txt").exists() and (out / "summary.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(NpsError, match="not a directory"):
        write_report(path, path)
    assert main(["report", str(path), "--out", str(tmp_path / "o2"), "--k", "0"]) == 2
    assert main(["report", str(tmp_path / "missing.h5"), "--out", str(tmp_path / "o3")]) == 2
    assert "no such results file" in capsys.readouterr().err


def test_many_groups_and_granularity_stay_readable(tmp_path):
    """DenseNet-121's 120 groups: the recipes are lines, the layer table folds away; RegNet's granularity and the
    FLOPs convention are stated."""
    dense = build_layer_table("densenet121", "all", 32, 10, flops="paper")
    make_results(tmp_path / "dense.h5", dense, spaces=SPACES[:2], n=8, outcome=lambda s, r: "done")
    summary = write_report(tmp_path / "dense.h5", tmp_path / "dense", k=3, n_boot=50)
    assert summary["model"]["flops_convention"] == "paper" and len(summary["model"]["groups"]) == 120
    page = (tmp_path / "dense" / "index.html").read_text()
    assert "<h2>Layer table</h2>" in page and "<details><summary>show all 120 groups" in page
    assert "ptflops" in page
    assert "<td>119</td><td class=l>features.denseblock4.denselayer16.conv1</td><td>128</td>" in page
    regnet = build_layer_table("regnet_x_400mf", "all", 32, 10, channel_multiple=8)
    make_results(tmp_path / "regnet.h5", regnet, spaces=SPACES[1:2], n=6, outcome=lambda s, r: "done")
    summary = write_report(tmp_path / "regnet.h5", tmp_path / "regnet", k=3, n_boot=50)
    assert summary["model"]["granularity"] == regnet.granularity.tolist()
    assert summary["model"]["channel_multiple"] == 8
    winner = summary["regimes"][0]["spaces"][0]["winner"]
    assert all(k % g == 0 for k, g in zip(winner["keep"], summary["model"]["granularity"]))
    page = (tmp_path / "regnet" / "index.html").read_text()
    assert "multiply-accumulates" in page and "<th>multiple</th>" in page


def test_baseline_rows_are_marked_and_beaten_fractions_match_the_raw_file(tmp_path, table):
    from nps.pipeline.experiment.sampling import baseline_key, baseline_rows

    path = tmp_path / "r.h5"
    make_results(path, table, spaces=SPACES[:2], n=N, outcome=lambda s, r: "done")
    store = ResultsStore.open(path)
    rows, attrs = baseline_rows(table, "c_flops", 0.5, 0, delta=0.002, R=0.95)
    store.add_space(baseline_key("c_flops", 0.5), rows, epochs=1, attrs=attrs)
    store.record(baseline_key("c_flops", 0.5), [0], [Result.done(top1=BASE_TOP1 + 0.25, top5=99.0, loss=0.5)])
    store.close()
    summary = write_report(path, tmp_path / "report", k=K, n_boot=200)
    (reg,) = summary["regimes"]
    assert [s["space"] for s in reg["spaces"]] == ["std-0.01", "std-0.1"]  # the baseline is not a space
    assert reg["baseline"]["n"] == 1 and reg["baseline"]["acc_drop"] == pytest.approx(-0.25, abs=1e-5)
    # ResNet-20's 16-channel groups: the closest uniform recipe misses 0.5 by 0.0025 (said in the attrs)
    assert reg["baseline"]["c_flops"] == pytest.approx(attrs["achieved"], abs=1e-6) and not attrs["within_delta"]
    assert len(set(reg["baseline"]["recipe"])) == 1
    with h5py.File(path, "r") as f:
        baseline_drop = f["spaces"][baseline_key("c_flops", 0.5)]["acc_drop"][0]
        for s in reg["spaces"]:
            g = f["spaces"][s["group"]]
            drops = g["acc_drop"][()][g["status"][()] == DONE]
            beats = s["beats_baseline"]
            assert beats["fraction"] == pytest.approx(np.mean(drops < baseline_drop)) and 0 < beats["fraction"] < 1
            assert beats["ci"][0] <= beats["fraction"] <= beats["ci"][1] and beats["n"] == len(drops)
    page = (tmp_path / "report" / "index.html").read_text()
    assert "<h2>Uniform baselines</h2>" in page and "beats the baseline" in page
    assert summary["counts"]["total"] == 2 * N + 1
    # an old file, without baseline groups, reads as before
    old = write_report(tmp_path / "r.h5", tmp_path / "again", k=K, n_boot=50, force=True)
    assert old["regimes"][0]["baseline"] is not None
    make_results(tmp_path / "old.h5", table, spaces=SPACES[:1], n=6, outcome=lambda s, r: "done")
    old = write_report(tmp_path / "old.h5", tmp_path / "old", k=3, n_boot=50)
    assert old["regimes"][0]["baseline"] is None and "beats_baseline" not in old["regimes"][0]["spaces"][0]


def test_ratio_study_panels_equal_the_raw_file(tmp_path, table):
    """Fig. 1 from ratio spaces (criteria × epochs × methods as one space each): summary.json's points and panels
    equal means computed here from the raw HDF5."""
    store = ResultsStore.create(tmp_path / "r.h5", table, CONFIG, {"base_top1": BASE_TOP1})
    rng = np.random.default_rng(1)
    settings = [("l1", "finetune", 2), ("l2", "finetune", 2), ("fpgm", "finetune", 2), ("l2", "finetune", 4),
                ("l2", "rewind", 2), ("l2", "rewind", 4), ("l2", "scratch", 2), ("l2", "scratch", 4)]
    ratios = [0.25, 0.5, 0.75]
    for criterion, method, epochs in settings:
        recipe = np.repeat(np.repeat(ratios, 2)[:, None], len(table), axis=1)  # two rows (seeds) per ratio
        keep = table.keep(recipe)
        rows = {"recipe": recipe, "keep": keep, "flops": table.flops_of(keep), "params": table.params_of(keep),
                "c_flops": table.c_flops(keep), "c_params": table.c_params(keep), "mcb": table.mcb(keep),
                "std": np.zeros(len(keep)), "seed": np.arange(len(keep))}
        name = f"ratios+criterion={criterion}+method={method}+epochs={epochs}"
        store.add_space(name, rows, epochs=epochs, attrs={"space": "ratios", "criterion": criterion,
                                                          "method": method,
                                                          "overrides": f"{criterion}, {method}, {epochs} epochs"})
        for row in range(len(keep)):
            store.record(name, [row], [Result.done(top1=BASE_TOP1 - 10 * recipe[row, 0] ** 2 - rng.uniform(0, 1),
                                                   top5=99, loss=0.5)])
    store.close()
    summary = write_report(tmp_path / "r.h5", tmp_path / "report", k=3, n_boot=20)
    study = summary["ratio_study"]
    assert summary["regimes"] == [] and (tmp_path / "report" / "ratio_study.png").is_file()
    expected = {}
    with h5py.File(tmp_path / "r.h5", "r") as f:
        for name, g in f["spaces"].items():
            a = g.attrs
            for r, d in zip(g["recipe"][()][:, 0], g["acc_drop"][()]):
                key = (a["criterion"], a["method"], int(a["epochs"]), round(float(r), 6))
                expected.setdefault(key, []).append(float(d))
    got = {(p["criterion"], p["method"], p["epochs"], p["ratio"]): p for p in study["points"]}
    assert got.keys() == expected.keys()
    for key, drops in expected.items():
        assert got[key]["drop_mean"] == pytest.approx(np.mean(drops)) and got[key]["n"] == 2
    panels = {p["name"]: p for p in study["panels"]}
    assert set(panels) == {"criteria", "epochs", "methods"}
    crit = panels["criteria"]  # l1, l2, fpgm at finetune, 2 epochs over the ratios
    assert crit["fixed"] == {"method": "finetune", "epochs": 2} and set(crit["lines"]) == {"l1", "l2", "fpgm"}
    assert crit["lines"]["l1"]["drop_mean"] == [pytest.approx(np.mean(expected[("l1", "finetune", 2, r)]))
                                               for r in ratios]
    assert set(panels["epochs"]["lines"]) == {"0.25", "0.5", "0.75"}
    assert panels["epochs"]["lines"]["0.5"]["x"] == [2, 4]
    methods = panels["methods"]
    assert methods["fixed"]["ratio"] == 0.75 and set(methods["lines"]) == {"finetune", "rewind", "scratch"}
    assert methods["lines"]["scratch"]["drop_mean"][1] == pytest.approx(np.mean(expected[("l2", "scratch", 4, 0.75)]))
    assert "Uniform ratios (paper §2, Fig. 1)" in (tmp_path / "report" / "index.html").read_text()
