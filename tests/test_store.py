"""The results store: layout, row lifecycle, SWMR readers in other processes, and kill -9 of the writer."""
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest
from helpers import GROUPS, StandInTable  # noqa: E402 - shared with other tests
from helpers import rows_for_store as make_rows

from nps.pipeline.errors import NpsError
from nps.pipeline.results.store import (
    DONE,
    ERROR_BYTES,
    FAILED,
    PENDING,
    RUNNING,
    ResultsStore,
    clear_consistency_flags,
    open_readonly,
)
from nps.pipeline.row_status import Result


@pytest.fixture
def store(tmp_path):
    s = ResultsStore.create(tmp_path / "r.h5", StandInTable(), "[experiment]\nname = 't'\n",
                            {"base_top1": 93.5, "base_top5": 99.7, "base_flops": 125_000_000, "base_params": 850_000,
                             "dataset_fingerprint": "sha256:abc"})
    yield s
    s.close()


def test_create_writes_root_attrs_and_layers(store):
    a = store.attrs
    assert a["base_top1"] == 93.5 and a["base_flops"] == 125_000_000 and a["dataset_fingerprint"] == "sha256:abc"
    assert a["config"].startswith("[experiment]") and a["nps_version"] and a["created"]
    assert list(store.layers["channels"][()]) == [16, 32, 64, 64]
    assert store.spaces() == []


def test_add_space_has_every_dataset_of_the_design(store):
    rows = make_rows(7)
    store.add_space("std-0.1", rows, epochs=5, attrs={"c_flops": 0.25, "delta": 0.002})
    g = store.file["spaces/std-0.1"]
    expect = {"recipe": ("f4", (7, GROUPS)), "keep": ("i4", (7, GROUPS)), "flops": ("i8", (7,)),
              "params": ("i8", (7,)), "c_flops": ("f4", (7,)), "c_params": ("f4", (7,)), "mcb": ("f4", (7,)),
              "std": ("f4", (7,)), "seed": ("i8", (7,)), "status": ("u1", (7,)), "top1": ("f4", (7,)),
              "top5": ("f4", (7,)), "loss": ("f4", (7,)), "acc_drop": ("f4", (7,)), "bn_top1": ("f4", (7,)),
              "curve": ("f4", (7, 5)), "train_s": ("f4", (7,)), "error": (f"S{ERROR_BYTES}", (7,))}
    assert set(g.keys()) == set(expect)
    for name, (dtype, shape) in expect.items():
        ds = g[name]
        assert ds.dtype == np.dtype(dtype), name
        assert ds.shape == shape, name
        assert ds.chunks is not None and ds.maxshape[0] is None, name
    assert g.attrs["c_flops"] == 0.25 and g.attrs["epochs"] == 5
    np.testing.assert_allclose(g["recipe"][()], rows["recipe"].astype("f4"))
    assert (g["status"][()] == PENDING).all()
    assert np.isnan(g["top1"][()]).all() and np.isnan(g["curve"][()]).all()


def test_row_lifecycle_and_summary(store):
    store.add_space("s", make_rows(6), epochs=3)
    store.mark_running("s", [0, 1, 2])
    store.record("s", [0], [Result.done(top1=91.25, top5=99.5, loss=0.31, bn_top1=40.0, curve=[80.0, 90.0],
                                        train_s=12.5)])
    store.record("s", [1], [Result.failed(error="loss became nan at epoch 2 step 17")])
    assert store.summary() == {"s": {"total": 6, "pending": 3, "running": 1, "done": 1, "failed": 1}}
    cols = store.read("s")
    assert cols["status"].tolist() == [DONE, FAILED, RUNNING, PENDING, PENDING, PENDING]
    assert cols["top1"][0] == 91.25 and cols["bn_top1"][0] == 40.0 and cols["train_s"][0] == 12.5
    assert cols["acc_drop"][0] == pytest.approx(93.5 - 91.25)
    assert cols["curve"][0, :2].tolist() == [80.0, 90.0] and math.isnan(cols["curve"][0, 2])
    assert store.errors("s")[:2] == ["", "loss became nan at epoch 2 step 17"]
    # resume: the running row goes back to pending, finished ones stay
    assert store.reset_running("s").tolist() == [2, 3, 4, 5]
    assert store.reset_failed("s").tolist() == [1, 2, 3, 4, 5]
    assert store.errors("s")[1] == ""


