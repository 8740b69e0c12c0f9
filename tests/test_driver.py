"""The driver over a fake, in-process worker pool: dispatch, results and kept weights written by the driver only,
two-stage, lost workers, failing workers, Ctrl-C. No training, no processes."""
from __future__ import annotations

import json
import os
import signal
from collections import Counter

import numpy as np
import pytest

from nps.pipeline.errors import NpsError
from nps.pipeline.experiment.config import Config, expand_spaces
from nps.pipeline.experiment.plan import Plan
from nps.pipeline.results.store import DONE, PENDING, open_readonly
from nps.pipeline.row_status import RowStatus
from nps.pipeline.run import run_experiment
from nps.pipeline.run.pools import WorkerPool
from nps.pipeline.run.protocol import (
    BaseResult,
    BaseTask,
    BaseWeights,
    Progress,
    Ready,
    RowResult,
    StagedWeights,
    TaskEnd,
    WorkerFailed,
    WorkerLost,
    WorkerStarted,
)
from nps.pipeline.training.events import Result, StepProgress


class FakePool(WorkerPool):
    """Workers that answer at once: base metrics, and per row a result whose kept weights are ``b"<space>/<row>"``.
    ``lose`` names task ids whose worker dies instead (a replacement starts); ``on_poll`` runs before each poll."""

    kind = "fake"

    def __init__(self, workers=2, lose=(), fail_setup=None, on_poll=None, stage=None, duplicate=False):
        self.n, self.lose, self.fail_setup, self.on_poll = workers, set(lose), fail_setup, on_poll
        self.stage, self.duplicate = stage, duplicate  # stage: a directory for StagedWeights files
        self.events, self.next, self.tasks, self.stopped, self.closed = [], 0, [], False, False
        self.held = []  # tasks not answered yet (to stop them)
        self.sent = []  # (space, row) of every row result that carried weights

    def _add(self):
        wid, self.next = self.next, self.next + 1
        self.events += [WorkerStarted(wid, "node-a", "cpu"), Ready(wid, "node-a", "cpu", 1)]

    def start(self, spec, out_dir=""):
        self.spec = spec
        if self.fail_setup is not None:
            self.events.append(self.fail_setup)
        for _ in range(self.n):
            self._add()

    def submit(self, worker, task, base):
        self.tasks.append((worker, task, base))
        if task.task_id in self.lose:
            self.events.append(WorkerLost(worker, f"the worker process on cpu died (task {task.task_id})"))
            self._add()
            return
        if isinstance(task, BaseTask):
            self.events += [BaseResult(worker, task.task_id, 80.0, 99.0, 0.5, task.train, 1.0,
                                       b"base-weights" if task.train else None), TaskEnd(worker, task.task_id)]
            return
        self.held.append((worker, task))

    def _answer(self, worker, task):
        self.events.append(Progress(worker, task.task_id, StepProgress(1, 2, 1, 2, len(task.rows), 100.0)))
        for row, seed in zip(task.rows, task.seeds):
            top1 = float(seed % 97 * 37 % 97)  # row seeds are consecutive: scrambled, so rows do not improve in order
            data = f"{task.space}/{row}".encode() if task.wants_weights(top1) else None
            if data is not None:
                self.sent.append((task.space, row))
            copies = 2 if self.duplicate else 1  # a late second message for the same row: refused by the ledger
            for copy in range(copies):
                weights = data
                if data is not None and self.stage is not None:
                    path = self.stage / f"t{task.task_id}-r{row}-{copy}.pt"
                    path.write_bytes(data)
                    weights = StagedWeights(len(data), path=str(path))
                result = Result((task.space, row), RowStatus.DONE, top1=top1, top5=99.0, loss=1.0, bn_top1=top1 - 5,
                                curve=[top1], train_s=2.0, cohort_size=len(task.rows))
                self.events.append(RowResult(worker, task.task_id, task.space, row, result, weights=weights))
        self.events.append(TaskEnd(worker, task.task_id))

    def poll(self, timeout):
        if self.on_poll:
            self.on_poll(self)
        if not self.stopped:
            for worker, task in self.held:
                self._answer(worker, task)
            self.held = []
        out, self.events = self.events, []
        return out

    def request_stop(self):
        self.stopped = True
        self.events += [TaskEnd(w, t.task_id, stopped=True) for w, t in self.held]
        self.held = []

    def terminate(self):
        self.stopped = True

    def close(self, timeout=10.0):
        self.closed = True

    def exhausted(self):
        return False


