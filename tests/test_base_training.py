"""Base and reference training to a plateau, resumable (issue 29, items 1 and 2).

The plateau rule and the learning-rate plan on scripted numbers; the holdout carved from the train split (never
trained on); a real tiny training that stops where the rule says on its own curve; learning curves stored in
results.h5 and drawn by the report; and a run killed with SIGKILL while it trains the base network, or a reference,
that the same command resumes from its last checkpoint to the same weights and top-1 as a run never interrupted,
leaving no checkpoint behind.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import StandInTable, rows_for_store

from nps.pipeline.errors import NpsError
from nps.pipeline.training.plateau import PlateauRule, TrainingCurve

TESTS = Path(__file__).resolve().parent
RUN_TIMEOUT = 300

# A curve that rises, then creeps: with patience 3 and min_delta 0.5 it plateaus at epoch 10, where the best of
# epochs 8-10 (69.5) is exactly 0.5 above the best before them (69.0): "not above by more than" min_delta.
SCRIPTED = [20.0, 40.0, 55.0, 62.0, 66.0, 68.0, 69.0, 69.4, 69.2, 69.5, 70.2, 69.9, 70.0, 70.1, 70.6]


# --------------------------------------------------------------------------------------------------------------------
# The rule and the schedule, on scripted numbers.


def test_plateau_rule_on_a_scripted_curve():
    rule = PlateauRule(patience=3, min_delta=0.5, cooldown_epochs=2, max_epochs=20)
    assert [e for e in range(1, 16) if rule.plateaued(SCRIPTED[:e])][0] == 10
    assert rule.first_stop(SCRIPTED) == 10
    # a smaller min_delta: 69.5 is progress over 69.0; the next plateau is at 14 (70.1 is not 0.4 above 70.2)
    assert PlateauRule(3, 0.4, 2, 20).first_stop(SCRIPTED) == 14
    # the rule waits for the warm-up, and looks only where stopping (and cooling down) saves an epoch
    assert PlateauRule(3, 0.5, 2, 20, warmup_epochs=12).first_stop(SCRIPTED) == 14
    assert PlateauRule(3, 0.5, 2, 13).first_stop(SCRIPTED) == 10  # 10 + 2 < 13
    assert PlateauRule(3, 0.5, 2, 12).first_stop(SCRIPTED) == 0  # 10 + 2 = 12: the cosine ends there anyway
    assert PlateauRule(3, 0.5, 3, 20).first_stop(SCRIPTED[:9]) == 0  # never before it has patience epochs to judge
    # off, no holdout, or a curve that keeps rising by more than min_delta: it never stops
    assert PlateauRule(0, 0.5, 2, 20).first_stop(SCRIPTED) == 0
    assert PlateauRule(3, 0.5, 2, 20).first_stop([math.nan] * 15) == 0
    assert PlateauRule(3, 0.5, 2, 20).first_stop([10.0 + e for e in range(15)]) == 0
    assert PlateauRule(1, 0.0, 1, 20).first_stop([10.0, 10.0]) == 2  # a flat curve at the first chance


def test_the_cool_down_ends_the_rate_at_zero_without_a_jump_and_travels_with_the_schedule():
    from nps.pipeline.training.schedule import LrPlan, lr_factor, make_scheduler
    from nps.pipeline.training.spec import RetrainSpec

    plan = LrPlan(total_steps=100, warmup_steps=10)
    before = [plan(s) for s in range(100)]
    assert before == [lr_factor(s, 100, 10) for s in range(100)]  # no plateau: the recipe's warm-up and cosine
    plan.cool_down(40, 20)
    after = [plan(s) for s in range(100)]
    assert after[:41] == before[:41]  # the first step of the cool-down runs at the rate the optimizer already has
    assert all(a > b > 0 for a, b in zip(after[40:59], after[41:60]))  # then down, linearly ...
    assert after[59] == pytest.approx(before[40] / 20) and after[60:] == [0.0] * 40  # ... to 0 after 20 steps

    spec = RetrainSpec(method="rewind", epochs=10, rewind_lr=0.1, warmup_epochs=1.0)
    model = torch.nn.Linear(2, 2)
    sched = make_scheduler(torch.optim.SGD(model.parameters(), lr=0.1), spec, 10, factor=plan)
    restored = LrPlan(100, 10)
    make_scheduler(torch.optim.SGD(model.parameters(), lr=0.1), spec, 10, factor=restored).load_state_dict(
        sched.state_dict())
    assert (restored.cool_from, restored.cool_steps) == (40, 20)  # a checkpoint's schedule holds its cool-down


def test_curves_are_stored_per_network_and_read_back(tmp_path):
    from nps.pipeline.results.format import FORMAT_VERSION
    from nps.pipeline.results.store import ResultsStore, open_readonly

    store = ResultsStore.create(tmp_path / "r.h5", StandInTable(), "[experiment]\nname = 'x'\n", {"base_top1": 90.0})
    store.add_space("std-0.05@c_flops=0.25", rows_for_store(2), epochs=1)
    first = TrainingCurve(6, 1, 100.0, 2, 50, [2.0, 1.0], [10.0, 20.0], [11.0, 19.0], [0.1, 0.05])
    store.set_curve({name: getattr(first, name) for name in first.SERIES}, first.attrs())
    base = TrainingCurve(6, 1, 100.0, 2, 50, [2.0, 1.5, 1.2, 1.1], [10.0, 30.0, 40.0, 42.0],
                         [12.0, 31.0, 39.5, 43.0], [0.1, 0.08, 0.04, 0.01], plateau_epoch=2, weights_sha256="ab")
    store.set_curve({name: getattr(base, name) for name in base.SERIES}, base.attrs())  # replaces the first
    ref = TrainingCurve(6, 1, 100.0, 2, 50, [2.2], [9.0], [9.5], [0.1])
    store.set_reference("timm:x/y", curve=({name: getattr(ref, name) for name in ref.SERIES}, ref.attrs()),
                        model="timm:x/y", top1=30.0)
    store.close()
    with open_readonly(tmp_path / "r.h5") as reader:
        assert reader.format == FORMAT_VERSION == 4
        curves = reader.curves()
        refs = reader.references()
    assert [(c["network"], c["role"]) for c in curves] == [("resnet20", "base"), ("timm:x/y", "reference")]
    b, r = curves
    assert b["train_loss"] == pytest.approx(base.train_loss) and b["holdout_top1"] == pytest.approx(base.holdout_top1)
    assert b["lr"] == pytest.approx(base.lr) and b["val_top1"] == pytest.approx(base.val_top1)
    assert (b["epochs"], b["max_epochs"], b["plateau_epoch"], b["stopped_by"]) == (4, 6, 2, "plateau")
    assert (b["weights_sha256"], b["cooldown_epochs"], b["holdout_images"]) == ("ab", 2, 50)
    assert r["stopped_by"] == "max_epochs" and r["train_loss"] == pytest.approx([2.2])
    assert refs["timm:x/y"]["top1"] == 30.0  # the reference's metrics are where they were


# --------------------------------------------------------------------------------------------------------------------
# The holdout, and a real tiny training.


@pytest.mark.fmnist
@pytest.mark.parametrize("on_device", [True, False])
def test_the_holdout_is_carved_from_the_train_split_and_never_trained_on(fmnist_dir, on_device):
    from nps.datasets.errors import DatasetError
    from nps.datasets.loaders import holdout_split, make_holdout_loaders, make_loaders, resolve_holdout

    data = fmnist_dir(600)
    train_idx, holdout_idx = holdout_split(600, 60, seed=3)
    assert len(holdout_idx) == 60 and np.intersect1d(train_idx, holdout_idx).size == 0
    assert np.array_equal(np.union1d(train_idx, holdout_idx), np.arange(600))
    assert np.array_equal(holdout_split(600, 60, seed=3)[1], holdout_idx)  # fixed by the seed ...
    assert not np.array_equal(holdout_split(600, 60, seed=4)[1], holdout_idx)  # ... and by nothing else
    options = dict(batch_size=50, order="sequential", augment=False, in_channels=1, num_workers=1,
                   on_device=on_device, drop_last=False, val_batch_size=64)
    whole, val, _ = make_loaders(data, **options)
    train, holdout, val2, info = make_holdout_loaders(data, holdout_images=60, holdout_seed=3, **options)
    every = torch.cat([x for x, _ in whole])
    labels = torch.cat([y for _, y in whole])
    assert info.extra["holdout_images"] == 60
    assert torch.equal(torch.cat([x for x, _ in train]), every[train_idx])  # trained on: the rest, only the rest
    assert torch.equal(torch.cat([x for x, _ in holdout]), every[holdout_idx])  # scored: the held-out images
    assert torch.equal(torch.cat([y for _, y in holdout]), labels[holdout_idx])
    assert torch.equal(torch.cat([x for x, _ in val2]), torch.cat([x for x, _ in val]))  # val: the test split
    assert resolve_holdout("auto", 600) == 60 and resolve_holdout("auto", 60000) == 5000
    with pytest.raises(DatasetError, match="at most 300"):
        resolve_holdout(400, 600)


def tiny_loaders(data, holdout_images: int):
    from nps.datasets.loaders import make_holdout_loaders

    train, holdout, val, _ = make_holdout_loaders(data, holdout_images=holdout_images, holdout_seed=0,
                                                  batch_size=32, augment=False, in_channels=1, num_workers=1,
                                                  val_batch_size=128)
    return train, holdout, val


@pytest.mark.fmnist
def test_a_real_training_stops_at_its_holdout_plateau(fmnist_dir):
    """A tiny CNN on 500 images: its holdout top-1 stops rising before 20 epochs; training stops where the rule,
    applied to the curve it recorded, says, cools down for 2 epochs, and ends at a rate near 0."""
    from nps.pipeline.network.models import build_model
    from nps.pipeline.training.events import EpochEnded
    from nps.pipeline.training.network_training import NetworkTraining, train_to_plateau
    from nps.pipeline.training.spec import RetrainSpec

    train, holdout, val = tiny_loaders(fmnist_dir(600), 100)
    rule = PlateauRule(patience=3, min_delta=1.0, cooldown_epochs=2, max_epochs=20, warmup_epochs=0.5)
    spec = RetrainSpec(method="rewind", epochs=20, rewind_lr=0.1, warmup_epochs=0.5)
    plan = NetworkTraining("own_models:tiny_cnn", spec, rule, 100, "off", "test")
    torch.manual_seed(0)
    events, checkpoints = [], []
    result, curve = train_to_plateau(build_model("own_models:tiny_cnn", num_classes=10, in_channels=1), train,
                                     holdout, val, plan, "cpu", on_event=events.append,
                                     on_checkpoint=lambda epoch, data: checkpoints.append(epoch))
    assert result.ok and 0 < curve.plateau_epoch == rule.first_stop(curve.holdout_top1)
    assert curve.epochs == result.epochs_done == curve.plateau_epoch + 2 < 20 and curve.stopped_by == "plateau"
    assert checkpoints == list(range(1, curve.epochs + 1))
    ended = [e for e in events if isinstance(e, EpochEnded)]
    assert [e.holdout_top1["own_models:tiny_cnn"] for e in ended] == curve.holdout_top1
    assert [e.val_top1["own_models:tiny_cnn"] for e in ended] == curve.val_top1 == result.curve
    assert ended[-1].epochs == curve.epochs  # after the plateau, progress counts to the cool-down's end
    peak, at_plateau = 0.1, curve.lr[curve.plateau_epoch - 1]
    assert curve.lr[: curve.plateau_epoch] == sorted(curve.lr[: curve.plateau_epoch], reverse=True)
    assert at_plateau > 0.3 * peak and curve.lr[-1] < 0.1 * at_plateau  # stopped mid-cosine, ended near 0


@pytest.mark.fmnist
def test_the_holdout_can_be_scored_after_bn_reestimation_without_touching_the_network(fmnist_dir):
    """base.holdout_bn_images: the plateau rule's holdout top-1 is that of a copy whose BN statistics are
    re-estimated on training images, which equals precise BN applied to the epoch's network; the network trained on
    keeps its own running statistics (the same weights and buffers as a training scored the plain way)."""
    import copy

    from nps.pipeline.network.models import build_model
    from nps.pipeline.training.evaluation import adaptive_bn_many, evaluate
    from nps.pipeline.training.network_training import NetworkTraining, train_to_plateau, weights_digest
    from nps.pipeline.training.spec import RetrainSpec

    train, holdout, val = tiny_loaders(fmnist_dir(600), 100)
    rule = PlateauRule(patience=0, min_delta=0.1, cooldown_epochs=0, max_epochs=2, warmup_epochs=0.5)
    spec = RetrainSpec(method="rewind", epochs=2, rewind_lr=0.1, warmup_epochs=0.5)
    runs = {}
    for bn_images in (0, 64):
        plan = NetworkTraining("own_models:tiny_cnn", spec, rule, 100, "off", "test", holdout_bn_images=bn_images)
        torch.manual_seed(0)
        runs[bn_images] = train_to_plateau(build_model("own_models:tiny_cnn", num_classes=10, in_channels=1), train,
                                           holdout, val, plan, "cpu")
    (plain, plain_curve), (bn, bn_curve) = runs[0], runs[64]
    assert weights_digest(plain.model) == weights_digest(bn.model)  # the trained network: untouched
    assert plain_curve.val_top1 == bn_curve.val_top1
    assert plain_curve.holdout_top1[-1] == evaluate(plain.model, holdout, "cpu")[0]
    again = copy.deepcopy(bn.model)
    train.set_epoch(0)
    adaptive_bn_many([again], train, "cpu", num_images=64)
    assert bn_curve.holdout_top1[-1] == evaluate(again, holdout, "cpu")[0]


def dropout_cnn() -> torch.nn.Module:
    """A tiny CNN whose dropout draws from torch's generator every training step."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Dropout(0.5),
                               torch.nn.Linear(128, 10))