def test_append_rows_and_long_error_truncated_on_utf8_boundary(store):
    store.add_space("s", make_rows(2), epochs=1)
    new = store.append_rows("s", make_rows(3, seed=1))
    assert new.tolist() == [2, 3, 4] and store.size("s") == 5
    assert (store.status("s") == PENDING).all() and np.isnan(store.read("s", ["top1"])["top1"]).all()
    store.record("s", [4], [Result.failed(error="é" * 300)])
    msg = store.errors("s")[4]
    assert set(msg) == {"é"} and len(msg.encode()) <= ERROR_BYTES


def test_bad_input_is_one_line_error(store, tmp_path):
    rows = make_rows(3)
    # a caller's broken promise is a bug (a traceback), not bad input
    with pytest.raises(ValueError, match="lack"):
        store.add_space("s", {k: v for k, v in rows.items() if k != "seed"}, epochs=1)
    store.add_space("s", rows, epochs=1)
    with pytest.raises(ValueError, match="already has"):
        store.add_space("s", rows, epochs=1)
    with pytest.raises(ValueError, match="groups"):
        store.append_rows("s", make_rows(2) | {"recipe": np.zeros((2, 3)), "keep": np.ones((2, 3))})
    with pytest.raises(IndexError, match="rows 0..2"):
        store.record("s", [3], [Result.done(top1=1, top5=1, loss=1)])
    with pytest.raises(NpsError, match="no space"):
        store.status("nope")
    with pytest.raises(NpsError, match="exists"):
        ResultsStore.create(tmp_path / "r.h5", None, "")


def test_one_writer_per_file(store):
    with pytest.raises(NpsError, match="being written by another process"):
        ResultsStore.open(store.path, "r+")


def test_reopen_after_clean_close(tmp_path):
    path = tmp_path / "r.h5"
    with ResultsStore.create(path, StandInTable(), "", {"base_top1": 90.0}) as s:
        s.add_space("a", make_rows(3), epochs=2)
        s.record("a", [1], [Result.done(top1=89.0, top5=99.0, loss=0.4)])
    with ResultsStore.open(path, "r+") as s:
        s.add_space("b", make_rows(2), epochs=2)  # new spaces after reopening
        s.set_attrs(base_top1=91.0)
        s.record("b", [0], [Result.done(top1=90.0, top5=99.0, loss=0.4)])
        assert s.read("b", ["acc_drop"])["acc_drop"][0] == pytest.approx(1.0)
    with ResultsStore.open(path, "r") as r:
        assert r.summary()["a"]["done"] == 1 and r.summary()["b"]["done"] == 1 and r.attrs["base_top1"] == 91.0


# --------------------------------------------------------------------------------------------------------------------
# Other processes: a real writer subprocess, SWMR readers, kill -9.

WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_store import StandInTable, make_rows
    from nps.pipeline.results.store import ResultsStore
    from nps.pipeline.row_status import Result
    path, n, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    store = ResultsStore.create(path, StandInTable(), "cfg", {{"base_top1": 95.0}})
    store.add_space("s", make_rows(n), epochs=4)
    print("ready", flush=True)
    for row in range(n):
        store.mark_running("s", [row])
        time.sleep(delay)
        store.record("s", [row], [Result.done(top1=50.0 + row, top5=90.0 + row / 100, loss=1.0 / (row + 1),
                                              bn_top1=10.0 + row, curve=[row, row + 1, row + 2, row + 3],
                                              train_s=0.5 * row)])
        if sys.argv[4:] == ["space"] and row == 2:
            store.add_space("late", make_rows(2, seed=5), epochs=1)
            store.record("late", [1], [Result.failed(error="boom")])
            print("late", flush=True)
    print("finished", flush=True)
    time.sleep(60)
