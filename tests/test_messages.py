"""What nps prints says what happens (issue 27): the amp help, a run from a checkpoint, the [[spaces]] name help,
`nps --help`, `nps table --help`, counts in the singular, one median in the run's last table and `nps status`, the
refusal to add spaces to a run's file, and batch logs (stdout not a terminal) with no line wrapped or cut."""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from helpers import StandInTable, cpu_experiment_head
from helpers import rows_for_store as rows

from nps.pipeline.cli import build_parser, main
from nps.pipeline.experiment.config import Config, load_config
from nps.pipeline.experiment.toml_text import dump
from nps.pipeline.results.store import ResultsStore
from nps.pipeline.row_status import Result

BOX = "┏┃┡│└"  # the first character of every line of a rich table


def nps(argv) -> tuple[int, str, str]:
    """``nps ARGV`` in this process, stdout and stderr captured (not a terminal), no COLUMNS: a batch job's view."""
    os.environ.pop("COLUMNS", None)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line[:1] in BOX]


def assert_whole(text: str) -> None:
    """No line of a log is wrapped or cut: nothing elided, and every line of a table as wide as the others."""
    assert "…" not in text
    lines = table_lines(text)
    assert lines and len({len(line) for line in lines}) == 1, lines


# --------------------------------------------------------------------------------------------------------------------
# Help texts.


def print_config_comment(key: str) -> list[str]:
    code, out, _ = nps(["run", "demo", "--print-config"])
    assert code == 0
    return [line.split("#", 1)[1].strip() for line in out.splitlines() if line.startswith(f"{key} = ")]


def test_amp_auto_help_says_what_auto_resolves_to(monkeypatch):
    import torch

    from nps.pipeline.network.models import build_model
    from nps.pipeline.training import devices

    comments = print_config_comment("amp")
    assert len(comments) == 2 and comments[0] == comments[1]  # [base] and [retrain]
    text = comments[0]
    assert "off on CPU" not in text
    # what resolve_amp does on a CPU with native bf16, and the help says it
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    cpu = torch.device("cpu")
    assert devices.resolve_amp("auto", cpu, [build_model("resnet20", num_classes=10)]) == torch.bfloat16
    assert devices.resolve_amp("auto", cpu, [build_model("mobilenet_v2", num_classes=10)]) is None
    assert "AVX512-BF16" in text and "bf16 unless the network has depthwise convs" in text
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    assert devices.resolve_amp("auto", cpu) is None and "other CPUs: off" in text


def test_space_name_help_names_the_weight_spaces():
    text = next(c for c in print_config_comment("name") if c.startswith("uniform, std-<sigma>"))
    assert all(name in text for name in ("weights:uniform", "weights:global", "weights:std-<sigma>"))


def test_nps_help_says_any_traceable_cnn_filters_or_weights():
    text = build_parser().format_help()
    assert "a trained ResNet" not in text
    assert "any network torch.fx traces" in text and "filters or its weights" in text


def test_table_help_lists_every_column(tmp_path, make_rows):
    from nps.pipeline.results.table import columns

    path = tmp_path / "results.h5"
    store = ResultsStore.create(path, StandInTable(), dump(Config()), {"base_top1": 90.0})
    store.add_space("std-0.05@c_flops=0.25", make_rows(2), epochs=1)
    store.close()
    table_parser = build_parser()._subparsers._group_actions[0].choices["table"]
    help_text = " ".join(table_parser.format_help().split())
    names = [n for n in columns(path) if n not in ("recipe", "keep")]
    assert "pruning" in names
    missing = [n for n in names if not re.search(rf"\b{re.escape(n)}\b", help_text)]
    assert not missing, missing


# --------------------------------------------------------------------------------------------------------------------
# Counts and the median.


def one_row_file(tmp_path, *, running: bool):
    path = tmp_path / "results.h5"
    store = ResultsStore.create(path, StandInTable(), dump(Config()), {"base_top1": 90.0})
    store.add_space("std-0.05@c_flops=0.25", rows(1), epochs=1)
    if running:
        store.mark_running("std-0.05@c_flops=0.25", [0])
    store.close()
    return path


