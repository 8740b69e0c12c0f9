"""An instant CLI: parsing arguments, `nps presets` and `nps status` import neither torch nor torchvision nor numba
(issue 19; tools/bench_cli.py measures the seconds). Each case runs in a fresh interpreter, as a user's command
does, and lists the heavy modules it imported."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nps.pipeline.cli import COMMANDS

HEAVY = ("torch", "torchvision", "numba")

PROBE = """
import json, sys
from nps.pipeline.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & set(%r))))
""" % (HEAVY,)


def heavy_imports(*args) -> list[str]:
    done = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True,
                          timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [["--help"], ["--version"], *[[c, "--help"] for c in COMMANDS]],
                         ids=lambda a: " ".join(a))
@pytest.mark.e2e
def test_help_imports_nothing_heavy(args):
    assert heavy_imports(*args) == []


@pytest.mark.e2e
def test_presets_and_status_import_nothing_heavy(tmp_path):
    assert heavy_imports("presets") == []
    from helpers import StandInTable, rows_for_store

    from nps.pipeline.results.store import ResultsStore
    from nps.pipeline.row_status import Result

    store = ResultsStore.create(tmp_path / "r.h5", StandInTable(), "[experiment]\nname = 'x'\n", {"base_top1": 90.0})
    store.add_space("std-0.05@c_flops=0.25", rows_for_store(5), epochs=1)
    store.record("std-0.05@c_flops=0.25", [0], [Result.done(top1=80.0, top5=99.0, loss=0.5)])
    store.close()
    assert heavy_imports("status", tmp_path / "r.h5") == []
