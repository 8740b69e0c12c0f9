"""Wording shared by the lines nps prints (no rich here: library code that words a note imports it too)."""
from __future__ import annotations


def plural(n: int, noun: str) -> str:
    """``"1 recipe"``, ``"3 recipes"``: a count and its noun, in the singular for one."""
    return f"{n} {noun if n == 1 else noun + 's'}"
