"""A results file as a table: ``nps.pipeline.results.load`` (one row per subnetwork, the HDF5's numbers) and
``nps table`` (Parquet and CSV), on a file shaped like the study-fashion-mnist preset's (4 spaces × 3 regimes × 32
rows plus the 3 uniform baselines: 387 rows) with synthetic scores, and the README's pandas example."""
from __future__ import annotations

import contextlib
import io
import math
import re
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from nps.pipeline.row_status import Result

pd = pytest.importorskip("pandas")

ROOT = Path(__file__).resolve().parents[1]
SPACES = ("std-0.01", "std-0.05", "std-0.1", "mcb-0.9-1.1")
REGIMES = (0.25, 0.1, 0.05)


def make_study_file(path: Path) -> Path:
    """A results file with the study's shape: real sampled recipes of a ResNet-20 at 28 px, synthetic scores;
    most rows done, a few failed, pending and running (so every status appears)."""
    from nps.kernels.spaces import parse_space
    from nps.pipeline.experiment.sampling import baseline_rows, sample_rows
    from nps.pipeline.network.layer_table import build_layer_table
    from nps.pipeline.results.store import ResultsStore

    table = build_layer_table("resnet20", "all", 28, 10, 1)
    rng = np.random.default_rng(0)
    config = '[experiment]\nname = "study-shaped"\n[model]\nname = "resnet20"\n'
    store = ResultsStore.create(path, table, config, {"base_top1": 92.5, "base_top5": 99.8,
                                                      "base_flops": table.base_flops,
                                                      "base_params": table.base_params})
    try:
        groups = []
        for value in REGIMES:
            for name in SPACES:
                rows, attrs, _ = sample_rows(table, parse_space(name, "c_flops", value), 32, 0)
                store.add_space(f"{name}@c_flops={value:g}", rows, epochs=1, attrs=attrs)
                groups.append((f"{name}@c_flops={value:g}", 32))
            rows, attrs = baseline_rows(table, "c_flops", value, 0, delta=0.002, R=0.95)
            store.add_space(f"baseline@c_flops={value:g}", rows, epochs=1, attrs=attrs)
            groups.append((f"baseline@c_flops={value:g}", 1))
        for space, n in groups:
            finished = np.arange(n) if n == 1 else np.arange(n - 3)
            top1 = 92.5 - rng.gamma(2.0, 3.0, finished.size)
            train_s = rng.uniform(5, 10, finished.size)
            store.record(space, finished, [Result.done(top1=t, top5=t + 5, loss=t / 100, bn_top1=t - 30, train_s=s)
                                           for t, s in zip(np.asarray(top1, float), train_s)])
            if n > 1:
                store.record(space, [n - 3], [Result.failed(error="out of memory")])
                store.mark_running(space, n - 2)
    finally:
        store.close()
    return path


@pytest.fixture(scope="module")
def study_file(tmp_path_factory) -> Path:
    return make_study_file(tmp_path_factory.mktemp("study") / "results.h5")


def assert_equals_hdf5(df, path: Path) -> None:
    """Every row of ``df`` holds its space's numbers exactly as the HDF5 stores them."""
    with h5py.File(path, "r") as f:
        spaces = list(f["spaces"])
        assert sorted(df["space"].unique()) == sorted(spaces)
        for space in spaces:
            g = f["spaces"][space]
            part = df[df["space"] == space].sort_values("row")
            assert part["row"].tolist() == list(range(g["status"].shape[0]))
            for column, field in (("top1", "top1"), ("top5", "top5"), ("drop", "acc_drop"), ("c_flops", "c_flops"),
                                  ("c_params", "c_params"), ("mcb", "mcb"), ("std", "std"), ("train_s", "train_s"),
                                  ("bn_top1", "bn_top1"), ("flops", "flops"), ("params", "params")):
                np.testing.assert_array_equal(part[column].to_numpy(), g[field][()], err_msg=f"{space} {column}")
                assert part[column].dtype == g[field].dtype, (space, column)
            np.testing.assert_array_equal(np.stack(part["keep"].to_numpy()), g["keep"][()])
            np.testing.assert_array_equal(np.stack(part["recipe"].to_numpy()), g["recipe"][()])
            names = {0: "pending", 1: "running", 2: "done", 3: "failed"}
            assert part["status"].tolist() == [names[int(s)] for s in g["status"][()]]


def test_load_gives_one_row_per_subnetwork_with_the_hdf5_numbers(study_file):
    from nps.pipeline.results import load

    df = load(study_file)
    assert len(df) == 387 == 4 * 3 * 32 + 3
    assert not df.duplicated(["space", "row"]).any()
    assert_equals_hdf5(df, study_file)
    assert set(df["regime"]) == {"c_flops=0.25", "c_flops=0.1", "c_flops=0.05"}
    assert set(df["space_name"]) == set(SPACES) | {"baseline"}
    assert df["status"].value_counts().to_dict() == {"done": 3 + 12 * 29, "failed": 12, "running": 12, "pending": 12}
    done = df[df.status == "done"]
    assert np.isfinite(done["drop"]).all() and done["drop"].min() > 0
    np.testing.assert_allclose(done["drop"], 92.5 - done["top1"].astype(np.float64), atol=1e-4)
    assert not [c for c in df.columns if c.startswith("latency")]  # never measured


