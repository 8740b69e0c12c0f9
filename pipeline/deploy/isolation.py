"""Every network timed from the same process state: each timing in a child forked from a parent that times nothing.

A timing process that has run many networks is not the process it was: oneDNN keeps the kernels it made for each
layer shape in a cache of 1,024 (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``), least recently used out first, and the heap
holds what every earlier network left in it. On this 2-core CPU three MobileNetV2 subnetworks paired with their
base (``nps latency``'s ratio) measured 0.050 higher on average once 50 other subnetworks had run in the process
than fresh, and 0.007 higher each timed in a forked child (``tools/probe_process_state.py``); the latency study's
std-0.1 rows, timed in one session of 51 networks, came out 0.022-0.063 higher relative to the base than in a
session of 11, each by a different amount (docs/study-latency.md, seventh run). A deployed network runs alone in
its own process: that is the state a timing should see. :func:`run_isolated` runs one network's timing in a child
process forked for it, so every network starts from the parent's state, which timing never touched, and whatever
the timing leaves dies with the child.

Forking is used only where it is safe and its state is the parent's: on the CPU, with one intra-op thread (a
forked child cannot use an OpenMP thread pool its parent started; with more threads, or on CUDA, which a child
cannot re-initialise, the timing runs in the process as before), on a system with ``os.fork``. :func:`isolation`
says which applies, for the session's settings.
"""
from __future__ import annotations

import os
import pickle
import signal
from collections.abc import Callable
from typing import Any

from nps.pipeline.errors import NpsError

FORKED = "each network in a child process forked from a parent that times nothing"
IN_PROCESS = "every network in this process"


def isolation(device) -> str:
    """How networks are timed on ``device`` in this process: :data:`FORKED` on the CPU with one intra-op thread on
    a system that forks, else :data:`IN_PROCESS`."""
    import torch

    return FORKED if (hasattr(os, "fork") and torch.device(device).type == "cpu"
                      and torch.get_num_threads() == 1) else IN_PROCESS


def run_isolated(fn: Callable[[], Any], what: str, device) -> Any:
    """``fn()`` in a forked child where :func:`isolation` allows it (its return value, pickled back; an exception it
    raises is raised here), else in this process. A child that dies without answering (a signal, the kernel's OOM
    killer) is one NpsError line naming ``what``; a KeyboardInterrupt here kills the child first."""
    if isolation(device) != FORKED:
        return fn()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: answer through the pipe, never return into the parent's code
        code = 0
        try:
            os.close(read_fd)
            try:
                answer = pickle.dumps((True, fn()))
            except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent, which raises it
                try:
                    answer = pickle.dumps((False, exc))
                except Exception:  # noqa: BLE001 - an exception that does not pickle goes back as its words
                    answer = pickle.dumps((False, RuntimeError(f"{type(exc).__name__}: {exc}")))
            with os.fdopen(write_fd, "wb") as fh:
                fh.write(answer)
        except BaseException:  # noqa: BLE001 - nothing may escape a forked child
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    try:
        with os.fdopen(read_fd, "rb") as fh:
            data = fh.read()
        _, status = os.waitpid(pid, 0)
    except BaseException:
        _kill(pid)
        raise
    if not data:
        how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else \
            f"exit status {os.waitstatus_to_exitcode(status)}"
        raise NpsError(f"timing {what}: its process ended ({how}) without a result; if the machine ran out of memory, "
                       "time fewer networks at once or a smaller batch")
    ok, value = pickle.loads(data)
    if not ok:
        raise value
    return value


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
