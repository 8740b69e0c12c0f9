"""`nps run` end to end on a tiny experiment (CPU): a full run with two-stage retraining, a run killed with SIGKILL
and resumed (every row done exactly once, finished rows untouched), Ctrl-C leaving a resumable file, and a resume
refused when the experiment changed."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import cpu_experiment_head

from nps.pipeline.results.store import DONE, PENDING, RUNNING, open_readonly

pytestmark = pytest.mark.fmnist  # conftest: skipped without the Debian files, failed under CI
RUN_TIMEOUT = 300


@pytest.fixture(scope="module")
def data_dir(fmnist_dir):
    """Fashion-MNIST, first 256 images of each split."""
    return fmnist_dir(256)


def experiment(tmp_path, data_dir, *, checkpoint="", n=4, epochs=1, cohort=2, two_stage=False, extra="",
               baseline=False) -> Path:
    text = cpu_experiment_head("tiny", 1, tmp_path / "run", data_dir, checkpoint,
                               experiment_extra=f"baseline = {str(baseline).lower()}") + f"""
[base]
epochs = 1
batch_size = 32
lr = 0.05
warmup_epochs = 0.0

[[spaces]]
name = "std-0.05"
c_flops = 0.25
n = {n}

[[spaces]]
name = "std-0.01"
c_flops = 0.25
n = {n}

[retrain]
epochs = {epochs}
batch_size = 32
cohort_size = {cohort}
bn_images = 64
eval_every_epoch = true

[two_stage]
enabled = {str(two_stage).lower()}
top_k = 2
full_epochs = 2

[output]
keep_weights = "topk"
top_k = 2
{extra}
"""
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    return path


def nps_command(*args) -> list[str]:
    return [sys.executable, "-m", "nps.pipeline.cli", *map(str, args)]


def run_nps(*args, timeout=RUN_TIMEOUT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(nps_command(*args), capture_output=True, text=True, timeout=timeout, env=env)


def start_nps(*args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(nps_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def log_events(out_dir: Path) -> list[dict]:
    with open(out_dir / "log.jsonl") as fh:
        return [json.loads(line) for line in fh]


def wait_for_done(results: Path, proc: subprocess.Popen, at_least: int, timeout=RUN_TIMEOUT) -> int:
    """Poll results.h5 read-only (SWMR) while the run writes it until ``at_least`` rows are done."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended early: {proc.communicate()}"
        if results.exists():
            try:
                with open_readonly(results, retry_s=1.0) as reader:
                    done = sum(s["done"] for s in reader.summary().values())
            except Exception:  # noqa: BLE001 - the writer may be between structural changes
                done = 0
            if done >= at_least:
                return done
        time.sleep(0.2)
    raise AssertionError("no row finished in time")


def read_all(results: Path) -> dict[str, dict[str, np.ndarray]]:
    with open_readonly(results) as reader:
        return {space: reader.read(space) for space in reader.spaces()}


def test_full_run_with_two_stage(tmp_path, data_dir):
    exp = experiment(tmp_path, data_dir, two_stage=True)
    out = run_nps("run", exp)
    assert out.returncode == 0, out.stderr + out.stdout
    run_dir = tmp_path / "run"
    results = run_dir / "results.h5"
    spaces = read_all(results)
    assert sorted(spaces) == ["std-0.01@c_flops=0.25", "std-0.01@c_flops=0.25#top", "std-0.05@c_flops=0.25",
                              "std-0.05@c_flops=0.25#top"]
    with open_readonly(results) as reader:
        attrs = reader.attrs
        top_attrs = dict(reader.file["spaces/std-0.05@c_flops=0.25#top"].attrs)
        epochs = {s: reader.epochs(s) for s in spaces}
    assert math.isfinite(attrs["base_top1"]) and attrs["base_trained"]
    assert '[experiment]\nname = "tiny"' in attrs["config"]
    assert (run_dir / "base.pt").is_file()
    for name, cols in spaces.items():
        assert (cols["status"] == DONE).all(), name
        np.testing.assert_allclose(cols["acc_drop"], attrs["base_top1"] - cols["top1"], rtol=1e-5)
        assert np.isfinite(cols["bn_top1"]).all() and (cols["train_s"] > 0).all()
        assert np.isfinite(cols["curve"][:, :epochs[name]]).all()  # eval_every_epoch fills the curve
    # two-stage: the 2 best of the 4 rows by top-1, same recipes, retrained for 2 epochs
    parent = spaces["std-0.05@c_flops=0.25"]
    top = spaces["std-0.05@c_flops=0.25#top"]
    chosen = top_attrs["parent_rows"]
    assert top_attrs["stage"] == "top" and top_attrs["parent"] == "std-0.05@c_flops=0.25" and len(chosen) == 2
    # the best by top-1, ties broken by the adaptive-BN score, then by row
    assert set(np.lexsort((np.arange(4), -parent["bn_top1"], -parent["top1"]))[:2]) == set(chosen)
    np.testing.assert_array_equal(top["keep"], parent["keep"][np.sort(chosen)])
    assert epochs["std-0.05@c_flops=0.25#top"] == 2 and epochs["std-0.05@c_flops=0.25"] == 1
    # a plain log line per finished subnetwork (stdout is a pipe), and the audit log
    assert sum(1 for line in out.stdout.splitlines() if " row " in line and "acc_drop" in line) == 12
    done = Counter((e["space"], e["row"]) for e in log_events(run_dir) if e["event"] == "done")
    assert len(done) == 12 and set(done.values()) == {1}
    # keep_weights = "topk", top_k = 2: weights of the 2 best rows of each space
    for name, cols in spaces.items():
        saved = sorted(int(p.stem) for p in (run_dir / "weights" / name).glob("*.pt"))
        assert saved == sorted(np.argsort(-cols["top1"], kind="stable")[:2].tolist()), name
    assert not (run_dir / ".staging").exists()  # the workers' staged weights: moved into weights/ or removed
    # `nps status` summarises the finished file
    status = run_nps("status", results)
    assert status.returncode == 0 and "complete: 12 done, 0 failed of 12" in status.stdout
    # running it again finds nothing to do and recomputes nothing
    again = run_nps("run", exp)
    assert again.returncode == 0, again.stderr
    assert sum(1 for e in log_events(run_dir) if e["event"] == "done") == 12
    for name, cols in read_all(results).items():
        np.testing.assert_array_equal(cols["top1"], spaces[name]["top1"])


