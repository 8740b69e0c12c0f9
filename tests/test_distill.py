"""Distillation from the unpruned base network (issue 30, item 1; pipeline/training/distill.py).

- the training loss of a member is (1 − α)·CE + α·T²·KL(teacher ∥ student) on a fixed batch, computed here
  independently (float64, by hand), in the unfused and the fused cohort;
- the teacher runs once per batch per cohort, whatever steps the members (CPU threads, the plain loop the engine
  uses on a GPU with streams, the fused step), is frozen (eval mode, no grad) and leaves the caller's network alone;
- rows with distillation give bit-identical numbers in cohorts of 1 and 2 (the seed rule), and α = 0 trains
  exactly as without distillation;
- fused and unfused distillation agree as tests/test_fuse.py's exactness test requires of plain training;
- the recipe's keys are checked and stored per space; a tiny `nps run` with retrain.distill = true (fused cohorts,
  two-stage retraining) completes.
"""
from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from test_fuse import assert_equivalent, batches, cohort_of, vector

from nps.kernels.samplers import sample_space
from nps.kernels.spaces import parse_space
from nps.pipeline.errors import NpsError
from nps.pipeline.network.layer_table import build_layer_table
from nps.pipeline.network.models import build_model
from nps.pipeline.network.prune import prune_model
from nps.pipeline.training.cohort import Cohort, CohortOptions, train_cohort
from nps.pipeline.training.distill import Teacher
from nps.pipeline.training.engine import run_cohorts
from nps.pipeline.training.events import EpochEnded
from nps.pipeline.training.fused_cohort import FusedCohort, Fusion
from nps.pipeline.training.spec import RetrainSpec, SpaceSpec

RES = 16
DISTIL = dict(distill=True, distill_alpha=0.3, distill_temperature=2.5)


def family(k: int = 3, seed: int = 0):
    """(base, table, keeps, members): ResNet-20 at 16 px and k of its pruned subnetworks, of different widths."""
    table = build_layer_table("resnet20", "all", RES, 10, 3)
    torch.manual_seed(seed)
    base = build_model("resnet20", num_classes=10, in_channels=3)
    keeps = sample_space(table, parse_space("std-0.1", "c_flops", 0.3), k, seed=1).keep
    return base, table, keeps, [prune_model(base, table, kp) for kp in keeps]