def test_load_adds_latency_where_measured(study_file, tmp_path):
    import shutil

    from nps.pipeline.results import load
    from nps.pipeline.results.latency import Timing, store_latency

    path = tmp_path / "results.h5"
    shutil.copy(study_file, path)
    space = "std-0.05@c_flops=0.1"

    def record(space, row, batch, median):
        return {"space": space, "row": row, "batch": batch, "timing": Timing(median, median * 0.9, median * 1.2, 5, 2),
                "weights": False}

    records = [record("base", -1, 1, 4e-3), record("base", -1, 64, 40e-3), record(space, 0, 1, 2e-3),
               record(space, 0, 64, 10e-3), record(space, 1, 1, 1e-3)]
    store_latency(path, {"device": "cpu", "settings": {"device_name": "test", "threads": 1}, "records": records})
    # a second session re-measures row 0 at batch 1: the latest wins, its speed-up uses its own session's base
    store_latency(path, {"device": "cpu", "settings": {"device_name": "test", "threads": 1},
                         "records": [record("base", -1, 1, 8e-3), record(space, 0, 1, 4e-3)]})
    df = load(path).set_index(["space", "row"])
    assert [c for c in df.columns if "cpu" in c] == [
        "latency_cpu_b1_ms", "latency_iqr_cpu_b1_ms", "speedup_cpu_b1",
        "latency_cpu_b64_ms", "latency_iqr_cpu_b64_ms", "speedup_cpu_b64"]
    row0, row1 = df.loc[(space, 0)], df.loc[(space, 1)]
    assert row0["latency_cpu_b1_ms"] == pytest.approx(4.0) and row0["speedup_cpu_b1"] == pytest.approx(2.0)
    assert row0["latency_cpu_b64_ms"] == pytest.approx(10.0) and row0["speedup_cpu_b64"] == pytest.approx(4.0)
    assert row0["latency_iqr_cpu_b64_ms"] == pytest.approx(3.0)
    assert row1["speedup_cpu_b1"] == pytest.approx(4.0) and math.isnan(row1["latency_cpu_b64_ms"])
    assert df["latency_cpu_b1_ms"].notna().sum() == 2
    assert_equals_hdf5(df.reset_index(), path)


def test_nps_table_writes_parquet_and_csv(study_file, tmp_path, capsys):
    from nps.pipeline.cli import main
    from nps.pipeline.results import load

    expected = load(study_file)
    assert main(["table", str(study_file), "--out", str(tmp_path / "rows.parquet")]) == 0
    back = pd.read_parquet(tmp_path / "rows.parquet")
    assert back.shape == expected.shape and list(back.columns) == list(expected.columns)
    np.testing.assert_array_equal(back["top1"].to_numpy(), expected["top1"].to_numpy())
    np.testing.assert_array_equal(np.stack(back["keep"].to_numpy()), np.stack(expected["keep"].to_numpy()))
    assert main(["table", str(study_file), "--out", str(tmp_path / "rows.csv")]) == 0
    csv = pd.read_csv(tmp_path / "rows.csv")
    assert len(csv) == 387
    keep_cols = [c for c in csv.columns if c.startswith("keep.")]
    assert len(keep_cols) == 12
    np.testing.assert_array_equal(csv[keep_cols].to_numpy(), np.stack(expected["keep"].to_numpy()))
    np.testing.assert_allclose(csv["top1"].to_numpy(), expected["top1"].to_numpy().astype(np.float64), rtol=1e-6)
    assert "wrote" in capsys.readouterr().out
    # an existing --out needs --force; a wrong suffix is one line
    assert main(["table", str(study_file), "--out", str(tmp_path / "rows.csv")]) == 2
    assert main(["table", str(study_file), "--out", str(tmp_path / "rows.xlsx")]) == 2
    assert "--force" in capsys.readouterr().err


def readme_pandas_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Latency, tables and ONNX"):]
    return textwrap.dedent(re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1))


def test_readme_pandas_example_runs(study_file):
    code = readme_pandas_example()
    lines = [line for line in code.strip().splitlines() if line.strip()]
    assert len(lines) == 5
    code = code.replace("runs/demo/results.h5", str(study_file))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    assert "std-0.05@c_flops=0.1" in out.getvalue()


def test_a_damaged_file_is_one_line(study_file, tmp_path, capsys):
    from nps.pipeline.cli import main

    cut = tmp_path / "cut.h5"
    data = study_file.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    for argv in (["table", cut, "--out", tmp_path / "rows.csv"], ["latency", cut]):
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert "is truncated" in err and err.count("\n") == 1
    assert not (tmp_path / "rows.csv").exists()
