"""The experiment as TOML text (a small emitter: flat tables and one array of tables; no dependency), and two
experiments compared key by key (what a resume refuses)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from nps.pipeline.experiment.config import RUNTIME_KEYS, SECTIONS, Config


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        text = repr(value)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _table_lines(obj, comments: bool, prefix: str = "") -> list[str]:
    lines = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):  # a sub-table of an array element: dotted keys
            lines += _table_lines(value, comments, f"{prefix}{f.name}.")
            continue
        if isinstance(value, list):
            if not value:
                continue  # an unset target
            value = value[0] if len(value) == 1 else value
        line = f"{prefix}{f.name} = {_toml_value(value)}"
        if comments and f.metadata.get("help"):
            line = f"{line:<34} # {f.metadata['help']}"
        lines.append(line)
    return lines


def dump(cfg: Config, *, comments: bool = False) -> str:
    """The experiment as TOML text; ``load``-ing it gives back an equal :class:`Config`."""
    out: list[str] = []
    for section in SECTIONS:
        value = getattr(cfg, section)
        if section in ("spaces", "references"):
            for item in value:
                out += [f"[[{section}]]", *_table_lines(item, comments), ""]
        else:
            out += [f"[{section}]", *_table_lines(value, comments), ""]
    return "\n".join(out)


def flatten(cfg: Config) -> dict[str, Any]:
    """``{"retrain.epochs": 50, "spaces[0].n": 100, ...}``: for comparing two experiments key by key."""
    flat = {}
    for section in SECTIONS:
        value = getattr(cfg, section)
        if section in ("spaces", "references"):
            flat[f"{section}.count"] = len(value)
            items = [(f"{section}[{i}]", s) for i, s in enumerate(value)]
        else:
            items = [(section, value)]
        for prefix, obj in items:
            for key, v in dataclasses.asdict(obj).items():
                flat[f"{prefix}.{key}"] = v
    return flat


def differing_keys(a: Config, b: Config, *, ignore=RUNTIME_KEYS) -> list[tuple[str, Any, Any]]:
    """``(key, value in a, value in b)`` for every key that differs (runtime-only keys ignored)."""
    fa, fb = flatten(a), flatten(b)
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb), key=lambda k: (k not in fa, k))
            if k not in ignore and fa.get(k) != fb.get(k)]
