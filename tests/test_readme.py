"""The README's "Prune your own network" example, run as written."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def _section() -> str:
    text = README.read_text()
    start = text.index("### Prune your own network")
    return text[start:text.index("\n## ", start)]


def test_prune_your_own_network_example(tmp_path):
    section = _section()
    code = re.search(r"```python\n(# my_net\.py\n.*?)```", section, re.S).group(1)
    command = re.search(r"```sh\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    (tmp_path / "my_net.py").write_text(code)
    words = shlex.split(command)
    assert words[0] == "PYTHONPATH=." and words[1] == "nps"
    nps = Path(sys.executable).with_name("nps")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    done = subprocess.run([str(nps), *words[2:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    with h5py.File(tmp_path / "my_net.h5", "r") as f:
        names = [n.decode() if isinstance(n, bytes) else n for n in f["layers/names"][()]]
        assert names == re.findall(r"\(`([\w.+]+)`, \d+ channels", section)
        assert f["layers/channels"][()].tolist() == [int(c) for c in re.findall(r"`, (\d+) channels", section)]
        keep = f["spaces/std-0.05@c_flops=0.5/keep"][()]
        assert keep.shape == (100, len(names)) and np.all(np.abs(f["spaces/std-0.05@c_flops=0.5/c_flops"][()] -
                                                                   0.5) <= 0.002 + 1e-6)
