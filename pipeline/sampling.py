"""Sampled recipes as rows of a results file: the glue between the samplers (kernels/) and the store.

Used by ``nps sample`` and by the run driver, so both write the same rows and the same space attributes.
"""
from __future__ import annotations

import zlib

import numpy as np

from nps.kernels.samplers import Sample, sample_space
from nps.kernels.spaces import Space, describe


def row_seeds(seed: int, key: str, n: int) -> np.ndarray:
    """Per-row seeds (pruning ties, data order of the row's training): distinct across spaces of one run."""
    start = np.random.default_rng([seed, zlib.crc32(key.encode())]).integers(0, 2**52)
    return start + np.arange(n, dtype=np.int64)


def rows_from_sample(sample: Sample, seed: int) -> dict[str, np.ndarray]:
    """The recipe fields of results.h5 (DESIGN.md) for every recipe of ``sample``."""
    return {
        "recipe": sample.recipe.astype(np.float32),
        "keep": sample.keep.astype(np.int32),
        "flops": sample.flops.astype(np.int64),
        "params": sample.params.astype(np.int64),
        "c_flops": sample.c_flops.astype(np.float32),
        "c_params": sample.c_params.astype(np.float32),
        "mcb": sample.mcb.astype(np.float32),
        "std": sample.std.astype(np.float32),
        "seed": row_seeds(seed, sample.space.key, len(sample)),
    }


def space_attrs(space: Space, seed: int, stats: dict | None = None) -> dict:
    """Attributes of ``/spaces/<space key>``: the constraints, so a file says what its rows were drawn from."""
    attrs = {
        "space": space.name,
        "target": space.target,
        "value": space.value,
        "delta": space.delta,
        "R": space.R,
        "sigma": space.sigma,
        "std_band": np.asarray(space.std_band or (np.nan, np.nan), dtype=np.float64),
        "mcb_band": np.asarray(space.mcb_band or (np.nan, np.nan), dtype=np.float64),
        "seed": int(seed),
        "description": describe(space),
    }
    if stats:
        attrs["uniform_ratio"] = float(stats.get("u", np.nan))
        attrs["proposals"] = int(stats.get("proposals", 0))
    return attrs


def space_seed(seed: int, key: str) -> int:
    """The sampler's seed for one space of a run: independent streams for the spaces of one experiment seed."""
    return int(np.random.SeedSequence([seed, zlib.crc32(key.encode())]).generate_state(1)[0])


def sample_rows(table, space: Space, n: int, seed: int, **kwargs) -> tuple[dict, dict, Sample]:
    """Draw ``n`` recipes; returns (rows, space attrs, the sample with its stats).

    Each space draws from its own stream (:func:`space_seed`), so spaces of one run are independent samples.
    """
    sample = sample_space(table, space, n, space_seed(seed, space.key), **kwargs)
    return rows_from_sample(sample, seed), space_attrs(space, seed, sample.stats), sample
