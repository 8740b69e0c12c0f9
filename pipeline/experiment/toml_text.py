"""The experiment as TOML text (flat tables and arrays of tables, with the keys' help as comments for
``--print-config``; values written by tomli-w), and two experiments compared key by key (what a resume refuses)."""
from __future__ import annotations

import dataclasses
from typing import Any

from nps.pipeline.experiment.config import RUNTIME_KEYS, SECTIONS, Config


def toml_value(value: Any) -> str:
    """One value as inline TOML, by tomli-w (strings escaped, floats exact, nan and inf as TOML spells them); a list
    on one line, which tomli-w would spread over several."""
    import tomli_w

    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return tomli_w.dumps({"v": value}).partition("=")[2].strip()


def toml_lines(values: dict[str, Any]) -> str:
    """``key = value`` lines of a flat table (``None`` values left out)."""
    return "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items() if v is not None)


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
        line = f"{prefix}{f.name} = {toml_value(value)}"
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
