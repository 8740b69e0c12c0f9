"""results/ is below the tools that run networks: `nps status`, `nps report` and `nps table` read a results file,
analyse it and draw it on a machine with the results file and the analysis stack only: torch cannot be imported
there (issue 28, item 3)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data" / "results-format1.h5"  # a file with filter and weight spaces and latency
BLOCK = '''import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "timm"):
            raise ImportError(name + " is not installed on this machine")
sys.meta_path.insert(0, _NoTorch())
'''


@pytest.fixture(scope="module")
def no_torch(tmp_path_factory):
    root = tmp_path_factory.mktemp("no_torch")
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(BLOCK)
    shutil.copy(DATA, root / "results.h5")
    return root


def _nps(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(root / "site"), "PATH": "/usr/bin:/bin", "HOME": str(root), "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-m", "nps.pipeline.cli", *args], capture_output=True, text=True,
                          env=env, cwd=root, timeout=300)


def test_the_blocker_blocks_torch(no_torch):
    out = _nps(no_torch, "export", str(no_torch / "results.h5"), "--space", "std-0.05", "--best", "--out", "w.pt")
    assert out.returncode != 0 and "torch is not installed" in out.stderr  # export runs a network: it needs torch


@pytest.mark.parametrize("command", [["status"], ["report", "--out", "report", "--bootstrap", "50"],
                                     ["table", "--out", "rows.csv"]])
def test_reading_commands_need_no_torch(no_torch, command):
    out = _nps(no_torch, command[0], str(no_torch / "results.h5"), *command[1:])
    assert out.returncode == 0, out.stderr
    if command[0] == "report":
        assert (no_torch / "report" / "index.html").is_file() and any((no_torch / "report").glob("regime_*.png"))
    if command[0] == "table":
        assert (no_torch / "rows.csv").read_text().count("\n") > 5