class Killed(Exception):
    pass


@pytest.mark.fmnist
def test_a_training_resumed_from_a_checkpoint_draws_what_it_would_have_drawn(fmnist_dir):
    """Stopped after epoch 3 (in the cool-down), resumed in a model built afresh: the same weights, scores and curve
    as the training never stopped, dropout's random draws included."""
    from nps.pipeline.training.network_training import NetworkTraining, train_to_plateau, weights_digest
    from nps.pipeline.training.spec import RetrainSpec

    train, holdout, val = tiny_loaders(fmnist_dir(600), 100)
    spec = RetrainSpec(method="rewind", epochs=8, rewind_lr=0.1, warmup_epochs=0.5)
    plan = NetworkTraining("dropout", spec, PlateauRule(1, 100.0, 3, 8, 0.5), 100, "off", "test")
    result, curve = train_to_plateau(dropout_cnn(), train, holdout, val, plan)
    saved = {}

    def stop_after_3(epoch: int, data: bytes) -> None:
        saved[epoch] = data
        if epoch == 3:
            raise Killed()

    with pytest.raises(Killed):
        train_to_plateau(dropout_cnn(), train, holdout, val, plan, on_checkpoint=stop_after_3)
    torch.manual_seed(1234)  # whatever the process drew since: the checkpoint's generators replace it
    again, curve_again = train_to_plateau(dropout_cnn(), train, holdout, val, plan, resume=saved[3])
    assert curve.plateau_epoch == 2 and curve.epochs == 5
    assert weights_digest(again.model) == weights_digest(result.model)
    assert (again.top1, again.top5, again.loss, again.curve) == (result.top1, result.top5, result.loss, result.curve)
    assert {k: v for k, v in curve_again.as_dict().items() if k != "seconds"} == {
        k: v for k, v in curve.as_dict().items() if k != "seconds"}
    other = NetworkTraining("dropout", spec, PlateauRule(1, 100.0, 3, 8, 0.5), 100, "off", "other settings")
    with pytest.raises(NpsError, match="a checkpoint of another training"):
        train_to_plateau(dropout_cnn(), train, holdout, val, other, resume=saved[3])


