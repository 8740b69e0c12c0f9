"""A results file as a table: one row per subnetwork (``nps.pipeline.results.load``, ``nps table``).

Columns, in order: ``space`` (the space key, ``std-0.05@c_flops=0.25``), ``space_name`` (``std-0.05``,
``baseline``, ``std-0.05#top``), ``target``, ``value`` and ``regime`` (``c_flops=0.25``), ``row`` (the row index in
its space), ``status`` (pending, running, done, failed), ``top1``, ``top5``, ``drop`` (base top-1 − top-1 in
percentage points), ``loss``, ``c_flops``, ``c_params``, ``mcb``, ``std`` (std(r)), ``flops``, ``params``,
``seed``, ``train_s``, ``bn_top1`` (adaptive-BN top-1 before fine-tuning), ``error``, ``weights`` (fine-tuned
weights kept beside the file), ``recipe`` and ``keep`` (one array per row, or with ``wide=True`` one column per
group: ``recipe.<group>``, ``keep.<group>``), then, where ``nps latency`` measured the row, per device and batch
``latency_<device>_b<batch>_ms`` (median), ``latency_iqr_<device>_b<batch>_ms`` and ``speedup_<device>_b<batch>``
(base median / row median, same session). Values keep the file's types (float32 scores): they equal the HDF5's.
``pruning`` says ``filters`` or ``weights``; a weight space's ``recipe``/``keep`` have one entry per prunable layer
(wide: ``recipe.w:<layer>``, ``keep.w:<layer>``, NaN in the rows of filter spaces and the other way round).

:func:`columns` needs only numpy; :func:`load` returns a pandas DataFrame (``pip install 'nps[pandas]'``).
"""
from __future__ import annotations

import os

import numpy as np

from nps.pipeline.errors import NpsError, environment_error
from nps.pipeline.files import atomic_path

_FILE_FIELDS = ("status", "top1", "top5", "acc_drop", "loss", "c_flops", "c_params", "mcb", "std", "flops", "params",
                "seed", "train_s", "bn_top1", "error", "recipe", "keep")
_RENAME = {"acc_drop": "drop"}


def columns(path: str | os.PathLike, *, wide: bool = False) -> dict[str, np.ndarray]:
    """The table of :func:`load` as ``{column: array}`` (numpy only); ``recipe`` and ``keep`` are 2-D arrays
    (rows × groups) unless ``wide``."""
    from nps.kernels.spaces import parse_space_key
    from nps.pipeline.network.pruning_kind import kind_of
    from nps.pipeline.results.weights_files import saved_weight_rows
    from nps.pipeline.results.latency import latency_columns, read_latency
    from nps.pipeline.results.reader import STATUS_NAMES, open_readonly

    path = os.fspath(path)
    parts: list[dict[str, np.ndarray]] = []
    with open_readonly(path) as reader:
        names = {"filters": _names(reader.layers), "weights": _names(reader.weight_layers)}
        for space in reader.spaces():
            cols = reader.read(space, [f for f in _FILE_FIELDS if f in reader.file["spaces"][space]])
            n = min(len(c) for c in cols.values())  # a run may append rows between two column reads
            cols = {_RENAME.get(k, k): v[:n] for k, v in cols.items()}
            attrs = reader.file["spaces"][space].attrs
            key = parse_space_key(space)
            target = str(attrs["target"]) if "target" in attrs else (key.target if key else "")
            value = float(attrs["value"]) if "value" in attrs else (key.value if key else np.nan)
            kept = set(saved_weight_rows(path, space))
            part = {"space": np.full(n, space, dtype=object),
                    "space_name": np.full(n, key.label if key else space, dtype=object),
                    "target": np.full(n, target, dtype=object), "value": np.full(n, value),
                    "regime": np.full(n, key.regime if key else "", dtype=object), "row": np.arange(n, dtype=np.int64),
                    "status": np.array([STATUS_NAMES.get(int(s), str(int(s))) for s in cols.pop("status")],
                                       dtype=object),
                    "pruning": np.full(n, kind_of(space).name, dtype=object)}
            part.update(cols)
            part["weights"] = np.array([r in kept for r in range(n)], dtype=bool)
            parts.append(part)
        lat_names, latency = latency_columns(read_latency(reader))
    if not parts:
        return {}
    out: dict[str, np.ndarray] = {}
    for name in parts[0]:
        if name in _MATRICES:  # a filter space's vectors have one entry per group, a weight space's one per layer
            continue
        arrays = [p[name] for p in parts if name in p]
        if len(arrays) != len(parts):  # a field only some spaces have (older files): NaN / empty elsewhere
            arrays = [p[name] if name in p else np.full(len(p["row"]), np.nan) for p in parts]
        out[name] = np.concatenate(arrays)
    if lat_names:
        keys = list(zip(out["space"], out["row"].tolist()))
        for name in lat_names:
            out[name] = np.array([latency.get(k, {}).get(name, np.nan) for k in keys], dtype=np.float64)
    rows = len(out["row"])
    for what in _MATRICES:
        if wide:  # one column per group (weight spaces: per layer, ``recipe.w:<layer>``), NaN for the other kind
            for kind in ("filters", "weights"):
                mine = [p[what] for p in parts if p["pruning"][0] == kind]
                if not mine:
                    continue
                block = np.concatenate(mine)
                here = out["pruning"] == kind
                width = block.shape[1]
                groups = names[kind] if names[kind] and len(names[kind]) == width else [str(i) for i in range(width)]
                prefix = f"{what}.w:" if kind == "weights" else f"{what}."
                for i, g in enumerate(groups):
                    if here.all():
                        column = block[:, i].astype(np.float32 if what == "recipe" else np.int64)
                    else:
                        column = np.full(rows, np.nan, dtype=np.float32 if what == "recipe" else np.float64)
                        column[here] = block[:, i]
                    out[f"{prefix}{g}"] = column
        else:  # one array per row: an object column (pyarrow writes it as a list)
            cells = np.empty(rows, dtype=object)
            cells[:] = [np.asarray(v, dtype=np.float32 if what == "recipe" else p[what].dtype)
                        for p in parts for v in p[what]]
            out[what] = cells
    return out