class Quiet:
    def __init__(self):
        self.notes, self.finished = [], []

    def start(self, state): pass
    def update(self, state, force=False): pass
    def note(self, text): self.notes.append(text)
    def epoch(self, state, wid, text): pass
    def row_finished(self, state, row): self.finished.append((row.space, row.row, row.status.label))
    def stop(self, state): pass


@pytest.fixture(scope="module")
def table():
    from nps.pipeline.network.layer_table import build_layer_table

    return build_layer_table("resnet20", "all", 28, 10, 1)


def make_plan(tmp_path, table, *, n=5, two_stage=False, keep="topk", checkpoint=None, fuse=False) -> Plan:
    cfg = Config()
    cfg.experiment.name, cfg.experiment.out = "fake", str(tmp_path / "run")
    cfg.dataset.dir, cfg.model.name, cfg.base.epochs = "unused", "resnet20", 1
    cfg.experiment.baseline = False  # the ledger and driver tests count the sampled rows only
    from nps.pipeline.experiment.config import SpaceConfig

    cfg.spaces = [SpaceConfig(name="std-0.05", c_flops=[0.25], n=n), SpaceConfig(name="std-0.01", c_flops=[0.25], n=n)]
    cfg.retrain.epochs, cfg.retrain.cohort_size = 2, 2
    cfg.two_stage.enabled, cfg.two_stage.top_k, cfg.two_stage.full_epochs = two_stage, 2, 3
    cfg.output.keep_weights, cfg.output.top_k = keep, 2
    cfg.retrain.fuse = fuse
    if checkpoint:
        cfg.model.checkpoint = str(checkpoint)
    out = tmp_path / "run"
    return Plan(cfg, {"fingerprint": "fake-data"}, table, 28, 1, 10, expand_spaces(cfg), cfg.model.checkpoint,
                str(out / "results.h5"), str(out / "base.pt"))


def read(plan):
    with open_readonly(plan.results_path) as reader:
        return {name: reader.read(name) for name in reader.spaces()}


