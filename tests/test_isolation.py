"""Each network timed in a child forked for it (pipeline/deploy/isolation.py): the child's answer comes back, its
failures are raised here, its state dies with it, and an interrupted parent leaves no child behind."""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch
from torch import nn

from nps.pipeline.deploy import isolation
from nps.pipeline.errors import NpsError

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

TOUCHED: list[int] = []


@pytest.fixture
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_isolation_forks_only_on_the_cpu_with_one_thread(one_thread):
    assert isolation.isolation("cpu") == isolation.FORKED
    assert isolation.isolation("cuda") == isolation.IN_PROCESS  # a child cannot initialise CUDA again
    torch.set_num_threads(2)
    assert isolation.isolation("cpu") == isolation.IN_PROCESS  # nor use its parent's OpenMP threads


def test_the_child_answers_and_its_state_dies_with_it(one_thread):
    def fn():
        TOUCHED.append(os.getpid())
        return {"pid": os.getpid(), "array": np.arange(3)}

    answer = isolation.run_isolated(fn, "a test", "cpu")
    assert answer["pid"] != os.getpid() and answer["array"].tolist() == [0, 1, 2]
    assert TOUCHED == []  # the child's append happened in the child only
    assert isolation.run_isolated(fn, "a test", "cpu")["pid"] not in (os.getpid(), answer["pid"])  # a child each


def test_in_process_it_runs_here(one_thread):
    torch.set_num_threads(2)
    try:
        assert isolation.run_isolated(lambda: TOUCHED.append(1) or os.getpid(), "a test", "cpu") == os.getpid()
        assert TOUCHED == [1]
    finally:
        TOUCHED.clear()


def test_an_error_in_the_child_is_raised_here(one_thread):
    def fn():
        raise NpsError("weights.pt cannot be read")

    with pytest.raises(NpsError, match="weights.pt cannot be read"):
        isolation.run_isolated(fn, "a test", "cpu")


def test_an_error_that_does_not_pickle_comes_back_as_its_words(one_thread):
    class Unpicklable(Exception):
        def __reduce__(self):
            raise TypeError("no")

    def fn():
        raise Unpicklable("a lock in its arguments")

    with pytest.raises(RuntimeError, match="Unpicklable: a lock in its arguments"):
        isolation.run_isolated(fn, "a test", "cpu")


def test_a_child_killed_without_an_answer_is_one_line_naming_what_it_timed(one_thread):
    with pytest.raises(NpsError, match=r"timing network 3 of 9: its process ended \(signal 9\) without a result"):
        isolation.run_isolated(lambda: os.kill(os.getpid(), signal.SIGKILL), "network 3 of 9", "cpu")


def test_an_interrupted_parent_kills_its_child(one_thread, tmp_path):
    marker = tmp_path / "pid"

    def fn():
        marker.write_text(str(os.getpid()))
        time.sleep(60)

    def interrupt(*_):
        raise KeyboardInterrupt

    saved = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 1.0)  # a fork's child has no timer of its parent's
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            isolation.run_isolated(fn, "a test", "cpu")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, saved)
    assert time.monotonic() - started < 30
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(int(marker.read_text()), 0)


def test_time_in_passes_builds_and_times_each_network_in_its_own_child(one_thread):
    """The parent builds the base only; every other network is built (``model_of``) and timed in a child, and each
    child starts from the parent's state: the oneDNN kernels and heap one network's timing leaves behind are gone
    before the next."""
    from types import SimpleNamespace

    from nps.pipeline.deploy.latency import time_in_passes

    built = []

    def model_of(t):
        built.append((t, os.getpid()))
        return nn.Sequential(nn.Conv2d(1, 4 + 4 * t, 3), nn.ReLU())

    table = SimpleNamespace(in_channels=1, resolution=8)  # what the timers read of a layer table
    kw = dict(device="cpu", channels_last=True, amp_dtype=None, warmup=1, runs=3, min_run_s=0.0)
    taken = time_in_passes(model_of, 3, table, (1,), kw, passes=2, retry_above=1.0, retries=0, paired=True)
    assert built == [(0, os.getpid())]  # networks 1 and 2 were built in children
    assert all(len(taken[t, 1]) == 2 for t in range(3))
    assert taken[0, 1][0][2] is None and all(taken[t, 1][p][2].ratio > 0 for t in (1, 2) for p in range(2))