def test_status_counts_one_in_the_singular(tmp_path):
    code, out, _ = nps(["status", one_row_file(tmp_path, running=True)])
    assert code == 0
    assert "0 done, 0 failed of 1 subnetwork;" in out and "(1 row left 'running'" in out


def test_table_counts_one_row_in_the_singular(tmp_path):
    pytest.importorskip("pandas")
    code, out, _ = nps(["table", one_row_file(tmp_path, running=False), "--out", tmp_path / "rows.csv"])
    assert code == 0 and re.search(r": 1 row × \d+ columns$", out.strip()), out


def median_cell(text: str, space: str) -> str:
    line = next(line for line in text.splitlines() if space in line)
    return [c.strip() for c in line.strip("│ ").split("│")][-1]


def test_run_and_status_show_the_same_median(tmp_path, monkeypatch):
    """The run's ledger holds top-1 in float64, the file in float32: on a rounding edge (drops 61.07 and 61.06, median
    61.065) they rounded apart. The run's last table reads the file, as `nps status` does."""
    from nps.pipeline import run as run_package
    from nps.pipeline.experiment import plan as plan_module
    from nps.pipeline.run.state import Outcome, SpaceState

    out_dir = tmp_path / "run"
    out_dir.mkdir()
    path = out_dir / "results.h5"
    space, base, top1 = "std-0.05@c_flops=0.25", 86.15, [25.08, 25.09]
    store = ResultsStore.create(path, StandInTable(), dump(Config()), {"base_top1": base})
    store.add_space(space, rows(2), epochs=1)
    for row, t in enumerate(top1):
        store.record(space, [row], [Result.done(top1=t, top5=99.0, loss=0.5)])
    store.close()
    ledger = SpaceState.from_rows(space, np.array([2, 2]), np.array(top1, dtype=np.float64), base)
    assert f"{ledger.median_drop:.2f}" == "61.07"  # what the run showed from its memory

    monkeypatch.setattr(plan_module, "validate", lambda cfg, devices=None: None)
    monkeypatch.setattr(run_package, "run_experiment",
                        lambda plan, view, **kw: Outcome("complete", str(path), [ledger], base, 1.0))
    code, run_out, _ = nps(["run", "demo", "--out", out_dir])
    assert code == 0
    code, status_out, _ = nps(["status", path])
    assert code == 0
    assert median_cell(run_out, space) == median_cell(status_out, space) == "61.06"


# --------------------------------------------------------------------------------------------------------------------
# Batch logs: stdout is a file or a pipe.


@pytest.mark.e2e
def test_status_in_a_pipe_wraps_and_cuts_nothing(tmp_path):
    deep = tmp_path / ("a-directory-with-a-long-name-" * 3)
    deep.mkdir()
    path = deep / "results.h5"
    cfg = Config()
    cfg.experiment.name = "an-experiment-with-a-long-name"
    store = ResultsStore.create(path, StandInTable(), dump(cfg), {"base_top1": 90.0, "base_top5": 99.0})
    names = ["weights:mcb-0.9-1.1@c_flops=0.125#top", "std-0.05@c_params=0.3333"]
    for name in names:
        store.add_space(name, rows(3), epochs=1)
        store.record(name, [0], [Result.done(top1=80.25, top5=97.0, loss=0.5)])
    store.close()
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    out = subprocess.run([sys.executable, "-m", "nps.pipeline.cli", "status", str(path)], capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"{path}  experiment {cfg.experiment.name}, resnet20 at 28 px, created ")
    assert lines[-1] == "accuracy drop = base top-1 (90.00) − subnetwork top-1, percentage points"
    for name in names:
        assert median_cell(out.stdout, name) == "9.75"
    assert_whole(out.stdout)


