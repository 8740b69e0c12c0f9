"""The run an export (or a results file) came from: its stored experiment config, read as TOML, and the converted
dataset it was scored on (found from the config, or given, and checked by fingerprint)."""
from __future__ import annotations

import os
from pathlib import Path

from nps.pipeline.errors import NpsError


def parse_config(text: str, where: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(text or "")
    except tomllib.TOMLDecodeError as error:
        raise NpsError(f"{where}: the stored config is not valid TOML ({error}); pass --data DIR") from None


def dataset_dir(ckpt: dict, data_dir: str | os.PathLike | None = None) -> Path:
    """The converted dataset the run used: ``data_dir`` if given, else the config's ``[dataset] dir``.

    A relative ``dir`` is looked up from the current directory, then from the results file's directory.
    """
    if data_dir is not None:
        path = Path(data_dir)
        if not path.is_dir():
            raise NpsError(f"--data {path}: no such directory (a dataset converted with nps convert)")
        return path
    cfg = parse_config(ckpt.get("config", ""), "export")
    entry = cfg.get("dataset", {}).get("dir") if isinstance(cfg.get("dataset"), dict) else None
    if not entry:
        raise NpsError("the export's config has no [dataset] dir; pass --data DIR (the directory written by "
                       "nps convert for the run's dataset)")
    candidates = [Path(entry)]
    if not Path(entry).is_absolute() and ckpt.get("results"):
        candidates.append(Path(ckpt["results"]).parent / entry)
    for path in candidates:
        if path.is_dir():
            return path
    raise NpsError(f"the run's dataset dir {entry!r} is not here (tried {', '.join(map(str, candidates))}); "
                   "pass --data DIR")


def check_dataset_of(ckpt: dict, data: Path, *, given: bool) -> None:
    """``data`` must be the dataset the subnetwork was scored on: its fingerprint (when the export has it), its
    classes and its image shape (the network's resolution, for images stored at their size)."""
    from nps.datasets.errors import DatasetError
    from nps.datasets.meta import load_meta, same_dataset_problem

    where = f"--data {data}" if given else f"the run's dataset {data}"
    try:
        meta = load_meta(data)
    except DatasetError as exc:
        raise NpsError(f"{where}: {exc}") from None
    problem = same_dataset_problem(meta, str(ckpt.get("dataset_fingerprint", "")),
                                   num_classes=ckpt.get("dataset_num_classes") or None,
                                   image_shape=ckpt.get("dataset_image_shape") or None)
    if problem:
        raise NpsError(f"{where} is not the dataset this subnetwork was scored on ({problem}); pass the run's "
                       "dataset with --data")


def config_section(cfg: dict, name: str) -> dict:
    section = cfg.get(name)
    return section if isinstance(section, dict) else {}