def test_random_state_round_trips_for_torch_numpy_and_python():
    import random

    from nps.pipeline.training.network_training import rng_state, set_rng_state

    state = rng_state(torch.device("cpu"))
    first = (torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)])
    set_rng_state(state, torch.device("cpu"))
    assert (torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]) == first


# --------------------------------------------------------------------------------------------------------------------
# End to end: curves in results.h5 and the report; SIGKILL, then the same command.


EXPERIMENT = """
[experiment]
name = "plateau"
seed = 0
out = "{out}"
devices = "cpu"
baseline = false

[dataset]
dir = "{data}"
val_images = 128
val_batch_size = 128
augment = false

[model]
name = "own_models:tiny_cnn"

[base]
epochs = 8
batch_size = 32
lr = 0.1
warmup_epochs = 0.5
bn_images = 64
holdout_images = 100
patience = 1
min_delta = 100.0  # every epoch after the first is a plateau: the rule fires at epoch 2, then 3 of cool-down
cooldown_epochs = 3

[[references]]
model = "own_models:vgg_like"
epochs = 8
seeds = 2  # a second training from seed 1: own_models:vgg_like#1

[[spaces]]
name = "std-0.05"
c_flops = 0.5
n = 1

[retrain]
epochs = 1
batch_size = 32
cohort_size = 1
bn_images = 32
"""


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, fmnist_dir) -> Path:
    path = tmp_path_factory.mktemp("plateau") / "plateau.toml"
    path.write_text(EXPERIMENT.format(out=path.parent / "unused", data=fmnist_dir(600)))
    return path


