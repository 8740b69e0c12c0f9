"""Fixtures and markers shared by the test modules.

- ``@pytest.mark.fmnist``: the test needs Debian's Fashion-MNIST (``dataset-fashion-mnist``, what ``make setup``
  installs: the embedded default dataset). Without it the test is skipped, except under CI (``NPS_CI=1``, set by
  ``.ci/run``), where it fails: a CI run must never pass by skipping the run tests.
- ``fmnist_source``: the directory of those files (same rule); ``fmnist_dir(limit)``: a converted subset, converted
  once per size per session; ``base_checkpoint``: an untrained ResNet-20 for that data.
- ``demo_run``: the README's `nps run demo`, made tiny with ``--set`` (the same preset on 256 converted images),
  run once per session in-process: the end-to-end run that the README, fault and export tests read.
- ``stand_in_table`` and ``make_rows``: a layer-table stand-in and recipe rows for tests of the store and the ledger
  (plain helpers live in ``tests/helpers.py``).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import StandInTable, rows_for_store

torch.set_num_threads(1)  # tests run single-threaded unless they say otherwise (2 cores, shared)

FMNIST = Path(os.environ.get("NPS_TEST_FMNIST", "/usr/share/datasets/fashion-mnist"))  # Debian's copy
CI = os.environ.get("NPS_CI", "") not in ("", "0")


def fmnist_installed() -> bool:
    return (FMNIST / "train-images-idx3-ubyte.gz").is_file()


def require_fmnist() -> Path:
    """The Fashion-MNIST directory; skips the test without it, or fails it under CI."""
    if fmnist_installed():
        return FMNIST
    message = f"Debian dataset-fashion-mnist not installed ({FMNIST}); make setup installs it"
    if CI:
        pytest.fail(f"NPS_CI is set and the embedded dataset is missing: {message}", pytrace=False)
    pytest.skip(message)


# Fixtures that make a test end to end: they convert the embedded dataset or train on it.
E2E_FIXTURES = {"demo_run", "fmnist_dir", "fmnist_source"}


def pytest_configure(config):
    config.addinivalue_line("markers", "fmnist: needs Debian's Fashion-MNIST (skipped without it, failed under CI)")
    config.addinivalue_line("markers", "ray: starts a Ray cluster on loopback (in its own network namespace)")
    config.addinivalue_line("markers", "e2e: trains on the embedded dataset, or runs nps or pytest in another process "
                                       "(left out by make test-fast)")


def pytest_collection_modifyitems(config, items):
    """Every test that needs the embedded dataset or a Ray cluster is end to end (`e2e`)."""
    for item in items:
        if (item.get_closest_marker("fmnist") or item.get_closest_marker("ray")
                or E2E_FIXTURES & set(getattr(item, "fixturenames", ()))):
            item.add_marker(pytest.mark.e2e)


def pytest_runtest_setup(item):
    if item.get_closest_marker("fmnist") is not None:
        require_fmnist()


@pytest.fixture(scope="session")
def fmnist_source() -> Path:
    return require_fmnist()


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory, fmnist_source):
    """``fmnist_dir(limit)``: Fashion-MNIST's first ``limit`` images of each split, converted once per session."""
    from nps.datasets.convert import convert_dataset

    made: dict[int, Path] = {}

    def convert(limit: int) -> Path:
        if limit not in made:
            out = tmp_path_factory.mktemp("fmnist") / f"fm{limit}"
            convert_dataset("fashion-mnist", out, limit=limit, workers=1)
            made[limit] = out
        return made[limit]

    return convert


@pytest.fixture(scope="session")
def base_checkpoint(tmp_path_factory):
    """An untrained ResNet-20 for 1-channel 10-class input: tests of the run need weights, not accuracy."""
    from nps.pipeline.network.models import build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "resnet20-fm.pt"
    torch.save(build_model("resnet20", num_classes=10, in_channels=1).state_dict(), path)
    return path


@pytest.fixture
def stand_in_table():
    return StandInTable()


@pytest.fixture
def make_rows():
    """``make_rows(n, seed=0)``: recipe rows (every field a results file needs) for a space of n subnetworks."""
    return rows_for_store


DEMO_SETTINGS = ("dataset.train_images=128", "dataset.val_images=128", "base.epochs=1", "base.bn_images=0",
                 "spaces.n=1", "retrain.epochs=1", "retrain.bn_images=32", "retrain.batch_size=32",
                 "base.batch_size=32")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, fmnist_dir):
    """``(out_dir, exit status, stdout, argv)`` of ``nps run demo --out DIR`` on Fashion-MNIST's first 256 images."""
    import contextlib
    import io

    from nps.pipeline.cli import main

    out = tmp_path_factory.mktemp("demo") / "demo"
    argv = ["run", "demo", "--out", str(out), "--devices", "cpu", "--set", f"dataset.dir={fmnist_dir(256)}"]
    for setting in DEMO_SETTINGS:
        argv += ["--set", setting]
    stdout = io.StringIO()
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "250"  # rich wraps at 80 columns off a terminal
    try:
        with contextlib.redirect_stdout(stdout):
            code = main(argv)
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous
    return out, code, stdout.getvalue(), argv


@pytest.fixture
def in_process(monkeypatch):
    """Networks timed in the test's own process, not each in a forked child (pipeline/deploy/isolation.py): for
    tests whose stand-in timers count or record their calls, which a child's copy would do out of the test's sight."""
    from nps.pipeline.deploy import isolation

    monkeypatch.setattr(isolation, "isolation", lambda device: isolation.IN_PROCESS)
