"""Retraining recipes: config checks, LR schedules, evaluation, adaptive BN, re-initialisation."""
import math

import pytest
import torch
from torch import nn

from nps.pipeline.errors import NpsError
from nps.pipeline.training.evaluation import adaptive_bn, evaluate, evaluate_many
from nps.pipeline.training.schedule import lr_factor, make_optimizer, make_scheduler, reinitialize
from nps.pipeline.training.spec import RetrainSpec as RetrainConfig

torch.set_num_threads(1)


def lrs(config, steps_per_epoch):
    model = nn.Linear(2, 2)
    opt = make_optimizer(model, config)
    sched = make_scheduler(opt, config, steps_per_epoch)
    out = []
    for _ in range(config.epochs * steps_per_epoch):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_config_defaults_are_the_paper_standard_setting():
    c = RetrainConfig().check()
    assert (c.method, c.lr, c.momentum, c.peak_lr, c.warmup) == ("finetune", 0.01, 0.9, 0.01, 0.0)


@pytest.mark.parametrize("bad, match", [
    (dict(method="prune"), "method"), (dict(epochs=-1), "epochs"), (dict(lr=0), "lr"), (dict(momentum=1.0), "momentum"),
    (dict(weight_decay=-1), "weight_decay"), (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(method="rewind", epochs=3, warmup_epochs=5), "warmup"), (dict(momentum=0, nesterov=True), "nesterov"),
])
def test_config_rejects_impossible_settings(bad, match):
    with pytest.raises(NpsError, match=match):
        RetrainConfig(**bad).check()


def test_finetune_is_per_step_cosine_from_lr_to_zero():
    seq = lrs(RetrainConfig(epochs=4, lr=0.01), steps_per_epoch=5)
    assert seq[0] == pytest.approx(0.01)
    assert seq[10] == pytest.approx(0.005)  # half way
    assert seq[-1] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 19 / 20)))
    assert all(a >= b for a, b in zip(seq, seq[1:]))


def test_rewind_warms_up_linearly_then_anneals_from_rewind_lr():
    c = RetrainConfig(method="rewind", epochs=10, rewind_lr=0.1, warmup_epochs=5)
    seq = lrs(c, steps_per_epoch=2)
    assert seq[:10] == pytest.approx([0.1 * (i + 1) / 10 for i in range(10)])
    assert seq[10] == pytest.approx(0.1)  # the cosine starts at the peak
    assert seq[15] == pytest.approx(0.05)
    assert lr_factor(20, 20, 10) == pytest.approx(0.0)


def test_optimizer_settings():
    c = RetrainConfig(weight_decay=1e-4, nesterov=True, momentum=0.8)
    g = make_optimizer(nn.Linear(3, 2), c).param_groups[0]
    assert (g["lr"], g["momentum"], g["weight_decay"], g["nesterov"]) == (0.01, 0.8, 1e-4, True)


class FixedLogits(nn.Module):
    """Returns the logits stored for each input id (x[:, 0] holds the id)."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("table", logits)

    def forward(self, x):
        return self.table[x[:, 0].long()]


def test_evaluate_top1_top5_loss():
    torch.manual_seed(0)
    n, classes = 10, 7
    logits = torch.randn(n, classes)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 1, 2])
    x = torch.arange(n, dtype=torch.float32).view(n, 1)
    loader = [(x[:6], labels[:6]), (x[6:], labels[6:])]
    top1, top5, loss = evaluate(FixedLogits(logits), loader, "cpu")
    assert top1 == pytest.approx(100 * (logits.argmax(1) == labels).float().mean().item())
    in5 = (logits.topk(5, 1).indices == labels[:, None]).any(1).float().mean().item()
    assert top5 == pytest.approx(100 * in5)
    assert loss == pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)
    # fewer than 5 classes: top-5 counts all of them
    few = evaluate_many([FixedLogits(logits[:, :3]), FixedLogits(logits[:, :3])], [(x, labels % 3)], "cpu")
    assert few[0][1] == 100.0 and few[0] == few[1]


def test_evaluate_restores_train_mode_and_rejects_empty_loader():
    m = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    m.train()
    evaluate(m, [(torch.randn(2, 4), torch.tensor([0, 1]))], "cpu")
    assert m.training
    with pytest.raises(NpsError, match="no batches"):
        evaluate(m, [], "cpu")


def test_adaptive_bn_recomputes_stats_from_num_images_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    bn = model[0]
    bn.running_mean.fill_(100.0)
    bn.running_var.fill_(100.0)
    images = torch.randn(40, 3, 4, 4) * 2 + 5
    loader = [(images[i:i + 8], torch.zeros(8, dtype=torch.long)) for i in range(0, 40, 8)]
    used = adaptive_bn(model, loader, "cpu", num_images=20)
    assert used == 20
    # cumulative average of per-batch means over exactly 20 images (8 + 8 + 4)
    means = [images[0:8].mean((0, 2, 3)), images[8:16].mean((0, 2, 3)), images[16:20].mean((0, 2, 3))]
    torch.testing.assert_close(bn.running_mean, sum(means) / 3)
    assert bn.momentum == 0.1 and not model.training


def test_reinitialize_gives_fresh_weights_and_resets_bn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
        model[1].running_mean.fill_(3.0)
    reinitialize(model, seed=1)
    assert not torch.all(model[0].weight == 0.5) and not torch.all(model[3].weight == 0.5)
    assert torch.all(model[1].weight == 1) and torch.all(model[1].running_mean == 0)
    again = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    reinitialize(again, seed=1)
    torch.testing.assert_close(again[0].weight, model[0].weight)  # seeded: reproducible


def test_one_spec_for_the_experiment_the_engine_and_the_file():
    from nps.pipeline.experiment.config import Config
    from nps.pipeline.experiment.config import RetrainConfig as ExperimentRetrain
    from nps.pipeline.training.spec import RetrainSpec, SpaceSpec

    cfg = Config()
    cfg.retrain.method, cfg.retrain.epochs, cfg.retrain.warmup_epochs = "rewind", 3, 2.0
    assert isinstance(cfg.retrain, RetrainSpec) and issubclass(ExperimentRetrain, RetrainConfig)
    spec = cfg.retrain.spec()
    assert type(spec) is RetrainSpec and spec == RetrainSpec(method="rewind", epochs=3, warmup_epochs=2.0)
    assert RetrainSpec.from_json(spec.to_json()) == spec
    assert spec.with_epochs(1).warmup_epochs == 1.0 and spec.with_epochs(10) == RetrainSpec(
        method="rewind", epochs=10, warmup_epochs=2.0)
    stored = SpaceSpec(spec, "random")
    assert SpaceSpec.from_attrs(stored.attrs(), SpaceSpec(RetrainSpec(), "l2")) == stored
    # a file written before spaces stored their spec: the experiment's, with the space's epochs
    assert SpaceSpec.from_attrs({"epochs": 7}, stored) == SpaceSpec(spec.with_epochs(7), "random")
    with pytest.raises(NpsError, match=r"^stage2\.momentum: must be in \[0, 1\)"):
        RetrainSpec(momentum=1.5).check("stage2")
