"""Counting the aten operations a callable dispatches (the host cost of a training step): shared by the tests and
tools/bench_cohort.py."""
from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn, warmup: int = 1) -> int:
    """Aten ops dispatched by ``fn()`` (after ``warmup`` calls that create lazily made state)."""
    for _ in range(warmup):
        fn()
    with _Count() as counter:
        fn()
    return counter.ops