def data(n: int, b: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    proto = torch.randn(10, 3, RES, RES, generator=g)
    out = []
    for _ in range(n):
        y = torch.randint(0, 10, (b,), generator=g)
        out.append((proto[y] + 0.5 * torch.randn(b, 3, RES, RES, generator=g), y))
    return out


def counted(base):
    """``base`` with a forward hook counting its calls; the hook survives the teacher's copy of it."""
    calls = []
    base.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    return calls


PLAIN = CohortOptions(amp="off", channels_last=False)


# -- the loss ---------------------------------------------------------------------------------------------------------

def formula(student, teacher, x, y, alpha, temperature, smoothing):
    """(1 − α)·CE + α·T²·KL(teacher ∥ student), by hand in float64: the student in train mode (batch statistics),
    the teacher in eval mode."""
    student, teacher = copy.deepcopy(student).double().train(), copy.deepcopy(teacher).double().eval()
    with torch.no_grad():
        s, t = student(x.double()), teacher(x.double())

    def log_softmax(z):
        z = z - z.max(dim=1, keepdim=True).values
        return z - z.exp().sum(dim=1, keepdim=True).log()

    log_q1 = log_softmax(s)
    c = s.shape[1]
    ce = (-(1 - smoothing) * log_q1[torch.arange(len(y)), y] - smoothing / c * log_q1.sum(dim=1)).mean()
    log_p, log_q = log_softmax(t / temperature), log_softmax(s / temperature)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()
    return ((1 - alpha) * ce + alpha * temperature ** 2 * kl).item()


@pytest.mark.parametrize("kind", ["unfused", "fused"])
def test_the_loss_is_the_formula_on_a_fixed_batch(kind):
    base, table, keeps, members = family(2)
    batch = data(1)
    x, y = batch[0]
    spec = RetrainSpec(epochs=1, lr=1e-3, label_smoothing=0.1, **DISTIL)
    events = []
    common = dict(options=PLAIN, on_event=events.append, teacher=Teacher(base))
    if kind == "fused":
        FusedCohort(copy.deepcopy(members), batch, batch, spec, "cpu", fusion=Fusion(base, table, keeps),
                    **common).run()
    else:
        Cohort(copy.deepcopy(members), batch, batch, spec, "cpu", **common).run()
    losses = [e for e in events if isinstance(e, EpochEnded)][0].train_loss  # one step: the batch's loss
    plain = [formula(m, base, x, y, 0.0, 2.5, 0.1) for m in members]
    for pos, member in enumerate(members):
        expected = formula(member, base, x, y, 0.3, 2.5, 0.1)
        assert losses[pos] == pytest.approx(expected, rel=1e-5), (pos, losses[pos], expected)
        assert abs(expected - plain[pos]) > 1e-2 * plain[pos]  # the teacher's term is not negligible here


def test_alpha_zero_trains_exactly_as_without_distillation():
    base, _, _, members = family(2)
    batch = data(3)
    opts = dataclasses.replace(PLAIN, keep_models=True)
    plain = train_cohort(copy.deepcopy(members), batch, batch[:1], RetrainSpec(epochs=1, lr=0.05), "cpu",
                         options=opts)
    zero = train_cohort(copy.deepcopy(members), batch, batch[:1], RetrainSpec(epochs=1, lr=0.05, distill=True,
                                                                              distill_alpha=0.0), "cpu",
                        options=opts, teacher=Teacher(base))
    for a, b in zip(plain, zero):
        assert torch.equal(vector(a.model), vector(b.model)) and (a.top1, a.loss) == (b.top1, b.loss)


# -- one teacher forward per batch -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["threads", "loop", "fused"])
def test_the_teacher_runs_once_per_batch_per_cohort(kind):
    """3 members, 4 batches, 2 epochs: 8 teacher forwards, not 24, however the members step: in CpuWorkers
    threads, in the plain loop (the path that gives each member a CUDA stream on a GPU) or fused."""
    base, table, keeps, members = family(3)
    before = copy.deepcopy(base.state_dict())
    calls = counted(base)
    batch = data(4, b=8)
    spec = RetrainSpec(epochs=2, lr=0.05, **DISTIL)
    settings = {"threads": dict(member_threads=1, cpu_workers=2), "loop": dict(member_threads=None, cpu_workers=1),
                "fused": dict(fuse=True)}[kind]
    options = dataclasses.replace(PLAIN, bn_images=16, eval_every_epoch=True, **settings)
    fusion = Fusion(base, table, keeps) if kind == "fused" else None
    teacher = Teacher(base)
    results = run_cohorts(members, batch, batch[:1], spec, "cpu", k=3, options=options, fusion=fusion,
                          teacher=teacher)
    assert all(r.ok for r in results)
    assert calls == [8] * 8  # adaptive BN and the evaluations never ask the teacher
    placed = teacher.placed(torch.device("cpu"), False)
    assert not placed.training and not any(p.requires_grad for p in placed.parameters())
    for key, value in base.state_dict().items():  # the caller's network and the teacher's BN statistics: unchanged
        assert torch.equal(value, before[key]) and torch.equal(placed.state_dict()[key], before[key]), key
    calls.clear()
    run_cohorts(members, batch, batch[:1], spec, "cpu", k=2, options=options, fusion=fusion, teacher=teacher)
    assert len(calls) == 2 * 8  # two cohorts (of 2 and 1): one forward per batch each


def test_a_recipe_that_distils_needs_a_teacher():
    _, _, _, members = family(1)
    with pytest.raises(ValueError, match="no teacher"):
        run_cohorts(members, data(1), data(1), RetrainSpec(epochs=1, distill=True), "cpu")


# -- the seed rule -----------------------------------------------------------------------------------------------------

def test_rows_with_distillation_are_identical_in_cohorts_of_1_and_2():
    """On two intra-op threads: the teacher, like the members, computes on one whatever the cohort size."""
    base, _, _, members = family(3)
    batch = data(3)
    spec = RetrainSpec(epochs=2, lr=0.05, **DISTIL)
    options = dataclasses.replace(PLAIN, bn_images=16, keep_models=True, eval_every_epoch=True)
    torch.set_num_threads(2)
    try:
        runs = {k: run_cohorts(members, batch, batch[:2], spec, "cpu", k=k, options=options, teacher=Teacher(base),
                               seeds=[5, 6, 7]) for k in (1, 2)}
    finally:
        torch.set_num_threads(1)
    for a, b in zip(runs[1], runs[2]):
        assert a.ok and b.ok and (a.cohort_size, b.cohort_size) in ((1, 2), (1, 1))
        assert (a.top1, a.top5, a.loss, a.bn_top1, a.curve) == (b.top1, b.top5, b.loss, b.bn_top1, b.curve)
        assert torch.equal(vector(a.model), vector(b.model))


def test_weight_spaces_distil_alike():
    """Weight-pruned members (masked copies of the base network, nps run's weight spaces): one teacher forward per
    batch per cohort, the same rows in cohorts of 1 and 2, and every pruned weight still exactly zero."""
    from nps.pipeline.network.masks import masked_layers
    from nps.pipeline.network.members import member_factory
    from nps.pipeline.network.pruning_kind import WEIGHTS
    from nps.pipeline.network.weight_table import build_weight_table

    torch.manual_seed(0)
    base = build_model("resnet20", num_classes=10, in_channels=3)
    table = build_weight_table("resnet20", RES, 10, 3)
    rng = np.random.default_rng(0)
    keeps = [np.maximum(1, (rng.uniform(0.1, 0.6, len(table.channels)) * table.channels).astype(np.int64))
             for _ in range(2)]
    factories = [member_factory(WEIGHTS, base, table, keep, "l2", 0) for keep in keeps]
    teacher = copy.deepcopy(base)  # counted apart: a masked member is a copy of the base network, hooks included
    calls = counted(teacher)
    batch = data(3)
    spec = RetrainSpec(epochs=1, lr=0.05, **DISTIL)
    options = dataclasses.replace(PLAIN, keep_models=True)
    runs = {k: run_cohorts(factories, batch, batch[:1], spec, "cpu", k=k, options=options, teacher=Teacher(teacher))
            for k in (1, 2)}
    assert len(calls) == 3 * 2 + 3  # cohorts of 1: two cohorts of 3 batches; a cohort of 2: 3 batches
    for a, b in zip(runs[1], runs[2]):
        assert a.ok and (a.top1, a.loss) == (b.top1, b.loss) and torch.equal(vector(a.model), vector(b.model))
        a.model.eval()(torch.zeros(1, 3, RES, RES))  # the masks' forward pre-hooks set weight = weight_orig * mask
        assert all(torch.all(m.weight[m.weight_mask == 0] == 0.0) for _, m in masked_layers(a.model))


# -- fused = unfused ---------------------------------------------------------------------------------------------------

def test_fused_and_unfused_distillation_agree():
    """tests/test_fuse.py's exactness test (30 SGD steps, weights and top-1 within 1e-4 relative, the members
    having moved 100 times further) with every member distilling from the base network."""
    base, table, keeps, members = cohort_of("resnet20")
    train, val = batches(30, 16, 0), batches(4, 32, 1)
    spec = RetrainSpec(epochs=1, lr=1e-4, **DISTIL)
    opts = CohortOptions(keep_models=True, channels_last=False, amp="off")
    teacher = Teacher(base)
    start = [vector(m) for m in members]
    alone = [train_cohort([copy.deepcopy(m)], train, val, spec, "cpu", options=opts, teacher=teacher)[0]
             for m in members]
    fused = FusedCohort([copy.deepcopy(m) for m in members], train, val, spec, "cpu",
                        fusion=Fusion(base, table, keeps), options=opts, teacher=teacher).run()
    assert_equivalent(start, alone, fused)
    plain = train_cohort([copy.deepcopy(members[0])], train, val, RetrainSpec(epochs=1, lr=1e-4), "cpu",
                         options=opts)[0]
    assert not torch.equal(vector(plain.model), vector(alone[0].model))  # distillation did change the training


# -- the recipe --------------------------------------------------------------------------------------------------------

def test_the_recipe_checks_and_stores_the_distillation_keys():
    for bad, message in ((dict(distill_alpha=1.5), r"^stage2\.distill_alpha: must be in \[0, 1\], got 1\.5$"),
                         (dict(distill_alpha=-0.1), r"^stage2\.distill_alpha: must be in \[0, 1\]"),
                         (dict(distill_temperature=0.0), r"^stage2\.distill_temperature: must be > 0, got 0\.0$")):
        with pytest.raises(NpsError, match=message):
            RetrainSpec(**bad).check("stage2")
    spec = RetrainSpec(**DISTIL).check()
    stored = SpaceSpec(spec, "l2").attrs()
    assert json.loads(stored["retrain_spec"])["distill_temperature"] == 2.5
    assert SpaceSpec.from_attrs(stored, SpaceSpec(RetrainSpec())).retrain == spec
    assert spec.with_epochs(7).distill and spec.with_epochs(7).distill_alpha == 0.3  # two-stage keeps it
    old = json.dumps({k: v for k, v in json.loads(RetrainSpec().to_json()).items() if not k.startswith("distill")})
    assert not RetrainSpec.from_json(old).distill  # a file from before distillation: off


def test_the_experiment_file_takes_and_checks_the_keys(tmp_path):
    from nps.pipeline.experiment.config import load_config, parse_config

    cfg = parse_config("[retrain]\ndistill = true\ndistill_alpha = 0.9\ndistill_temperature = 2.0\n")
    assert (cfg.retrain.distill, cfg.retrain.spec().distill_alpha, cfg.retrain.distill_temperature) == (True, 0.9, 2.0)
    assert not parse_config("").retrain.distill  # off by default
    path = tmp_path / "x.toml"
    path.write_text('[dataset]\ndir = "d"\n[[spaces]]\nname = "std-0.05"\nc_flops = 0.25\n'
                    "[retrain]\ndistill = true\ndistill_temperature = -1.0\n")
    with pytest.raises(NpsError, match=r"^retrain\.distill_temperature: must be > 0, got -1\.0$"):
        load_config(path)


# -- end to end --------------------------------------------------------------------------------------------------------

@pytest.mark.fmnist
@pytest.mark.slow  # the default tier checks the loss, the teacher's calls and the rows; this is the whole run
def test_a_tiny_run_with_distillation_completes(tmp_path, fmnist_dir, base_checkpoint):
    """`nps run demo` on 128 Fashion-MNIST images with retrain.distill = true: fused cohorts (retrain.fuse = true
    on the CPU) and two-stage retraining, every row done, every space storing the recipe with distill."""
    import contextlib
    import io

    from nps.pipeline.cli import main
    from nps.pipeline.results.store import DONE, open_readonly

    out = tmp_path / "run"
    argv = ["run", "demo", "--out", str(out), "--devices", "cpu"]
    for setting in (f"dataset.dir={fmnist_dir(256)}", "dataset.train_images=128", "dataset.val_images=128",
                    f"model.checkpoint={base_checkpoint}", "base.epochs=0", "spaces.n=2", "retrain.epochs=1",
                    "retrain.bn_images=32", "retrain.batch_size=32", "retrain.fuse=true", "retrain.distill=true",
                    "two_stage.enabled=true", "two_stage.top_k=1", "two_stage.full_epochs=1"):
        argv += ["--set", setting]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(argv)
    assert code == 0, stdout.getvalue()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("fused_waste" in e for e in log if e["event"] == "dispatch")  # the cohorts trained fused
    with open_readonly(out / "results.h5") as reader:
        spaces = {s: (reader.read(s), dict(reader.file[f"spaces/{s}"].attrs)) for s in reader.spaces()}
    assert sum(s.endswith("#top") for s in spaces) == 3 and "baseline@c_flops=0.1" in spaces
    for name, (cols, attrs) in spaces.items():
        assert (cols["status"] == DONE).all() and np.isfinite(cols["top1"]).all(), name
        recipe = json.loads(attrs["retrain_spec"])
        assert recipe["distill"] is True and recipe["distill_alpha"] == 0.5, name


def test_a_space_can_be_fine_tuned_without_and_with_distillation():
    """`[[spaces]] retrain.distill = [false, true]`: the same space twice, keyed apart, each stored with its recipe
    (what the compact-ConvNet study's "STD arms once more with distillation" needs)."""
    from nps.pipeline.errors import NpsError
    from nps.pipeline.experiment.config import parse_config
    from nps.pipeline.experiment.space_plan import check as check_spaces

    text = ('[dataset]\ndir = "data"\n[model]\nname = "resnet20"\n[experiment]\nbaseline = false\n'
            '[[spaces]]\nname = "std-0.05"\nc_flops = 0.3\nn = 4\nretrain.distill = {}\n')
    planned = check_spaces(parse_config(text.format("[false, true]")))
    assert [p.key for p in planned] == ["std-0.05+distill=false@c_flops=0.3", "std-0.05+distill=true@c_flops=0.3"]
    assert [p.spec.retrain.distill for p in planned] == [False, True] and planned[1].label == "distill=true"
    assert planned[1].spec.attrs()  # stored with the space
    with pytest.raises(NpsError, match=r"spaces\[0\]\.retrain\.distill: a value is repeated"):
        check_spaces(parse_config(text.format("[true, true]")))
    with pytest.raises(NpsError, match=r"retrain\.distill"):
        parse_config(text.format('"yes"'))
