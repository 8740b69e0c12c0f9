"""Every command the README shows, run as written (issue 23).

- the command table: each of its commands runs (a tiny `nps run` of the `demo` preset on the embedded data, then
  `status`, `report`, `export --verify` on what it wrote; `convert`, `presets`, `run --print-config`), exits 0 and
  prints its main line; the table lists exactly the CLI's commands, so a new command without a row, or a row
  without a test here, fails;
- every shell example: the `nps sample` examples (with a small `-n`: the README's 1,000 recipes of ResNet-50 are
  only slower, not different) and the "Prune your own network" example (its module, its command and the group
  table the text describes);
- the set-up commands: the Makefile has the targets the README's first block names, and `.ci/run` calls
  `make test`.

Commands run in-process (``nps.pipeline.cli.main``) where they need no separate process; the example that puts
the user's module on ``PYTHONPATH`` runs `nps` as a subprocess, as a user would.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from nps.pipeline.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEXT = README.read_text()


def sh_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", TEXT, re.S)


def commands_in(block: str) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, comments dropped."""
    joined = block.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            out.append(shlex.split(line))
    return out


def table_commands() -> dict[str, str]:
    """The README's command table: subcommand -> its usage as the table writes it."""
    start = TEXT.index("## Commands")
    rows = re.findall(r"^\| `(nps [^`]+)` \|", TEXT[start:TEXT.index("\n## ", start + 1)], re.M)
    return {row.split()[1]: row for row in rows}


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """rich wraps at 80 columns when stdout is not a terminal: long paths would split the lines checked here."""
    monkeypatch.setenv("COLUMNS", "250")