_MATRICES = ("recipe", "keep")


def _names(group) -> list[str] | None:
    if group is None or "names" not in group:
        return None
    return [str(n.decode() if isinstance(n, bytes) else n) for n in group["names"][()]]


def require_pandas():
    try:
        import pandas
    except ModuleNotFoundError:
        raise NpsError("pandas is not installed: pip install 'nps[pandas]' (pandas and pyarrow)") from None
    return pandas


def load(path: str | os.PathLike, *, wide: bool = False):
    """One row per subnetwork of a results file as a pandas DataFrame (columns: the module docstring).

    Example::

        from nps.pipeline.results import load
        df = load("runs/demo/results.h5")
        done = df[df.status == "done"]
        print(done.groupby("space")["drop"].describe())
    """
    pd = require_pandas()
    return pd.DataFrame(columns(path, wide=wide))


def write_table(path: str | os.PathLike, out: str | os.PathLike, *, wide: bool | None = None) -> tuple[int, int]:
    """Write the table to ``out``: Parquet (``.parquet``, arrays as list columns unless ``wide``) or CSV (``.csv``,
    always wide: one column per group). Returns (rows, columns)."""
    out = os.fspath(out)
    kind = os.path.splitext(out)[1].lower()
    if kind not in (".parquet", ".csv"):
        raise NpsError(f"--out {out}: name a .parquet or .csv file")
    df = load(path, wide=True if kind == ".csv" else bool(wide))
    folder = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise NpsError(f"--out {out}: cannot make its directory ({exc.strerror or exc}); choose another place") \
            from None
    if kind == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ModuleNotFoundError:
            raise NpsError("Parquet needs pyarrow: pip install 'nps[pandas]', or write --out rows.csv") from None
    try:
        with atomic_path(out, mkdir=False) as tmp:
            if kind == ".csv":
                df.to_csv(tmp, index=False)
            else:
                df.to_parquet(tmp, index=False)
    except OSError as exc:  # a read-only, full or special filesystem: one line naming --out
        raise NpsError(environment_error(exc, out) or f"--out {out}: cannot write it ({exc.strerror or exc}); choose "
                       "another place") from None
    return int(df.shape[0]), int(df.shape[1])