def test_sigkill_then_resume_does_every_row_exactly_once(tmp_path, data_dir, base_checkpoint):
    exp = experiment(tmp_path, data_dir, checkpoint=base_checkpoint, n=5, epochs=2, cohort=1)
    run_dir = tmp_path / "run"
    results = run_dir / "results.h5"
    proc = start_nps("run", exp)
    try:
        wait_for_done(results, proc, at_least=2)
        os.kill(proc.pid, signal.SIGKILL)  # the main process only: its workers must die with it
        proc.communicate(timeout=60)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break  # nothing of the run is left
            time.sleep(0.1)
        else:
            raise AssertionError("worker processes outlived the killed run")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    before = read_all(results)
    total = sum(len(c["status"]) for c in before.values())
    finished_before = {(s, int(r)) for s, c in before.items() for r in np.flatnonzero(c["status"] == DONE)}
    assert 2 <= len(finished_before) < total
    assert all(((c["status"] == PENDING) | (c["status"] == RUNNING) | (c["status"] == DONE)).all()
               for c in before.values())

    out = run_nps("run", exp)
    assert out.returncode == 0, out.stderr + out.stdout
    after = read_all(results)
    for name, cols in after.items():
        assert (cols["status"] == DONE).all()
        kept = before[name]["status"] == DONE
        for field in ("top1", "top5", "loss", "bn_top1", "train_s", "curve"):  # finished rows were not recomputed
            np.testing.assert_array_equal(cols[field][kept], before[name][field][kept])
    done = Counter((e["space"], e["row"]) for e in log_events(run_dir) if e["event"] == "done")
    assert len(done) == total and set(done.values()) == {1}
    starts = [e for e in log_events(run_dir) if e["event"] == "start"]
    assert [s["resumed"] for s in starts] == [False, True] and starts[1]["done"] == len(finished_before)
    assert "resuming" in out.stdout


def test_sigint_leaves_a_resumable_file(tmp_path, data_dir, base_checkpoint):
    exp = experiment(tmp_path, data_dir, checkpoint=base_checkpoint, n=4, epochs=3, cohort=1)
    run_dir = tmp_path / "run"
    results = run_dir / "results.h5"
    proc = start_nps("run", exp)
    try:
        wait_for_done(results, proc, at_least=1)
        os.kill(proc.pid, signal.SIGINT)  # Ctrl-C reaches the process group; the workers ignore it anyway
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr
    assert f"resume with: nps run {exp}" in stderr and "interrupted: " in stderr
    assert "leaked" not in stderr and "Traceback" not in stderr  # the workers exited by themselves, cleanly
    cols = read_all(results)
    status = np.concatenate([c["status"] for c in cols.values()])
    assert not (status == RUNNING).any() and (status == DONE).sum() >= 1 and (status == PENDING).any()
    assert [e["status"] for e in log_events(run_dir) if e["event"] == "end"] == ["interrupted"]
    # the writer lock is free and the file opens for writing again (resumable)
    from nps.pipeline.results.store import ResultsStore

    ResultsStore.open(results).close()
    status_out = run_nps("status", results)
    assert "not running" in status_out.stdout


