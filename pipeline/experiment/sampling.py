"""Sampled recipes as rows of a results file: the glue between the samplers (kernels/) and the store.

Used by ``nps sample`` and by the run driver, so both write the same rows and the same space attributes.
"""
from __future__ import annotations

import os
import zlib
from collections.abc import Iterable

import numpy as np

from nps.kernels.samplers import Sample, sample_space
from nps.kernels.spaces import BASELINE, RATIOS, Space, describe, uniform_baseline
from nps.pipeline.errors import NpsError

# What drawing a space's recipes holds in memory (checked before anything is allocated: a count that cannot fit would
# otherwise end in numpy's MemoryError, or in the kernel's OOM killer, after minutes). Held per recipe and group until
# the file is written: the sampler's recipe (f8) and keep (i8) arrays and the rows' f4 recipe and i4 keep; per recipe:
# the sampler's target, other, std and hash columns, the measured c_flops, c_params and mCB and the rows' scalar
# fields (88 bytes measured). Writing a space (nps.pipeline.results.store.add_space) then makes its result columns
# whole at once, the S256 error column first (296 bytes a row measured), plus the f4 curve, and copies the recipe and
# keep it stores (8 bytes a group). tracemalloc's peak is 0.86-0.94 of this estimate (tests/test_cli_sample.py).
HELD_BYTES_PER_GROUP = 24
HELD_BYTES_PER_ROW = 128
WRITE_BYTES_PER_GROUP = 8
WRITE_BYTES_PER_ROW = 384


def row_seeds(seed: int, key: str, n: int) -> np.ndarray:
    """Per-row seeds (pruning ties, data order of the row's training): distinct across spaces of one run."""
    start = np.random.default_rng([seed, zlib.crc32(key.encode())]).integers(0, 2**52)
    return start + np.arange(n, dtype=np.int64)


def rows_from_sample(sample: Sample, seed: int) -> dict[str, np.ndarray]:
    """The recipe fields of results.h5 (docs/results-format.md) for every recipe of ``sample``."""
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


def keep_rows(table, recipe, keep, std, seeds) -> dict[str, np.ndarray]:
    """The recipe fields of results.h5 for given recipes and keep vectors: their exact FLOPs, params, c_flops,
    c_params and mCB from ``table``."""
    keep = np.asarray(keep, dtype=np.int64)
    flops, params = table.flops_of(keep), table.params_of(keep)
    c_flops, c_params = flops / table.base_flops, params / table.base_params
    return {"recipe": np.asarray(recipe).astype(np.float32), "keep": keep.astype(np.int32),
            "flops": flops.astype(np.int64), "params": params.astype(np.int64), "c_flops": c_flops.astype(np.float32),
            "c_params": c_params.astype(np.float32), "mcb": (c_flops / c_params).astype(np.float32),
            "std": np.asarray(std).astype(np.float32), "seed": seeds}


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
        if "kernel" in stats:  # the kernel that drew the rows (a seed's rows are its draws)
            attrs["sampler"] = stats["kernel"]
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


# --------------------------------------------------------------------------------------------------------------------
# Memory.