def nps(capsys, *args) -> str:
    """``nps ARGS`` in-process; asserts exit status 0 and returns stdout."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 0, f"nps {' '.join(map(str, args))} exited {code}: {err}"
    return out


def test_the_table_lists_every_command_and_nothing_else():
    assert set(table_commands()) == set(COMMANDS) == set(TESTED)


def test_setup_commands_exist():
    first = commands_in(sh_blocks()[0])
    assert first == [["make", "demo"], ["make", "test"]]
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test", "test-fast", "test-slow"):
        assert re.search(rf"^{target}:", makefile, re.M), target
    assert re.search(r"^make test\b", (ROOT / ".ci/run").read_text(), re.M)


def test_presets(capsys):
    from nps.pipeline.experiment.config import preset_names

    assert table_commands()["presets"] == "nps presets"
    out = nps(capsys, "presets")
    for name in preset_names():
        assert re.search(rf"^{re.escape(name)}\n    .+\n    \S+, \d+ spaces, \d+ subnetworks, dataset \S+$", out, re.M)
    # the table's description names every preset
    row = TEXT[TEXT.index("| `nps presets` |"):].splitlines()[0]
    for name in preset_names():
        assert f"`{name}`" in row, name
    assert re.search(r"^demo\n.*\n    resnet20, 4 spaces, 13 subnetworks, dataset data/fashion-mnist$", out, re.M)


def test_convert_as_written(capsys, tmp_path, fmnist_source):
    usage = table_commands()["convert"].split()
    assert usage[:3] == ["nps", "convert", "KIND"] and "--src" in usage and "--out" in usage
    out = nps(capsys, "convert", "fashion-mnist", "--src", fmnist_source, "--out", tmp_path / "fm", "--limit", 500)
    assert re.search(r"^wrote .*fm: train\.beton 500, val\.beton 500 images \(10 classes, 28x28", out, re.M)
    out = nps(capsys, "convert", "--verify", tmp_path / "fm")
    assert ": ok (train 500, val 500 images" in out


@pytest.mark.parametrize("index", [0, 1])
def test_sample_examples(capsys, tmp_path, monkeypatch, index):
    examples = [c for block in sh_blocks() for c in commands_in(block) if c[:2] == ["nps", "sample"]
                and not any(w.startswith("my_net") for w in c) and "--c-flops" in c]  # --c-latency: in
    # test_latency_model.py, after the latency-model command of its block
    assert len(examples) == 2
    words = examples[index][1:]
    words[words.index("-n") + 1] = "20"  # the README asks for 1,000: the same code, slower
    monkeypatch.chdir(tmp_path)
    out = nps(capsys, *words)
    target = words[words.index("--out") + 1]
    assert f"wrote {target}" in out
    space, value = words[words.index("--space") + 1], float(words[words.index("--c-flops") + 1])
    with h5py.File(tmp_path / target, "r") as f:
        c = f[f"spaces/{space}@c_flops={value:g}/c_flops"][()]
        assert c.shape == (20,) and np.all(np.abs(c - value) <= 0.002 + 1e-6)


# --------------------------------------------------------------------------------------------------------------------
# The session's tiny run of the demo preset (conftest.demo_run), read by run / status / report / export.


TESTED = {"convert", "sample", "run", "status", "presets", "report", "export",
          "latency", "table",  # these two run as written in test_onnx.py (the README's "Latency, tables and ONNX")
          "latency-model"}  # as written in test_latency_model.py (the README's "Latency regimes")


@pytest.mark.fmnist
def test_run_status_report_export(capsys, demo_run):
    usage = table_commands()["run"].split()
    assert usage[:3] == ["nps", "run", "EXPERIMENT"] and "[--out" in usage
    printed = nps(capsys, "run", "demo", "--print-config")
    assert printed.startswith("[experiment]") and 'name = "demo"' in printed and "[[spaces]]" in printed

    out_dir, code, printed, argv = demo_run  # `nps run demo --out DIR` with --set sizes
    assert argv[:4] == ["run", "demo", "--out", str(out_dir)]
    assert code == 0, printed
    assert re.search(r"^finished in \d+s: 4 done, 0 failed; nps status .*results\.h5$", printed, re.M)
    results = out_dir / "results.h5"

    assert table_commands()["status"] == "nps status FILE"
    printed = nps(capsys, "status", results)
    assert re.search(r"^complete: 4 done, 0 failed of 4 subnetworks", printed, re.M)

    assert table_commands()["report"] == "nps report RESULTS.h5 --out DIR"
    printed = nps(capsys, "report", results, "--out", out_dir / "report")
    assert re.search(r"^wrote .*report/index\.html \(\d+ figures\) and summary\.json$", printed, re.M)
    assert (out_dir / "report" / "summary.json").is_file()

    usage = table_commands()["export"]
    assert usage == "nps export RESULTS.h5 --space S --best --out F.pt"
    printed = nps(capsys, "export", results, "--space", "std-0.05", "--best", "--out", out_dir / "winner.pt",
                  "--verify")
    assert re.search(r"^wrote .*winner\.pt: resnet20 ", printed, re.M)
    assert re.search(r"^verified: top-1 .* \(\+0 images\)$", printed, re.M)


# --------------------------------------------------------------------------------------------------------------------
# "Prune your own network".


def _own_network_section() -> str:
    start = TEXT.index("### Prune your own network")
    return TEXT[start:TEXT.index("\n## ", start)]


@pytest.mark.e2e
def test_prune_your_own_network_example(tmp_path):
    section = _own_network_section()
    code = re.search(r"```python\n(# my_net\.py\n.*?)```", section, re.S).group(1)
    (command,) = commands_in(re.search(r"```sh\n(.*?)```", section, re.S).group(1))
    (tmp_path / "my_net.py").write_text(code)
    assert command[0] == "PYTHONPATH=." and command[1] == "nps"
    nps_bin = Path(sys.executable).with_name("nps")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    done = subprocess.run([str(nps_bin), *command[2:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    with h5py.File(tmp_path / "my_net.h5", "r") as f:
        names = [n.decode() if isinstance(n, bytes) else n for n in f["layers/names"][()]]
        assert names == re.findall(r"\(`([\w.+]+)`, \d+ channels", section)
        assert f["layers/channels"][()].tolist() == [int(c) for c in re.findall(r"`, (\d+) channels", section)]
        keep = f["spaces/std-0.05@c_flops=0.5/keep"][()]
        assert keep.shape == (100, len(names)) and np.all(np.abs(f["spaces/std-0.05@c_flops=0.5/c_flops"][()] -
                                                                   0.5) <= 0.002 + 1e-6)