def test_resume_refuses_a_changed_experiment(tmp_path, data_dir, base_checkpoint):
    from nps.pipeline.errors import NpsError
    from nps.pipeline.experiment.config import parse_config
    from nps.pipeline.experiment.plan import validate
    from nps.pipeline.run import open_results, sample_missing_spaces

    exp = experiment(tmp_path, data_dir, checkpoint=base_checkpoint)
    plan = validate(parse_config(exp.read_text()))
    store, resumed = open_results(plan)
    sample_missing_spaces(store, plan)
    store.close()
    assert not resumed
    plan.config.retrain.cohort_size = 3  # runtime only: fine
    store, resumed = open_results(plan)
    store.close()
    assert resumed
    plan.config.retrain.epochs = 4
    plan.config.spaces[1].n = 9
    with pytest.raises(NpsError) as info:
        open_results(plan)
    message = str(info.value)
    assert "holds a different experiment" in message and "retrain.epochs (stored 1, now 4)" in message
    assert "spaces[1].n (stored 4, now 9)" in message and "--out" in message


def test_unavailable_gpu_is_refused_before_any_work(tmp_path, data_dir, base_checkpoint):
    from nps.pipeline.errors import NpsError
    from nps.pipeline.experiment.config import parse_config
    from nps.pipeline.experiment.plan import validate
    from nps.pipeline.run import run_experiment

    plan = validate(parse_config(experiment(tmp_path, data_dir, checkpoint=base_checkpoint).read_text()))
    with pytest.raises(NpsError, match=r"--devices: cuda:9 not available \(\d+ GPUs visible\)"):
        run_experiment(plan, view=None, devices=["cuda:9"])
    assert not (tmp_path / "run" / "results.h5").exists()


class _Silent:
    def start(self, state): pass
    def update(self, state, force=False): pass
    def note(self, text): pass
    def epoch(self, state, wid, text): pass
    def row_finished(self, state, row): pass
    def stop(self, state): pass


@pytest.mark.slow
def test_a_rows_result_depends_on_the_experiment_recipe_and_seed_only(tmp_path, data_dir, base_checkpoint):
    """The seed rule: the same rows trained in cohorts of 4 or of 1, by one worker or by two, give bit-identical
    numbers (data order from the experiment seed and the epoch, adaptive BN on a fixed image set, one intra-op
    thread per member on the CPU). Slow (three whole runs, about a minute): ``make test`` keeps the rule's unit
    tests (tests/test_engine.py: a cohort member trains exactly as alone, on one core and on several) and
    tests/test_distill.py's rows identical in cohorts of 1 and 2."""
    from nps.pipeline.experiment.config import parse_config
    from nps.pipeline.experiment.plan import validate
    from nps.pipeline.run import run_experiment

    runs = {}
    for name, cohort, devices in [("k4", 4, ["cpu"]), ("k1", 1, ["cpu"]), ("two-workers", 2, ["cpu", "cpu"])]:
        (tmp_path / name).mkdir()
        exp = experiment(tmp_path / name, data_dir, checkpoint=base_checkpoint, n=4, epochs=1, cohort=cohort)
        text = exp.read_text().replace("augment = false", "augment = true")  # crops and flips drawn per epoch too
        plan = validate(parse_config(text))
        outcome = run_experiment(plan, _Silent(), devices=devices)
        assert outcome.status == "complete" and outcome.done == 8
        runs[name] = read_all(Path(plan.results_path))
    reference = runs.pop("k4")
    for name, spaces in runs.items():
        for space, cols in spaces.items():
            for field in ("top1", "top5", "loss", "bn_top1", "curve", "seed", "keep"):
                np.testing.assert_array_equal(cols[field], reference[space][field], err_msg=f"{name} {space} {field}")
    assert len({float(v) for cols in reference.values() for v in cols["loss"]}) > 1  # rows do differ


def test_a_worker_checks_its_dataset_against_the_drivers_fingerprint(tmp_path, data_dir, base_checkpoint):
    """A worker whose copy of the dataset is not the one the driver validated (another node, another conversion)
    stops the run with one line naming the node and the path; nothing is left running."""
    import socket

    from nps.pipeline.errors import NpsError
    from nps.pipeline.experiment.config import parse_config
    from nps.pipeline.experiment.plan import validate
    from nps.pipeline.run import run_experiment

    plan = validate(parse_config(experiment(tmp_path, data_dir, checkpoint=base_checkpoint).read_text()))
    plan.meta = {**plan.meta, "fingerprint": "0" * 64}  # what the driver saw differs from the worker's copy
    with pytest.raises(NpsError) as info:
        run_experiment(plan, _Silent(), devices=["cpu"])
    message = str(info.value)
    assert message.startswith(f"node {socket.gethostname()}: dataset.dir {data_dir}: fingerprint ")
    assert "where the driver has 000000000000" in message and "shared filesystem" in message
    assert "\n" not in message
    with open_readonly(tmp_path / "run" / "results.h5") as reader:
        assert all((reader.status(name) == PENDING).all() for name in reader.spaces())