def run_in_process(experiment: Path, out: Path) -> int:
    """``nps run EXPERIMENT --out OUT`` in this process (its worker is a spawned process that inherits sys.path,
    which holds tests/ for own_models)."""
    import contextlib
    import io

    from nps.pipeline.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        return main(["run", str(experiment), "--out", str(out)])


@pytest.fixture(scope="module")
def uninterrupted(experiment) -> Path:
    out = experiment.parent / "uninterrupted"
    assert run_in_process(experiment, out) == 0
    return out


def log_events(out: Path) -> list[dict]:
    with open(out / "log.jsonl") as fh:
        return [json.loads(line) for line in fh]


def base_state(out: Path) -> dict:
    return torch.load(out / "base.pt", map_location="cpu", weights_only=True)


def stored(out: Path) -> tuple[dict, dict, list[dict]]:
    from nps.pipeline.results.reader import open_readonly

    with open_readonly(out / "results.h5") as reader:
        return reader.attrs, reader.references(), reader.curves()


def left_behind(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("training-") or p.name == ".staging")


@pytest.mark.fmnist
def test_learning_curves_are_stored_and_drawn(uninterrupted, tmp_path):
    from nps.pipeline.results.report import write_report

    attrs, refs, curves = stored(uninterrupted)
    assert attrs["format_version"] == 4
    by_role = {c["role"]: c for c in curves}
    assert set(by_role) == {"base", "reference"}
    assert [c["network"] for c in curves] == ["own_models:tiny_cnn", "own_models:vgg_like", "own_models:vgg_like#1"]
    for c in curves:  # the rule fired at epoch 2 (min_delta 100), then 3 epochs of cool-down: 5 of at most 8
        assert (c["plateau_epoch"], c["epochs"], c["max_epochs"], c["stopped_by"]) == (2, 5, 8, "plateau")
        assert all(len(c[name]) == 5 and all(map(math.isfinite, c[name])) for name in TrainingCurve.SERIES)
        assert c["holdout_images"] == 100 and c["lr"][-1] < 0.01 < c["lr"][1]
    assert len({c["weights_sha256"] for c in curves}) == 3  # the reference's two seeds train two networks
    assert [r["seed"] for r in refs.values()] == [0, 1] and set(refs) == {"own_models:vgg_like", "own_models:vgg_like#1"}
    assert refs["own_models:vgg_like"]["model"] == refs["own_models:vgg_like#1"]["model"] == "own_models:vgg_like"
    assert base_state(uninterrupted)["epochs"] == 5 and base_state(uninterrupted)["stopped_by"] == "plateau"
    summary = write_report(uninterrupted / "results.h5", tmp_path / "report", n_boot=50)
    figure = summary["figures"]["learning_curves"]
    assert (tmp_path / "report" / figure["file"]).is_file()
    assert "own_models:tiny_cnn stopped after epoch 5 of at most 8 (holdout plateau at epoch 2" in figure["caption"]
    assert [c["top1"] for c in summary["curves"]] == [attrs["base_top1"], refs["own_models:vgg_like"]["top1"],
                                                      refs["own_models:vgg_like#1"]["top1"]]
    (ref,) = summary["references"]  # one reference network, compared by its mean over the two seeds
    values = [refs["own_models:vgg_like"]["top1"], refs["own_models:vgg_like#1"]["top1"]]
    assert ref["seeds"] == 2 and ref["top1_values"] == values and ref["top1"] == pytest.approx(sum(values) / 2)
    assert ref["top1_range"] == [min(values), max(values)]
    page = (tmp_path / "report" / "index.html").read_text()
    assert "<h2>Reference networks</h2>" in page and "= mean of 2 seeds: " in page
    assert left_behind(uninterrupted) == []


