"""Plain helpers shared by test modules (fixtures and markers are in conftest.py)."""
from __future__ import annotations

import numpy as np

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
