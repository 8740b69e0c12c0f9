"""tools/module_stats.py: per module of pipeline/, kernels/ and datasets/, the largest function and the widest
signature; with --over, every function over the size limits (the numbers the code-size reviews quote)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WIDE = "class Layer:\n    def __init__(self, a, b, c, d, e, f, g, h, *args, i=0, **kw):\n        pass\n"
LONG = "def long(x):\n" + "    x += 1\n" * 89 + "    return x\n"
NESTED = "def outer(a, b):\n    def inner(a, b, c):\n        return a\n    return inner\n"


def stats(root: Path, *flags: str) -> list[dict]:
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "module_stats.py"), str(root), *flags],
                         capture_output=True, text=True, check=True)
    return [json.loads(line) for line in run.stdout.splitlines()]


def test_every_folder_is_measured_and_the_functions_over_the_limits_are_named(tmp_path):
    for folder, text in (("pipeline/sub", WIDE + LONG), ("kernels", NESTED), ("datasets", "X = 1\n")):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "m.py").write_text(text)
    rows = {row.pop("module"): row for row in stats(tmp_path)}
    assert rows == {
        "pipeline/sub/m.py": {"lines": 94, "functions": 2, "largest_function": "long", "largest_lines": 91,
                              "widest_function": "Layer.__init__", "widest_params": 9},
        "kernels/m.py": {"lines": 4, "functions": 2, "largest_function": "outer", "largest_lines": 4,
                         "widest_function": "outer.inner", "widest_params": 3},
        "datasets/m.py": {"lines": 1, "functions": 0, "largest_function": "", "largest_lines": 0,
                          "widest_function": "", "widest_params": 0},
    }
    assert stats(tmp_path, "--over") == [
        {"module": "pipeline/sub/m.py", "function": "Layer.__init__", "lines": 2, "params": 9},
        {"module": "pipeline/sub/m.py", "function": "long", "lines": 91, "params": 1},
    ]
    assert stats(tmp_path, "--over", "--max-params", "2") == [
        {"module": "pipeline/sub/m.py", "function": "Layer.__init__", "lines": 2, "params": 9},
        {"module": "pipeline/sub/m.py", "function": "long", "lines": 91, "params": 1},
        {"module": "kernels/m.py", "function": "outer.inner", "lines": 2, "params": 3},
    ]


def test_a_root_without_the_folders_is_refused_in_one_line(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "module_stats.py"), str(tmp_path)],
                         capture_output=True, text=True)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip().splitlines() == [f"module_stats: no pipeline, kernels or datasets folder under "
                                               f"{tmp_path}; give a checkout's root"]
