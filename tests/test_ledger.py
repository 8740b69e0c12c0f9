"""The row ledger, the one owner of row state: take / finish / requeue / fail / release, written through to the
results file, driven by fake workers (no training)."""
from __future__ import annotations

import numpy as np
import pytest

from nps.pipeline.results.store import DONE, FAILED, PENDING, RUNNING, ResultsStore, open_readonly
from nps.pipeline.row_status import RowStatus
from nps.pipeline.run.ledger import MAX_ATTEMPTS, RowLedger
from nps.pipeline.run.protocol import RowResult
from nps.pipeline.training.events import Result
from nps.pipeline.training.spec import RetrainSpec, SpaceSpec

SPEC = SpaceSpec(RetrainSpec(epochs=2), "l2")


@pytest.fixture
def ledger(tmp_path, stand_in_table, make_rows):
    store = ResultsStore.create(tmp_path / "results.h5", stand_in_table, "cfg", {"base_top1": 90.0})
    ledger = RowLedger(store, base_top1=90.0)
    ledger.add_space("a@c_flops=0.25", make_rows(7), SPEC, {"space": "a"})
    ledger.add_space("b@c_flops=0.25", make_rows(5, seed=1), SpaceSpec(RetrainSpec(epochs=3), "random"), {})
    yield ledger
    store.close()


class FakeWorker:
    """Answers a lease like a worker would: a result per row (done, or failed for rows in ``fail``)."""

    def __init__(self, wid: int, fail=()):
        self.wid, self.fail = wid, set(fail)

    def results(self, ledger, lease, task_id):
        out = []
        for row in lease.rows:
            if (lease.space, row) in self.fail:
                out.append(RowResult(self.wid, task_id, lease.space, row,
                                     Result((lease.space, row), RowStatus.FAILED, error="loss became nan")))
            else:
                out.append(RowResult(self.wid, task_id, lease.space, row, Result(
                    (lease.space, row), RowStatus.DONE, top1=50.0 + row, top5=90.0, loss=1.0, bn_top1=40.0,
                    curve=[10.0, 50.0 + row], train_s=1.5)))
        return out


def file_counts(ledger) -> dict[str, list[int]]:
    ledger.store.flush()
    return {name: np.bincount(ledger.store.status(name), minlength=4)[:4].tolist() for name in ledger.spaces}


def check_invariants(ledger) -> None:
    """Ledger and file agree; every running row is open in exactly one lease."""
    open_rows = [(lease.space, r) for lease in ledger.leases.values() for r in lease.open]
    assert len(open_rows) == len(set(open_rows))
    for name, s in ledger.spaces.items():
        status = ledger.store.status(name)
        np.testing.assert_array_equal(status, s.status)
        assert s.counts.tolist() == np.bincount(status, minlength=4)[:4].tolist()
        state = ledger.state(name)
        assert (state.pending, state.running, state.done, state.failed) == tuple(s.counts.tolist())
        assert sorted(r for sp, r in open_rows if sp == name) == np.flatnonzero(status == RUNNING).tolist()
        assert sorted(s.pending) == np.flatnonzero(status == PENDING).tolist()


def test_fake_workers_finish_every_row_exactly_once(ledger):
    workers = [FakeWorker(0, fail={("b@c_flops=0.25", 3)}), FakeWorker(1)]
    task_lease, task = {}, 0
    leases = []
    while True:
        for w in workers:
            lease = ledger.take(3, w.wid)
            if lease is not None:
                task += 1
                task_lease[task] = lease.id
                leases.append((w, lease, task))
        check_invariants(ledger)
        if not leases:
            break
        w, lease, t = leases.pop(0)
        assert len({lease.space}) == 1 and len(lease.rows) <= 3  # one space (one spec) per cohort
        accepted = ledger.finish(w.results(ledger, lease, t), task_lease)
        assert [r.row for r in accepted] == list(lease.rows)
        check_invariants(ledger)
    assert ledger.finished() and not ledger.leases
    assert file_counts(ledger) == {"a@c_flops=0.25": [0, 0, 7, 0], "b@c_flops=0.25": [0, 0, 4, 1]}
    cols = ledger.store.read("a@c_flops=0.25")
    np.testing.assert_array_equal(cols["top1"], 50.0 + np.arange(7))
    np.testing.assert_allclose(cols["acc_drop"], 90.0 - cols["top1"])
    assert (cols["curve"][:, 1] == cols["top1"]).all()
    assert ledger.store.errors("b@c_flops=0.25")[3] == "loss became nan"
    state = ledger.state("a@c_flops=0.25")
    assert (state.best_row, state.best_top1, state.best_drop) == (6, 56.0, 34.0)
    assert state.median_drop == pytest.approx(37.0)
    done, total = ledger.work()
    assert done == pytest.approx(total) and total > 0


