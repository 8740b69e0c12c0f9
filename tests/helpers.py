"""Plain helpers shared by test modules (fixtures and markers are in conftest.py)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

from nps.kernels.samplers import sample_naive, sample_space

GROUPS = 4
CHANNELS = np.array([16, 32, 64, 64])


class StandInTable:
    """Anything with ``to_hdf5(group)`` can be the layer table of a results file."""

    def to_hdf5(self, group):
        group.create_dataset("channels", data=CHANNELS.astype("i4"))
        group.attrs["names"] = "a,b,c,d"
        group.attrs["model"] = "resnet20"
        group.attrs["resolution"] = 28


def rows_for_store(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    recipe = rng.uniform(0, 0.8, size=(n, GROUPS))
    keep = np.maximum(1, np.round((1 - recipe) * CHANNELS)).astype(int)
    return dict(recipe=recipe, keep=keep, flops=rng.integers(1e6, 1e8, n), params=rng.integers(1e4, 1e6, n),
                c_flops=rng.uniform(0.2, 0.3, n), c_params=rng.uniform(0.2, 0.3, n), mcb=rng.uniform(0.9, 1.1, n),
                std=recipe.std(axis=1), seed=np.arange(n) + 1000)


def cpu_experiment_head(name: str, seed: int, out, data_dir, checkpoint, *, experiment_extra: str = "") -> str:
    """The [experiment], [dataset] and [model] tables of a small CPU run of ResNet-20 on converted Fashion-MNIST."""
    return f"""
[experiment]
name = "{name}"
seed = {seed}
out = "{out}"
devices = "cpu"
{experiment_extra}

[dataset]
dir = "{data_dir}"
val_batch_size = 128
augment = false

[model]
name = "resnet20"
checkpoint = "{checkpoint}"
"""


def two_sample_ks(a, b):
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return np.abs(fa - fb).max()


def moving_groups(table, space) -> int:
    """How many groups the window kernel moves along t for ``space`` (1: its exact one-group window)."""
    from nps.kernels.samplers import window_direction

    return int((window_direction(table, space) > 0).sum())


def compare_to_rejection(table, space, n):
    """The fast sampler's population against plain rejection's (numpy, another seed) of the same space: each
    group's ratio mean and spread, and std(r), the complexities (c_latency too where the table has a latency model)
    and mCB by two-sample KS at alpha = 0.001."""
    fast = sample_space(table, space, n, seed=1, distinct=False)
    naive, used = sample_naive(table, space, n, seed=2, max_proposals=20_000_000)
    assert len(naive) == n, f"naive rejection found only {len(naive)} in {used} proposals"
    se_mean = np.sqrt(fast.recipe.var(axis=0) / n + naive.recipe.var(axis=0) / n)
    assert np.all(np.abs(fast.recipe.mean(axis=0) - naive.recipe.mean(axis=0)) < 5 * se_mean + 1e-9)
    sd_f, sd_n = fast.recipe.std(axis=0), naive.recipe.std(axis=0)
    # the std of a std estimate is about sd/sqrt(2n) (normal case); allow 5 of them plus 2% for the truncation
    assert np.all(np.abs(sd_f - sd_n) < 5 * sd_n * np.sqrt(1.0 / n) + 0.02 * sd_n)
    # std(r) and the complexities: two-sample KS at alpha = 0.001 (c = 1.95)
    crit = 1.95 * np.sqrt(2.0 / n)
    for key in ("std", "c_flops", "c_params", "mcb") + (("c_latency",) if fast.c_latency is not None else ()):
        assert two_sample_ks(getattr(fast, key), getattr(naive, key)) < crit, key
    # the std(r) histogram, bin by bin
    edges = np.quantile(naive.std, np.linspace(0, 1, 11))
    hf, _ = np.histogram(np.clip(fast.std, edges[0], edges[-1]), edges)
    hn, _ = np.histogram(naive.std, edges)
    assert np.all(np.abs(hf - hn) < 5 * np.sqrt(hn + hf) + 1)


def paired_stand_in(time_network):
    """A stand-in for ``nps.pipeline.deploy.latency.time_network_pair`` made of a stand-in for ``time_network``:
    the row timed, then the base, every pair's ratio their medians' ratio."""
    from nps.pipeline.results.latency import PairedTiming

    def time_network_pair(base, model, table, batch, **kwargs):
        row = time_network(model, table, batch, **kwargs)
        against = time_network(base, table, batch, **kwargs)
        c = row.median_s / against.median_s
        return PairedTiming(row, against, c, c, c)

    return time_network_pair


def load_tool(name: str):
    """The module of ``tools/<name>.py`` (the tools are scripts, not a package). tools/ goes on ``sys.path``, as
    it is for a script run from there: a tool may import the modules it shares with others (space_table)."""
    tools = Path(__file__).resolve().parents[1] / "tools"
    if str(tools) not in sys.path:
        sys.path.append(str(tools))
    path = tools / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