""")


def start_writer(tmp_path, n, delay, *extra):
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(tests=os.path.dirname(__file__)))
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "r.h5"), str(n), str(delay), *extra],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def check_done_rows(cols):
    """Every row marked done carries exactly the values the writer wrote for it."""
    done = np.flatnonzero(cols["status"] == DONE)
    for row in done:
        assert cols["top1"][row] == np.float32(50.0 + row)
        assert cols["top5"][row] == np.float32(90.0 + row / 100)
        assert cols["loss"][row] == np.float32(1.0 / (row + 1))
        assert cols["bn_top1"][row] == np.float32(10.0 + row)
        assert cols["acc_drop"][row] == np.float32(95.0 - np.float32(50.0 + row))
        assert cols["train_s"][row] == np.float32(0.5 * row)
        assert cols["curve"][row].tolist() == [row, row + 1, row + 2, row + 3]
    return done


@pytest.mark.e2e
@pytest.mark.parametrize("delay", [0.02, 0.0], ids=["paced", "flat-out"])
def test_kill_minus_9_keeps_every_finished_row(tmp_path, delay):
    # flat-out: the writer updates as fast as it can, so the kill lands inside an update
    n, k = 3000, 6
    proc = start_writer(tmp_path, n, delay)
    try:
        reader = open_readonly(tmp_path / "r.h5")
        assert reader.swmr
        deadline = time.monotonic() + 60
        while True:  # a live SWMR reader follows the writer
            reader.refresh()
            cols = reader.read("s")
            check_done_rows(cols)
            if np.count_nonzero(cols["status"] == DONE) >= k:
                break
            assert time.monotonic() < deadline, "writer too slow"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    reader.refresh()
    cols = reader.read("s")
    reader.close()
    done = check_done_rows(cols)
    assert len(done) >= k and len(done) < n
    assert done.tolist() == list(range(len(done)))  # rows finish in order: nothing beyond them is marked done
    rest = np.arange(len(done), n)
    assert np.isin(cols["status"][rest], [PENDING, RUNNING]).all()
    assert np.isnan(cols["top1"][rest[1:]]).all()
    # The next writer recovers the file (clears HDF5's open-for-write mark) and resumes from status.
    with ResultsStore.open(tmp_path / "r.h5", "r+") as store:
        pending = store.reset_running("s")
        assert pending.tolist() == rest.tolist()
        check_done_rows(store.read("s"))
        store.record("s", [int(rest[0])], [Result.done(top1=50.0 + rest[0], top5=90.0 + rest[0] / 100,
                                                       loss=1.0 / (rest[0] + 1), bn_top1=10.0 + rest[0],
                                                       curve=[rest[0] + i for i in range(4)], train_s=0.5 * rest[0])])
    with h5py.File(tmp_path / "r.h5", "r") as f:  # a plain (non-SWMR) open works again after a clean close
        assert f["spaces/s/status"][rest[0]] == DONE


@pytest.mark.e2e
def test_reader_follows_new_space_added_during_run(tmp_path):
    proc = start_writer(tmp_path, 6, 0.01, "space")
    try:
        reader = open_readonly(tmp_path / "r.h5")
        assert proc.stdout.readline().strip() == "late"
        reader.refresh()
        assert "late" in reader.spaces()
        assert reader.errors("late") == ["", "boom"] and reader.status("late").tolist() == [PENDING, FAILED]
        assert proc.stdout.readline().strip() == "finished"
        reader.refresh()
        cols = reader.read("s")
        assert (cols["status"] == DONE).all()
        check_done_rows(cols)
        reader.close()
    finally:
        proc.kill()
        proc.wait()


def test_clear_consistency_flags_leaves_clean_files_alone(tmp_path):
    path = tmp_path / "clean.h5"
    h5py.File(path, "w", libver="latest").close()
    before = path.read_bytes()
    assert clear_consistency_flags(str(path)) is False
    assert path.read_bytes() == before