def start_run(experiment: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get(
        "PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "nps.pipeline.cli", "run", str(experiment), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def kill_after_checkpoint(experiment: Path, out: Path, checkpoint: str, epoch: int) -> None:
    """Start the run in another process and SIGKILL it (its workers die with it) once the driver logged
    ``checkpoint`` of ``epoch``."""
    proc = start_run(experiment, out)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"the run ended before it was killed: {proc.communicate()[1][-2000:]}"
            if (out / "log.jsonl").is_file() and any(
                    e["event"] == "checkpoint" and e["path"] == checkpoint and e["epoch"] >= epoch
                    for e in log_events(out)):
                break
            time.sleep(0.01)
        else:
            raise AssertionError(f"no checkpoint {checkpoint} of epoch {epoch} in time")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate(timeout=60)


def assert_resumed_identically(out: Path, uninterrupted: Path, what: str, killed_after: int) -> None:
    starts = [i for i, e in enumerate(log_events(out)) if e["event"] == "start"]
    resumed = log_events(out)[starts[-1]:]
    began = next(e for e in resumed if e["event"] == what)
    assert began["resumed"] is True  # from the checkpoint, not from zero ...
    first = next(e["epoch"] for e in resumed if e["event"] == "checkpoint")
    assert first == killed_after + 1  # ... after its last finished epoch
    a, b = base_state(out), base_state(uninterrupted)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # the same base weights, exactly
    (attrs, refs, curves), (attrs0, refs0, curves0) = stored(out), stored(uninterrupted)
    assert [attrs[k] for k in ("base_top1", "base_top5", "base_loss")] == [attrs0[k] for k in ("base_top1",
                                                                                             "base_top5", "base_loss")]
    for name in ("own_models:vgg_like", "own_models:vgg_like#1"):
        for key in ("top1", "top5", "loss"):
            assert refs[name][key] == refs0[name][key]
    for c, c0 in zip(curves, curves0, strict=True):  # every epoch's numbers, and the final weights' digest
        assert {k: v for k, v in c.items() if k != "train_s"} == {k: v for k, v in c0.items() if k != "train_s"}
    assert left_behind(out) == []  # the checkpoints go once their training's result is stored


@pytest.mark.fmnist
def test_sigkill_during_base_training_then_the_same_command_resumes_it_exactly(experiment, uninterrupted):
    out = experiment.parent / "killed-base"
    kill_after_checkpoint(experiment, out, "training-base.ckpt", 3)  # in the cool-down (the rule fired at 2)
    events = log_events(out)
    assert not any(e["event"] == "base_done" for e in events), "killed too late: the base training had finished"
    killed_after = max(e["epoch"] for e in events if e["event"] == "checkpoint")
    assert torch.load(out / "training-base.ckpt", weights_only=True)["epoch"] == killed_after
    assert run_in_process(experiment, out) == 0
    assert_resumed_identically(out, uninterrupted, "base", killed_after)


@pytest.mark.fmnist
@pytest.mark.slow  # the base network's training resumes through the same code in the default tier (make test)
def test_sigkill_during_a_reference_training_then_the_same_command_resumes_it_exactly(experiment, uninterrupted):
    out = experiment.parent / "killed-reference"
    checkpoint = "training-reference-own_models_vgg_like.ckpt"
    kill_after_checkpoint(experiment, out, checkpoint, 3)
    events = log_events(out)
    assert any(e["event"] == "base_done" for e in events)
    assert not any(e["event"] == "reference_done" for e in events), "killed too late: the reference had finished"
    killed_after = max(e["epoch"] for e in events if e["event"] == "checkpoint" and e["path"] == checkpoint)
    assert run_in_process(experiment, out) == 0
    assert_resumed_identically(out, uninterrupted, "reference", killed_after)
