"""The layout shows the layers: imports point down only, and no module imports itself back through others.

Every ``import``/``from ... import`` of every module counts, also those inside functions (a cycle through a
function-level import is still a cycle). The layers of ``nps.pipeline``, from the bottom: its leaves (errors, the
row status), the network and its pruning, training, the results file and its analysis, the experiment's plan, the
run, the views, the commands, the CLI. ``nps.kernels`` imports only numpy, numba and itself; ``nps.datasets`` never
imports ``nps.pipeline``.
"""
from __future__ import annotations

import ast
import gc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"nps.pipeline": ROOT / "pipeline", "nps.kernels": ROOT / "kernels", "nps.datasets": ROOT / "datasets"}
LAYERS = ["errors", "row_status", "network", "training", "results", "deploy", "experiment", "run", "views", "commands",
          "cli"]
LEAVES = {"errors": 0, "row_status": 0, "catalog": 0, "words": 0, "files": 0}  # the same layer: none imports another


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


KNOWN = modules()


def parse(path: Path) -> ast.Module:
    """The module's tree, parsed with the garbage collector off.

    CPython 3.11 keeps one AST-construction depth per interpreter: a collection during the parse runs finalizers
    (numba's dispatchers, from earlier tests in this worker), those can hand the GIL to another thread that builds a
    tree too, and the parse then fails with "AST constructor recursion depth mismatch" (CI, 3.11.7; CPython gh-106905).
    With collection off the C constructor runs no Python code, so no other thread can interleave.
    """
    text = path.read_text()
    enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(text)
    finally:
        if enabled:
            gc.enable()


def imports(path: Path, name: str) -> set[str]:
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base
                                                                                                   else []))
            # `from package import module` imports the module; `from module import name` the module
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in KNOWN else base for alias in node.names)
    return found


def resolve(target: str, known: dict[str, Path]) -> str | None:
    """The module of ours an imported name belongs to (the longest known prefix), else None."""
    while target:
        if target in known:
            return target
        target = target.rsplit(".", 1)[0] if "." in target else ""
    return None


def layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[:2] != ["nps", "pipeline"] or len(parts) < 3:
        return None  # nps.pipeline itself (its lazy public names) and the other packages
    head = parts[2]
    if head in LEAVES:
        return LEAVES[head]
    return LAYERS.index(head) if head in LAYERS else None


def graph() -> dict[str, set[str]]:
    known = modules()
    edges = {}
    for name, path in known.items():
        targets = {resolve(t, known) for t in imports(path, name)}
        edges[name] = {t for t in targets if t is not None and t != name}
    return edges


def test_every_module_has_a_layer():
    unplaced = [m for m in modules() if m.startswith("nps.pipeline.") and layer(m) is None]
    assert unplaced == []


def test_imports_point_down_only():
    wrong = []
    for module, targets in graph().items():
        here = layer(module)
        if here is None:
            continue
        for target in targets:
            there = layer(target)
            if there is not None and there > here:
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert cycles == []


def test_kernels_and_datasets_stay_below_the_pipeline():
    known = modules()
    for name, path in known.items():
        raw = imports(path, name)
        if name.startswith("nps.kernels"):
            assert {t.split(".")[0] for t in raw} <= {"__future__", "nps", "numpy", "numba", "os", "re", "math",
                                                      "time", "logging", "dataclasses", "typing", "zlib"}, name
            assert not any(t.startswith(("nps.pipeline", "nps.datasets")) for t in raw), name
        if name.startswith("nps.datasets"):
            assert not any(t.startswith("nps.pipeline") for t in raw), name


def test_results_imports_no_torch_and_nothing_that_runs_networks():
    """results/ (the file, its reader and writer, the analysis, the report, the table) is below the tools that load
    and run networks (deploy/): nothing it imports, at any depth and also inside functions, is torch."""
    known = modules()
    edges = graph()
    reached: dict[str, list[str]] = {}
    for start in (m for m in known if m.startswith("nps.pipeline.results")):
        todo, seen = [start], {start}
        while todo:
            node = todo.pop()
            for target in edges.get(node, ()):
                # nps.pipeline itself is entered for __version__; its lazy public names (load_subnetwork...) are
                # functions that import on first use, not imports of the module that reads __version__
                if target not in seen and target != "nps.pipeline":
                    seen.add(target)
                    todo.append(target)
        reached[start] = sorted(seen)
    offenders = sorted({f"{start} -> ... -> {m} imports torch" for start, mods in reached.items() for m in mods
                        if any(t.split(".")[0] in ("torch", "torchvision") for t in imports(known[m], m))})
    assert offenders == []
    assert not any(m.startswith("nps.pipeline.deploy") for mods in reached.values() for m in mods)


def test_the_parse_survives_finalizers_and_a_thread_that_parses_too():
    """CI's failure, reproduced: a thread parsing beside us and finalizers run by a collection inside our parse.

    Unguarded, most parses of this loop fail on CPython 3.11 ("AST constructor recursion depth mismatch").
    """
    import threading
    import weakref

    path = ROOT / "pipeline" / "run" / "driver.py"
    text = path.read_text()
    stop = threading.Event()

    def other() -> None:
        while not stop.is_set():
            try:
                ast.parse(text)
            except SystemError:
                pass

    def finalizer() -> None:
        sum(range(200))  # Python code: the interpreter may switch threads here

    class Node:
        pass

    thread = threading.Thread(target=other, daemon=True)
    thread.start()
    failures = 0
    try:
        for _ in range(40):
            for _ in range(200):
                a, b = Node(), Node()
                a.other, b.other = b, a  # a cycle: only a collection frees it
                weakref.finalize(a, finalizer)
                del a, b
            try:
                parse(path)
            except SystemError:
                failures += 1
    finally:
        stop.set()
        thread.join()
    gc.collect()
    assert failures == 0
