"""Ending an FFCV epoch that its consumer left before the end.

FFCV's ``EpochIterator`` is a thread that decodes batches ahead into a bounded queue. A consumer that stops early
(nps does so on purpose: adaptive BN takes a few thousand images, a limited pass stops at its batch count, a
verification at its image count) leaves that thread alive for the life of the process, with its batch buffers and
its memory context (and on CUDA the device copies): one leak per early stop, so one per cohort in a long run. The
thread's object cannot be collected while it runs, so FFCV's own ``__del__`` never ends it.

The thread looks at its terminate event only while the queue is full (at each 0.5 s timeout of its put), and it
puts its end-of-epoch marker with no timeout at all. So :func:`end_epoch` sets the event, waits, and once the
thread has no batch left to decode empties the queue until the marker is in (at most two more puts); then it
exits FFCV's memory context (``close``). It relies on FFCV 1.0's ``EpochIterator`` attributes and falls back to
``close()`` alone where they are missing. That wait (about the put timeout) is not the consumer's:
:func:`end_epoch_later` does it on a short-lived daemon thread, at most ``MAX_ENDING`` at a time.

``tools/bench_ffcv_epoch.py`` (30 epochs of 64 x 64 RGB, batch 64, each left after its first batch; 2-core VM,
2026-12-07), the consumer's seconds a stop, threads and resident MiB left 3 s after the last:

==========================  ==============  =================  =================
policy                      1 s between     burst (0 s)        left behind
==========================  ==============  =================  =================
leave (nps before this)     0.010           0.014              30 threads, +490
end_epoch in the consumer   0.52            0.52               0, +16 to +30
end_epoch_later (nps)       0.009           0.17               0, +33 to +52
==========================  ==============  =================  =================
"""
from __future__ import annotations

import logging
import operator
import queue
import threading
import time

log = logging.getLogger(__name__)

POLL_S = 0.05
MAX_ENDING = 2  # epochs ended on daemon threads at once (end_epoch_later)
_ENDING: list[threading.Thread] = []
_ENDING_LOCK = threading.Lock()


def end_epoch(batches, timeout_s: float = 60.0) -> bool:
    """Stop ``batches`` (an FFCV ``EpochIterator``) and free what it holds; True when its thread has ended.

    Returns at once when the epoch had finished. Otherwise takes about FFCV's put timeout (0.5 s), or the time to
    decode the batches it still had room for, at most ``timeout_s`` (then it logs a warning and leaves the thread).
    """
    alive = getattr(batches, "is_alive", None)
    if alive is None or not alive():
        return True  # finished (FFCV closed it) or not a thread at all
    needed = ("terminate_event", "output_queue", "iter_ixes", "join", "close")
    if not all(hasattr(batches, name) for name in needed):
        getattr(batches, "close", lambda: None)()
        return not alive()
    batches.terminate_event.set()
    deadline = time.monotonic() + timeout_s
    while alive():
        batches.join(POLL_S)
        if not alive():
            break
        if time.monotonic() > deadline:
            log.warning("an FFCV loader thread did not stop within %.0f s; it is left running", timeout_s)
            return False
        if operator.length_hint(batches.iter_ixes) == 0:  # no batch left to decode: make room for its last puts
            try:
                while True:
                    batches.output_queue.get_nowait()
            except queue.Empty:
                pass
    batches.close()
    return True


def end_epoch_later(batches) -> threading.Thread | None:
    """:func:`end_epoch` on a daemon thread, the caller going on at once; None when the epoch had finished.

    At most ``MAX_ENDING`` epochs end at a time: each holds its batch buffers until its thread has ended, so a burst
    of early stops would otherwise hold a burst of buffers. Past that the caller waits for the oldest to end.
    """
    alive = getattr(batches, "is_alive", None)
    if alive is None or not alive():
        return None
    with _ENDING_LOCK:
        _ENDING[:] = [t for t in _ENDING if t.is_alive()]
        oldest = _ENDING[0] if len(_ENDING) >= MAX_ENDING else None
    if oldest is not None:
        oldest.join()  # end_epoch itself gives up after its timeout
    thread = threading.Thread(target=end_epoch, args=(batches,), name="nps-ffcv-end-epoch", daemon=True)
    try:
        thread.start()
    except RuntimeError:  # the interpreter is shutting down: nothing outlives the process anyway
        event = getattr(batches, "terminate_event", None)
        if event is not None:
            event.set()
        return None
    with _ENDING_LOCK:
        _ENDING.append(thread)
    return thread