def test_a_result_twice_or_from_a_lost_lease_is_refused(ledger):
    lease = ledger.take(2, 0)
    task_lease = {11: lease.id}
    results = FakeWorker(0).results(ledger, lease, 11)
    assert len(ledger.finish(results[:1] + results[:1], task_lease)) == 1  # the same row twice in one batch
    assert ledger.finish(results[:1], task_lease) == []  # and again later
    assert ledger.requeue(lease.id, "worker died") == []  # row 1 goes back to pending (first attempt)
    assert ledger.finish(results[1:], task_lease) == []  # a late result of the lost lease: refused
    check_invariants(ledger)
    assert ledger.spaces[lease.space].status[list(lease.rows)].tolist() == [DONE, PENDING]
    again = ledger.take(1, 1)
    assert again.rows == (lease.rows[1],)  # requeued rows go first


def test_requeue_fails_a_row_after_max_attempts(ledger):
    for attempt in range(1, MAX_ATTEMPTS + 1):
        lease = ledger.take(2, 0)
        assert lease.rows == (0, 1)
        failed = ledger.requeue(lease.id, f"the worker process on cpu died (attempt {attempt})")
        check_invariants(ledger)
    assert failed == [0, 1]
    assert ledger.spaces["a@c_flops=0.25"].status[:2].tolist() == [FAILED, FAILED]
    assert ledger.store.errors("a@c_flops=0.25")[0] == f"the worker process on cpu died (attempt {MAX_ATTEMPTS})"


def test_fail_and_release(ledger):
    first, _second = ledger.take(3, 0), ledger.take(3, 1)
    assert ledger.fail(first.id, "RuntimeError: bad shape") == [0, 1, 2]
    third = ledger.take(4, 2)
    assert third.space == "a@c_flops=0.25" and third.rows == (6,)
    assert ledger.release_in_flight() == 4  # second and third: back to pending, no attempt counted
    check_invariants(ledger)
    assert not ledger.leases and ledger.spaces["a@c_flops=0.25"].attempts == {}
    assert file_counts(ledger)["a@c_flops=0.25"] == [4, 0, 0, 3]
    assert ledger.take(10, 0).rows == (3, 4, 5, 6)


def test_each_space_keeps_its_spec_and_a_new_ledger_reads_the_file(ledger, tmp_path):
    lease = ledger.take(7, 0)
    ledger.finish(FakeWorker(0).results(ledger, lease, 1), {1: lease.id})
    ledger.take(2, 1)  # left running
    store = ledger.store
    store.close()
    again = ResultsStore.open(tmp_path / "results.h5")
    try:
        fresh = RowLedger(again, base_top1=90.0)
        with pytest.raises(RuntimeError, match="left running"):  # a broken invariant is a bug, not bad input
            fresh.load("b@c_flops=0.25", SPEC)
        again.reset_running("b@c_flops=0.25")
        b = fresh.load("b@c_flops=0.25", SPEC)
        a = fresh.load("a@c_flops=0.25", SPEC)
        assert b.spec == SpaceSpec(RetrainSpec(epochs=3), "random") and a.spec == SPEC  # from the attributes
        assert a.counts.tolist() == [0, 0, 7, 0] and b.counts.tolist() == [5, 0, 0, 0]
        assert fresh.state("a@c_flops=0.25").best_row == 6
    finally:
        again.close()
    with open_readonly(tmp_path / "results.h5") as reader:
        assert (reader.status("b@c_flops=0.25") == PENDING).all()
        assert np.isnan(reader.read("b@c_flops=0.25", ["top1"])["top1"]).all()