def available_memory() -> int | None:
    """Bytes this process can still allocate: the kernel's MemAvailable, lowered to the room left under this
    container's memory limit (cgroup v2) where one is set; from ``os.sysconf`` where /proc is missing; None if
    neither tells."""
    found = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    found = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if found is None:
        try:
            found = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:
        with open("/sys/fs/cgroup/memory.max") as fh:
            limit = fh.read().strip()
        with open("/sys/fs/cgroup/memory.current") as fh:
            used = int(fh.read().strip())
        if limit != "max":
            found = min(found, max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return found


def recipes_bytes(spaces: Iterable[tuple[int, int, int]]) -> int:
    """Peak bytes of drawing and writing spaces given as (rows, groups, epochs): every space's recipes are held
    until the file is written (``nps sample``, and ``nps run`` before its first space is stored), then one space's
    result columns are made at a time."""
    spaces = list(spaces)
    held = sum(n * (HELD_BYTES_PER_GROUP * g + HELD_BYTES_PER_ROW) for n, g, _ in spaces)
    writing = max((n * (WRITE_BYTES_PER_GROUP * g + WRITE_BYTES_PER_ROW + 4 * max(int(e), 1)) for n, g, e in spaces),
                  default=0)
    return held + writing


def _size(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n / 2**10:,.1f} KiB"


def check_recipes_fit(spaces: Iterable[tuple[int, int, int]], key: str, hint: str) -> None:
    """Refuse, in one line naming ``key``, the size and the memory available, spaces (rows, groups, epochs) whose
    recipes cannot fit in this machine's memory (:func:`recipes_bytes` against :func:`available_memory`; nothing
    is checked where the memory is unknown)."""
    spaces = list(spaces)
    need = recipes_bytes(spaces)
    have = available_memory()
    if have is None or need <= have:
        return
    count = f"{len(spaces)} space{'' if len(spaces) == 1 else 's'}"
    raise NpsError(f"{key}: the recipes of {count} need {_size(need)}, this machine has {_size(have)} available; "
                   f"{hint}")


def check_plan_memory(plan) -> None:
    """``nps run``: the recipes of every planned space fit in memory (all are drawn before any is written); the
    line names the ``n`` of the space that needs the most."""
    sizes = [(p.rows, len(plan.table_for(p.key).channels), p.spec.retrain.epochs) for p in plan.spaces]
    if not sizes:
        return
    largest = max(range(len(sizes)), key=lambda i: recipes_bytes([sizes[i]]))
    p = plan.spaces[largest]
    check_recipes_fit(sizes, f"spaces[{p.index}].n = {p.n}", f"lower spaces[{p.index}].n")


def baseline_key(target: str, value: float) -> str:
    """Group name of a regime's baseline: ``baseline@<target>=<value>``."""
    return f"{BASELINE}@{target}={value:g}"


def baseline_rows(table, target: str, value: float, seed: int, *, delta: float, R: float) -> tuple[dict, dict]:
    """(rows, attrs) of a regime's uniform baseline: one row, every group at the uniform ratio whose integer counts
    come closest to the target (paper §3.1's reference, trained like every other row)."""
    ratio, units, achieved = uniform_baseline(table, target, value, R)
    keep = (units * np.asarray(getattr(table, "granularity", 1), dtype=np.int64))[None, :]
    rows = keep_rows(table, np.full((1, len(table.channels)), ratio), keep, np.zeros(1),
                     row_seeds(seed, baseline_key(target, value), 1))
    attrs = {"space": BASELINE, "target": target, "value": float(value), "delta": float(delta), "R": float(R),
             "sigma": 0.0, "std_band": np.array([np.nan, np.nan]), "mcb_band": np.array([np.nan, np.nan]),
             "seed": int(seed), "uniform_ratio": ratio, "achieved": achieved,
             "within_delta": bool(abs(achieved - value) <= delta),
             "description": f"uniform baseline: r = {ratio:.4f} in every group gives {target} {achieved:.4f}"}
    return rows, attrs


def ratio_rows(table, key: str, ratios, n: int, seed: int) -> tuple[dict, dict]:
    """(rows, attrs) of a ratio space: ``n`` rows per uniform ratio, every group pruned at that ratio."""
    recipe = np.repeat(np.repeat(np.asarray(ratios, dtype=np.float64), n)[:, None], len(table.channels), axis=1)
    rows = keep_rows(table, recipe, table.keep(recipe), np.zeros(len(recipe)), row_seeds(seed, key, len(recipe)))
    attrs = {"space": RATIOS, "ratios": np.asarray(ratios, dtype=np.float64), "seed": int(seed),
             "description": f"uniform ratios {', '.join(f'{r:g}' for r in ratios)}, {n} row(s) each"}
    return rows, attrs


def fixed_rows(table, space: Space, keep, n: int, seed: int, description: str) -> tuple[dict, dict]:
    """(rows, attrs) of a space that is one recipe (``weights:uniform``, ``weights:global``): ``n`` rows of the same
    ``keep`` vector, each with its own seed (the data order of its fine-tuning)."""
    keep = np.repeat(np.asarray(keep, dtype=np.int64)[None, :], n, axis=0)
    recipe = 1.0 - keep / np.asarray(table.channels, dtype=np.float64)
    rows = keep_rows(table, recipe, keep, recipe.std(axis=1), row_seeds(seed, space.key, n))
    achieved = float(rows["flops"][0] / table.base_flops if space.target == "c_flops"
                     else rows["params"][0] / table.base_params)
    attrs = space_attrs(space, seed)
    attrs.update(achieved=achieved, within_delta=bool(abs(achieved - space.value) <= space.delta),
                 description=f"{description}: {space.target} {achieved:.4f}")
    return rows, attrs


def weight_uniform_rows(table, space: Space, n: int, seed: int) -> tuple[dict, dict]:
    """``weights:uniform``: the same sparsity in every prunable layer, the one whose counts come closest to the
    target."""
    ratio, units, _ = uniform_baseline(table, space.target, space.value, space.R)
    return fixed_rows(table, space, units, n, seed, f"uniform sparsity {ratio:.4f} in every layer")


def weight_global_rows(table, space: Space, n: int, seed: int, model) -> tuple[dict, dict]:
    """``weights:global``: one magnitude threshold across every prunable layer of the trained base ``model``."""
    from nps.pipeline.network.weight_table import global_keep

    keep = global_keep(model, table, space.target, space.value, space.delta)
    return fixed_rows(table, space, keep, n, seed, "one magnitude threshold across layers")
