"""`nps run` end to end on a compact ConvNet (MobileNetV2: depthwise convs, inverted residuals, multiples of 8
channels): base training, sampling, pruning, cohort fine-tuning, report, and an export that verifies exactly."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

pytestmark = pytest.mark.fmnist  # conftest: skipped without the Debian files, failed under CI
NPS = str(Path(sys.executable).with_name("nps"))


@pytest.fixture(scope="module")
def data_dir(fmnist_dir):
    """Fashion-MNIST, first 256 images of each split (converted once per session)."""
    return fmnist_dir(256)


def nps(*args, cwd):
    done = subprocess.run([NPS, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def test_mobilenet_run_report_and_exact_export(tmp_path, data_dir):
    toml = tmp_path / "mobilenet.toml"
    toml.write_text(f"""
[experiment]
name = "tiny-mobilenet"
seed = 3
out = "{tmp_path / 'run'}"
devices = "cpu"

[dataset]
dir = "{data_dir}"
augment = false

[model]
name = "mobilenet_v2"
channel_multiple = 8

[base]
epochs = 1
batch_size = 64
lr = 0.05
warmup_epochs = 0

[[spaces]]
name = "std-0.05"
c_flops = 0.3
n = 2

[retrain]
epochs = 1
lr = 0.01
batch_size = 64
cohort_size = 2
bn_images = 64

[output]
keep_weights = "all"
""")
    nps("run", toml, "--plain", cwd=tmp_path)
    results = tmp_path / "run" / "results.h5"
    with h5py.File(results, "r") as f:
        g = f["spaces/std-0.05@c_flops=0.3"]
        assert np.all(g["status"][()] == 2) and np.all(np.isfinite(g["top1"][()]))
        assert np.all(g["keep"][()] % f["layers/granularity"][()] == 0)
        assert f["layers"].attrs["model"] == "mobilenet_v2" and int(f["layers"].attrs["channel_multiple"]) == 8
    nps("report", results, "--out", tmp_path / "report", cwd=tmp_path)
    assert (tmp_path / "report" / "index.html").is_file()
    out = nps("export", results, "--space", "std-0.05", "--best", "--out", tmp_path / "best.pt", "--verify",
              cwd=tmp_path)
    assert "(+0 images)" in out.replace("\n", " ")