def events(plan):
    with open(os.path.join(plan.config.experiment.out, "log.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def test_a_run_over_a_fake_pool(tmp_path, table):
    plan = make_plan(tmp_path, table, two_stage=True)
    pool = FakePool(workers=2)
    outcome = run_experiment(plan, Quiet(), pool=pool)
    assert outcome.status == "complete" and outcome.done == 14 and pool.closed
    spaces = read(plan)
    assert sorted(spaces) == ["std-0.01@c_flops=0.25", "std-0.01@c_flops=0.25#top", "std-0.05@c_flops=0.25",
                              "std-0.05@c_flops=0.25#top"]
    for name, cols in spaces.items():
        assert (cols["status"] == DONE).all()
        np.testing.assert_array_equal(cols["top1"], (cols["seed"] % 97 * 37 % 97).astype("f4"))
    # the base network the worker trained was written by the driver; cohorts got it as a file to read
    assert open(plan.base_path, "rb").read() == b"base-weights"
    cohorts = [(w, t, b) for w, t, b in pool.tasks if not isinstance(t, BaseTask)]
    assert all(isinstance(b, BaseWeights) and b.path == plan.base_path for _, _, b in cohorts)
    assert all(len(t.rows) <= 2 and t.spec.retrain.epochs == (3 if t.space.endswith("#top") else 2)
               for _, t, _ in cohorts)
    # kept weights: the bytes the workers sent, top_k=2 per space by top-1 (ties: lower row)
    run = tmp_path / "run"
    for name, cols in spaces.items():
        best = sorted(np.argsort(-cols["top1"], kind="stable")[:2].tolist())
        files = sorted(int(p.stem) for p in (run / "weights" / name).glob("*.pt"))
        assert files == best, name
        assert all((run / "weights" / name / f"{r}.pt").read_bytes() == f"{name}/{r}".encode() for r in files)
    done = Counter((e["space"], e["row"]) for e in events(plan) if e["event"] == "done")
    assert len(done) == 14 and set(done.values()) == {1}


@pytest.mark.parametrize("fuse", [True, False])
def test_the_driver_decides_each_cohorts_form_and_the_task_carries_it(tmp_path, table, fuse):
    """retrain.fuse is resolved once, by the driver, which forms the cohort for it; the worker reads task.fused."""
    plan = make_plan(tmp_path, table, n=6, fuse=fuse)
    pool = FakePool(workers=1)
    assert run_experiment(plan, Quiet(), pool=pool).status == "complete"
    cohorts = [t for _, t, _ in pool.tasks if not isinstance(t, BaseTask)]
    assert cohorts and all(t.fused is fuse for t in cohorts)
    dispatched = [e for e in events(plan) if e["event"] == "dispatch"]
    assert all(("fused_waste" in e) is fuse for e in dispatched)  # only a fused cohort's padding is measured


def test_a_weight_space_is_never_formed_for_fusion(table):
    from nps.pipeline.network.pruning_kind import FILTERS, WEIGHTS
    from nps.pipeline.run.forming import cohort_rows

    keeps = np.tile(table.channels, (5, 1))
    keeps[0] //= 4  # the first row is narrow: a fused cohort would pick rows like it, not the next in line
    keeps[3] //= 4
    assert cohort_rows(WEIGHTS, table, keeps, 2, 0.5) == [0, 1]
    assert cohort_rows(FILTERS, table, keeps, 2, 0.5) == [0, 3]


def test_topk_tasks_ask_only_for_weights_that_can_be_kept(tmp_path, table):
    plan = make_plan(tmp_path, table, n=24, keep="topk")  # top_k = 2, cohorts of 2
    pool = FakePool(workers=2)
    assert run_experiment(plan, Quiet(), pool=pool).status == "complete"
    spaces = read(plan)
    for name, cols in spaces.items():
        best = sorted(np.argsort(-cols["top1"], kind="stable")[:2].tolist())
        files = sorted(int(p.stem) for p in (tmp_path / "run" / "weights" / name).glob("*.pt"))
        assert files == best, name  # the same top-k as when every row sends its weights
        assert set(best) <= {row for space, row in pool.sent if space == name}
    cohorts = [t for _, t, _ in pool.tasks if not isinstance(t, BaseTask)]
    assert cohorts[0].weights_above == float("-inf") and any(np.isfinite(t.weights_above) for t in cohorts)
    assert len(pool.sent) < 48  # rows below a space's k-th best kept top-1 sent nothing
    for t in cohorts:  # every row that sent nothing was below the threshold its task carried
        for row in t.rows:
            if (t.space, row) not in pool.sent:
                assert np.float32(spaces[t.space]["top1"][row]) < t.weights_above


@pytest.mark.parametrize("keep", ["topk", "all"])
def test_staged_weights_are_moved_when_kept_and_removed_otherwise(tmp_path, table, keep):
    stage = tmp_path / "stage"
    stage.mkdir()
    plan = make_plan(tmp_path, table, n=12, keep=keep)
    pool = FakePool(workers=2, stage=stage, duplicate=True)
    assert run_experiment(plan, Quiet(), pool=pool).status == "complete"
    assert list(stage.iterdir()) == []  # every staged file was moved into weights/ or removed, duplicates too
    for name, cols in read(plan).items():
        files = sorted(int(p.stem) for p in (tmp_path / "run" / "weights" / name).glob("*.pt"))
        expected = sorted(np.argsort(-cols["top1"], kind="stable")[:2].tolist()) if keep == "topk" else list(range(12))
        assert files == expected
        assert all((tmp_path / "run" / "weights" / name / f"{r}.pt").read_bytes() == f"{name}/{r}".encode()
                   for r in files)
    done = Counter((e["space"], e["row"]) for e in events(plan) if e["event"] == "done")
    assert len(done) == 24 and set(done.values()) == {1}  # the duplicates were refused


def test_weights_lost_with_their_node_leave_the_row_done_without_them(tmp_path):
    from nps.pipeline.run.outputs import WeightsKeeper

    keeper = WeightsKeeper(str(tmp_path / "results.h5"), "topk", 2, FakePool())
    staged = tmp_path / "w.pt"
    staged.write_bytes(b"weights")
    inode = staged.stat().st_ino
    assert keeper.add("s", 0, 90.0, StagedWeights(7, path=str(staged)))
    kept = tmp_path / "weights" / "s" / "0.pt"
    assert kept.read_bytes() == b"weights" and kept.stat().st_ino == inode and not staged.exists()  # moved
    assert not keeper.add("s", 1, 95.0, StagedWeights(7, path=str(tmp_path / "gone.pt")))  # its file is gone
    assert keeper.threshold("s") == float("-inf") and kept.exists()  # nothing pushed out for it, 1 row kept
    assert keeper.add("s", 2, 80.0, b"b2") and keeper.threshold("s") == 80.0
    low = tmp_path / "low.pt"
    low.write_bytes(b"low")
    assert keeper.add("s", 3, 70.0, StagedWeights(3, path=str(low))) and not low.exists()  # not kept: removed
    assert sorted(p.name for p in (tmp_path / "weights" / "s").iterdir()) == ["0.pt", "2.pt"]


def test_a_lost_worker_requeues_its_rows(tmp_path, table):
    plan = make_plan(tmp_path, table, n=3, keep="none")
    pool = FakePool(workers=2, lose={2, 3})  # the first two cohorts: their workers die (base is task 1)
    view = Quiet()
    outcome = run_experiment(plan, view, pool=pool)
    assert outcome.status == "complete" and outcome.done == 6 and outcome.failed == 0
    log = events(plan)
    assert sum(e["event"] == "worker_lost" for e in log) == 2 and sum(e["event"] == "requeue" for e in log) == 2
    done = Counter((e["space"], e["row"]) for e in log if e["event"] == "done")
    assert len(done) == 6 and set(done.values()) == {1}
    assert not (tmp_path / "run" / "weights").exists()  # keep_weights = none: workers were not asked for them
    assert all(not t.keep_weights for _, t, _ in pool.tasks if not isinstance(t, BaseTask))


def test_worker_failures_end_the_run_as_bad_input_or_as_a_bug(tmp_path, table):
    plan = make_plan(tmp_path, table)
    failed = WorkerFailed(0, "node node-a: dataset.dir /data: fingerprint 1234… differs from the driver's")
    with pytest.raises(NpsError, match="^node node-a: dataset.dir /data: fingerprint"):
        run_experiment(plan, Quiet(), pool=FakePool(fail_setup=failed))
    bug = WorkerFailed(0, "AttributeError: 'NoneType' object has no attribute 'x'", "Traceback ...\n  line 3",
                       user_error=False)
    with pytest.raises(RuntimeError, match=r"(?s)a worker failed: AttributeError.*Traceback \.\.\."):
        run_experiment(plan, Quiet(), pool=FakePool(fail_setup=bug))
    with open_readonly(plan.results_path) as reader:  # nothing left running
        assert all((reader.status(name) == PENDING).all() for name in reader.spaces())


def test_ctrl_c_stops_cleanly_and_the_same_command_resumes(tmp_path, table, base_checkpoint):
    plan = make_plan(tmp_path, table, n=4, checkpoint=base_checkpoint)
    polls = []

    def interrupt_once(pool):
        polls.append(1)
        if len(polls) == 4:  # after the first cohorts answered, while the next ones are held
            os.kill(os.getpid(), signal.SIGINT)  # the driver's handler asks the pool to stop

    first = run_experiment(plan, Quiet(), pool=FakePool(workers=2, on_poll=interrupt_once))
    assert first.status == "interrupted" and 0 < first.done < 8 and first.pending == 8 - first.done
    cols = read(plan)
    assert sum(int((c["status"] == DONE).sum()) for c in cols.values()) == first.done
    assert [e["status"] for e in events(plan) if e["event"] == "end"] == ["interrupted"]
    view = Quiet()
    second = run_experiment(plan, view, pool=FakePool(workers=2))
    assert second.status == "complete" and second.done == 8 and second.resumed
    assert any(n.startswith(f"resuming {plan.results_path}: {first.done} subnetworks done are kept") for n in view.notes)
    done = Counter((e["space"], e["row"]) for e in events(plan) if e["event"] == "done")
    assert len(done) == 8 and set(done.values()) == {1}