def test_report_in_a_file_keeps_its_headings_whole(tmp_path):
    from test_report import SPACES, make_results

    from nps.pipeline.network.layer_table import build_layer_table

    table = build_layer_table("resnet20", "all", 32, 10)
    results = make_results(tmp_path / "results.h5", table, SPACES[:2], n=12, outcome=lambda s, row: "done")
    code, out, _ = nps(["report", results, "--out", tmp_path / "report", "--bootstrap", "50"])
    assert code == 0
    assert re.search(r"┃ regime +┃ space +┃ +done ┃ +best ┃ +mean drop \[95% CI\] ┃ P\(top\) ┃", out), out
    assert ("drops in percentage points; P(top): bootstrap probability that the space's EDF is the highest, among "
            "the spaces with at least 10 rows (–: fewer)\n") in out
    assert_whole(out)


# --------------------------------------------------------------------------------------------------------------------
# A run from a checkpoint, in a batch log; then a space more.


def tiny_experiment(tmp_path, data_dir, checkpoint, spaces=("std-0.05",)) -> str:
    text = cpu_experiment_head("messages", 0, tmp_path / ("a-run-directory-with-a-long-name-" * 3), data_dir,
                               checkpoint, experiment_extra="baseline = false")
    text = text.replace('val_batch_size = 128', 'val_batch_size = 128\ntrain_images = 64\nval_images = 64')
    for name in spaces:
        text += f'\n[[spaces]]\nname = "{name}"\nc_flops = 0.25\nn = 1\n'
    text += "\n[retrain]\nepochs = 1\nbatch_size = 32\nbn_images = 32\n\n[output]\nkeep_weights = \"none\"\n"
    path = tmp_path / f"messages-{len(spaces)}.toml"
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def checkpoint_run(tmp_path_factory, fmnist_dir, base_checkpoint):
    """``(experiment, out_dir, exit status, stdout)`` of a one-row run from a checkpoint, stdout not a terminal."""
    tmp = tmp_path_factory.mktemp("messages")
    experiment = tiny_experiment(tmp, fmnist_dir(256), base_checkpoint)
    cfg = load_config(experiment)
    code, out, err = nps(["run", experiment])
    assert code == 0, err
    return experiment, cfg.experiment.out, out


def test_a_run_from_a_checkpoint_says_it_evaluates_it(checkpoint_run, base_checkpoint):
    _, _, out = checkpoint_run
    assert "training the base network" not in out
    assert f"evaluating the base network from {base_checkpoint}" in out


def test_a_run_counts_one_recipe_in_the_singular(checkpoint_run):
    _, _, out = checkpoint_run
    assert re.search(r"sampling std-0\.05@c_flops=0\.25: 1 recipe$", out, re.M), out


def test_a_runs_batch_log_wraps_and_cuts_nothing(checkpoint_run):
    _, out_dir, out = checkpoint_run
    assert f"messages: {out_dir}/results.h5\n" in out  # the last table's title, on one line
    assert re.search(r"^accuracy drop = base top-1 \(\d+\.\d\d\) − subnetwork top-1, percentage points$", out, re.M)
    assert_whole(out)


def test_adding_a_space_to_a_run_names_the_way(checkpoint_run, fmnist_dir, base_checkpoint, tmp_path):
    experiment, out_dir, _ = checkpoint_run
    more = tiny_experiment(tmp_path, fmnist_dir(256), base_checkpoint, spaces=("std-0.05", "std-0.01"))
    code, _, err = nps(["run", more, "--out", out_dir])
    assert code == 2
    assert "spaces.count (stored 1, now 2)" in err
    assert f"start a new run with another --out and --set model.checkpoint={base_checkpoint}" in err
    # the way it names is open: a new --out with that checkpoint is a valid experiment
    from nps.pipeline.experiment.plan import validate

    cfg = load_config(more, [f"model.checkpoint={base_checkpoint}"], out=str(tmp_path / "more"))
    assert validate(cfg).config.model.checkpoint == str(base_checkpoint)
