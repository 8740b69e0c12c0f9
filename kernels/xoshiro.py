"""A small inlined random source for the sampler kernels: xoshiro256++ with the ziggurat normal.

numba's ``np.random.Generator`` reaches its bit generator through a function pointer on every draw (3.6 ns per
normal, 5.7 ns per uniform on this machine); the Gaussian kernel draws ~40 of them per proposal. Keeping the state
in registers for a whole vector of normals makes a normal about 3× cheaper (``tools/bench_sampler.py``). The
ziggurat tables are numpy's (as numba ships them), so the normals are the same algorithm as numpy's; the stream is
seeded from ``np.random.SeedSequence`` and a seed reproduces a run.
"""
from __future__ import annotations

import numpy as np
from numba.np.random._constants import fi_double, ki_double, wi_double, ziggurat_nor_inv_r, ziggurat_nor_r

from nps.kernels.complexity import njit

_KI = np.ascontiguousarray(ki_double, dtype=np.uint64)
_WI = np.ascontiguousarray(wi_double, dtype=np.float64)
_FI = np.ascontiguousarray(fi_double, dtype=np.float64)
_R = float(ziggurat_nor_r)
_INV_R = float(ziggurat_nor_inv_r)
_TO_UNIT = 1.0 / 9007199254740992.0  # 2**-53


def new_state(seed) -> np.ndarray:
    """Four uint64 words of xoshiro256++ state from ``seed`` (an int or a sequence of ints), never all zero."""
    state = np.random.SeedSequence(seed).generate_state(4, np.uint64)
    if not state.any():  # pragma: no cover - probability 2**-256
        state[0] = 1
    return state


@njit(nogil=True, cache=True)
def _step(s0, s1, s2, s3):
    r = s0 + s3
    r = ((r << np.uint64(23)) | (r >> np.uint64(41))) + s0
    t = s1 << np.uint64(17)
    s2 ^= s0
    s3 ^= s1
    s1 ^= s2
    s0 ^= s3
    s2 ^= t
    s3 = (s3 << np.uint64(45)) | (s3 >> np.uint64(19))
    return r, s0, s1, s2, s3


@njit(nogil=True, cache=True, inline="always")
def _unit(r):
    """The top 53 bits of a draw as a double in [0, 1)."""
    return float(r >> np.uint64(11)) * _TO_UNIT


@njit(nogil=True, cache=True)
def uniform(state):
    """One double in [0, 1)."""
    r, state[0], state[1], state[2], state[3] = _step(state[0], state[1], state[2], state[3])
    return _unit(r)


@njit(nogil=True, cache=True)
def fill_normals(state, out):
    """Fill ``out`` with independent N(0, 1) draws (the ziggurat, as numpy's ``standard_normal``)."""
    s0, s1, s2, s3 = state[0], state[1], state[2], state[3]
    for i in range(out.shape[0]):
        while True:
            r, s0, s1, s2, s3 = _step(s0, s1, s2, s3)
            idx = r & np.uint64(0xFF)
            r >>= np.uint64(8)
            rabs = (r >> np.uint64(1)) & np.uint64(0x000FFFFFFFFFFFFF)
            x = rabs * _WI[idx]
            if r & np.uint64(1):
                x = -x
            if rabs < _KI[idx]:
                out[i] = x
                break
            if idx == 0:  # the tail beyond the last layer
                while True:
                    r, s0, s1, s2, s3 = _step(s0, s1, s2, s3)
                    xx = -_INV_R * np.log1p(-_unit(r))
                    r, s0, s1, s2, s3 = _step(s0, s1, s2, s3)
                    yy = -np.log1p(-_unit(r))
                    if yy + yy > xx * xx:
                        break
                out[i] = -(_R + xx) if (rabs >> np.uint64(8)) & np.uint64(1) else _R + xx
                break
            r, s0, s1, s2, s3 = _step(s0, s1, s2, s3)
            if (_FI[idx - 1] - _FI[idx]) * _unit(r) + _FI[idx] < np.exp(-0.5 * x * x):
                out[i] = x
                break
    state[0] = s0
    state[1] = s1
    state[2] = s2
    state[3] = s3
