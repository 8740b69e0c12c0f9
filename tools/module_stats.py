"""Per module of a checkout's pipeline/, kernels/ and datasets/: its lines, its largest function and its widest
signature, one JSON line each (for comparing a layout before and after a change: run it on both checkouts).

    python tools/module_stats.py [ROOT] [--min-lines N] [--dirs pipeline,kernels,datasets]
    {"module": "pipeline/training/fuse.py", "lines": 527, "functions": 36, "largest_function": "_Builder.conv",
     "largest_lines": 40, "widest_function": "_Builder.tensor", "widest_params": 5}

    python tools/module_stats.py [ROOT] --over [--max-lines 80] [--max-params 8]
    {"module": "...", "function": "...", "lines": 96, "params": 4}   (every function over either limit)

A function's lines run from its ``def`` to its last line (its docstring and nested functions included, decorators
not); its parameters are the named ones (positional-only, ordinary and keyword-only) less a method's ``self`` or
``cls``, ``*args`` and ``**kwargs`` not counted. Functions are named by their qualified name (``Class.method``,
``outer.inner``); a module without functions reports empty names and zeros.
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

DIRS = "pipeline,kernels,datasets"


def functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, lines, params) of every function in ``tree``, nested ones included, in source order."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            params = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs)
            if isinstance(tree, ast.ClassDef) and a.args and a.args[0].arg in ("self", "cls"):
                params -= 1
            yield prefix + node.name, node.end_lineno - node.lineno + 1, params
            yield from functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from functions(node, f"{prefix}{node.name}.")
        else:
            yield from functions(node, prefix)


def stats(path: Path) -> dict:
    text = path.read_text()
    found = list(functions(ast.parse(text)))
    largest = max(found, key=lambda f: f[1], default=("", 0, 0))
    widest = max(found, key=lambda f: f[2], default=("", 0, 0))
    return {"lines": len(text.splitlines()), "functions": len(found), "largest_function": largest[0],
            "largest_lines": largest[1], "widest_function": widest[0], "widest_params": widest[2]}


def over(path: Path, max_lines: int, max_params: int) -> list[dict]:
    """Every function of ``path`` longer than ``max_lines`` or with more than ``max_params`` parameters."""
    return [{"function": name, "lines": lines, "params": params}
            for name, lines, params in functions(ast.parse(path.read_text()))
            if lines > max_lines or params > max_params]


def modules(root: Path, dirs: str) -> list[Path]:
    """The modules under ``root``'s folders ``dirs`` (comma-separated; a folder a checkout lacks is skipped)."""
    folders = [root / d for d in dirs.split(",") if (root / d).is_dir()]
    if not folders:
        names = dirs.split(",")
        listed = ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
        print(f"module_stats: no {listed} folder under {root}; give a checkout's root", file=sys.stderr)
        sys.exit(2)
    return [path for folder in folders for path in sorted(folder.rglob("*.py"))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", nargs="?", default=".")
    ap.add_argument("--dirs", default=DIRS, help=f"comma-separated folders under ROOT (default {DIRS})")
    ap.add_argument("--min-lines", type=int, default=0, help="only modules of at least this many lines")
    ap.add_argument("--over", action="store_true", help="list the functions over --max-lines or --max-params")
    ap.add_argument("--max-lines", type=int, default=80)
    ap.add_argument("--max-params", type=int, default=8)
    args = ap.parse_args()
    root = Path(args.root)
    for path in modules(root, args.dirs):
        module = str(path.relative_to(root))
        if args.over:
            for row in over(path, args.max_lines, args.max_params):
                print(json.dumps({"module": module, **row}))
            continue
        row = stats(path)
        if row["lines"] >= args.min_lines:
            print(json.dumps({"module": module, **row}))


if __name__ == "__main__":
    main()
