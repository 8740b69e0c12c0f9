"""The shared markers of tests/conftest.py: without the embedded dataset a test that needs it is skipped, except
under CI (NPS_CI=1, set by .ci/run), where it fails."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


@pytest.mark.e2e
@pytest.mark.parametrize("ci, outcome", [("", "1 skipped"), ("1", "1 error")])
def test_a_missing_dataset_skips_locally_and_fails_under_ci(tmp_path, ci, outcome):
    (tmp_path / "test_needs_data.py").write_text(
        "import pytest\n\n@pytest.mark.fmnist\ndef test_run_on_the_embedded_dataset():\n    assert True\n")
    env = {**os.environ, "NPS_CI": ci, "NPS_TEST_FMNIST": str(tmp_path / "absent"),
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                          "-o", "addopts=", "--rootdir", str(tmp_path), str(tmp_path / "test_needs_data.py")],
                         capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert outcome in out.stdout, out.stdout + out.stderr
    assert (out.returncode != 0) == bool(ci)
    if ci:
        assert "NPS_CI is set and the embedded dataset is missing" in out.stdout
