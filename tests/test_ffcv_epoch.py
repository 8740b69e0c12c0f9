"""An FFCV epoch its consumer leaves early ends: its thread, its page readers and its buffers do not outlive it."""
from __future__ import annotations

import json
import operator
import threading
import time

import numpy as np
import pytest

from nps.datasets.convert import convert_dataset
from nps.datasets import ffcv_epoch
from nps.datasets.ffcv_epoch import end_epoch, end_epoch_later
from nps.datasets.loaders import make_loaders

from helpers import load_tool


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ffcv-epoch")
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (260, 32, 32, 3), dtype=np.uint8)
    np.savez(root / "d.npz", x_train=x[:200], y_train=np.arange(200) % 10, x_test=x[200:],
             y_test=np.arange(60) % 10)
    convert_dataset("npz", root / "out", src=root / "d.npz", workers=1)
    return root / "out"


def loader(data_dir, *, os_cache=True, batches_ahead=3, batch_size=32):
    train, _, info = make_loaders(data_dir, batch_size=batch_size, on_device=False, num_workers=1, os_cache=os_cache,
                                  batches_ahead=batches_ahead, augment=False)
    assert info.implementation == "ffcv"
    return train


def settle(before: set, seconds: float = 20.0) -> set:
    """The threads started since ``before`` that are still alive once they have had ``seconds`` to end."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = {t for t in threading.enumerate() if t.ident not in before}
        if not left:
            return left
        time.sleep(0.05)
    return {t for t in threading.enumerate() if t.ident not in before}


@pytest.mark.parametrize("os_cache", [True, False])
def test_leaving_epochs_early_leaves_no_thread_behind(data_dir, os_cache):
    train = loader(data_dir, os_cache=os_cache)
    before = {t.ident for t in threading.enumerate()}
    for epoch in range(6):
        train.set_epoch(epoch)
        for i, (x, _) in enumerate(train):
            assert x.shape[0] == 32
            if i == epoch % 2:  # leave after the first or the second batch
                break
    left = settle(before)
    assert not left, f"threads left running: {sorted(t.name for t in left)}"
    # and the loader still gives whole epochs afterwards
    assert sum(x.shape[0] for x, _ in train) == len(train) * 32


def test_an_exception_in_the_consumer_ends_the_epoch_too(data_dir):
    train = loader(data_dir)
    before = {t.ident for t in threading.enumerate()}
    with pytest.raises(RuntimeError, match="diverged"):
        for _ in train:
            raise RuntimeError("diverged")
    assert not settle(before)


def test_an_epoch_blocked_on_its_end_marker_is_ended(data_dir):
    """All batches decoded, the queue full: FFCV's thread waits on its end marker with no timeout, for ever."""
    train = loader(data_dir, batches_ahead=3, batch_size=64)  # 3 batches: the queue holds them all
    assert len(train) == 3
    batches = iter(train.loader)  # FFCV's own EpochIterator, not our wrapper
    deadline = time.monotonic() + 30
    while not (batches.output_queue.full() and operator.length_hint(batches.iter_ixes) == 0):
        assert time.monotonic() < deadline, "the FFCV thread never filled its queue"
        time.sleep(0.02)
    time.sleep(0.7)  # past a put timeout: the thread is in its untimed put now
    assert batches.is_alive()
    assert end_epoch(batches, timeout_s=10.0)
    assert not batches.is_alive()


def test_a_finished_epoch_needs_nothing(data_dir):
    train = loader(data_dir)
    batches = iter(train.loader)
    assert len(list(batches)) == len(train)
    batches.join(10)
    assert end_epoch(batches) and end_epoch_later(batches) is None


def test_the_consumer_does_not_wait_for_the_thread_to_end(data_dir, monkeypatch):
    """Ending takes about FFCV's 0.5 s put timeout; a daemon thread does it, not the consumer. Here the ending is
    held until the consumer has gone on: a consumer that waited for it would hang (the test's timeout)."""
    release, calls = threading.Event(), []

    def held(batches, timeout_s=60.0):
        calls.append(batches)
        assert release.wait(30)
        return end_epoch(batches, timeout_s)

    monkeypatch.setattr(ffcv_epoch, "end_epoch", held)
    train = loader(data_dir)
    before = {t.ident for t in threading.enumerate()}
    for _ in range(ffcv_epoch.MAX_ENDING):
        for _ in train:
            break
    assert len(calls) == ffcv_epoch.MAX_ENDING and all(b.is_alive() for b in calls)  # back with all still to end
    # one more early stop waits for the oldest ending: a burst of stops holds at most MAX_ENDING epochs' buffers
    third = threading.Thread(target=lambda: next(iter(train)))
    third.start()
    third.join(0.5)
    assert third.is_alive() and len(calls) == ffcv_epoch.MAX_ENDING
    release.set()
    third.join(30)
    assert not third.is_alive() and len(calls) == ffcv_epoch.MAX_ENDING + 1
    assert not settle(before)


def test_at_interpreter_shutdown_the_epoch_is_only_told_to_stop(monkeypatch):
    """No new thread can start then; the epoch's own thread ends with the process."""
    class Shut(threading.Thread):
        def start(self):
            raise RuntimeError("can't create new thread at interpreter shutdown")

    class Epoch:
        terminate_event = threading.Event()

        def is_alive(self):
            return True

    monkeypatch.setattr(ffcv_epoch.threading, "Thread", Shut)
    epoch = Epoch()
    assert end_epoch_later(epoch) is None and epoch.terminate_event.is_set()


def test_the_gpu_acceptance_check_runs_on_the_cpu(capsys):
    """tools/gpu_acceptance.py's check of the same, which a GPU session runs first, works where it can be tried."""
    module = load_tool("gpu_acceptance")
    module.check_ffcv_epochs("cpu", stops=4, images=450, side=32)  # small: the logic, not the figure
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["loader"] == "ffcv" and line["threads_left"] == 0 and line["ok"] is True, line
