"""Per module of a checkout's pipeline/: its lines, its largest function and its widest signature, one JSON line
each (for comparing a layout before and after a change: run it on both checkouts).

    python tools/module_stats.py [ROOT] [--min-lines N]
"""
from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path


def stats(path: Path) -> dict:
    text = path.read_text()
    tree = ast.parse(text)
    largest, widest = ("", 0), ("", 0)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            size = node.end_lineno - node.lineno + 1
            a = node.args
            params = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) - (1 if a.args and a.args[0].arg in
                                                                               ("self", "cls") else 0)
            if size > largest[1]:
                largest = (node.name, size)
            if params > widest[1]:
                widest = (node.name, params)
    return {"lines": len(text.splitlines()), "largest_function": largest[0], "largest_lines": largest[1],
            "widest_function": widest[0], "widest_params": widest[1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", nargs="?", default=".")
    ap.add_argument("--min-lines", type=int, default=0)
    args = ap.parse_args()
    base = Path(args.root) / "pipeline"
    for path in sorted(base.rglob("*.py")):
        row = stats(path)
        if row["lines"] >= args.min_lines:
            print(json.dumps({"module": str(path.relative_to(base)), **row}))


if __name__ == "__main__":
    main()
