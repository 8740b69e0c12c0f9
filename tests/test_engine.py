"""The cohort engine: one data stream for K models, NaN isolation, OOM halving, cohort sizing."""
import copy
import math

import pytest
import torch
from torch import nn

from nps.pipeline.errors import NpsError
from nps.pipeline.row_status import RowStatus
from nps.pipeline.training.cohort import CohortOutOfMemory, train_cohort
from nps.pipeline.training.devices import choose_cohort_size, estimate_train_bytes, resolve_amp
from nps.pipeline.training.engine import run_cohorts
from nps.pipeline.training.events import (
    CohortHalved,
    CohortStarted,
    EpochEnded,
    MemberFinished,
    MemberStarted,
    Result,
)
from nps.pipeline.training.spec import RetrainSpec as RetrainConfig

torch.set_num_threads(1)


def small_net(width=8, seed=0, classes=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))


def make_data(batches=12, batch=32, classes=3, seed=0):
    """Separable toy data: the class sets which colour channel is bright."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        y = torch.randint(0, classes, (batch,), generator=g)
        x = torch.randn(batch, 3, 8, 8, generator=g) * 0.5
        x[torch.arange(batch), y] += 1.0
        out.append((x, y))
    return out


class CountingLoader:
    """A re-iterable loader that counts how often it is iterated and how many batches it hands out."""

    def __init__(self, batches):
        self.batches = batches
        self.passes = 0
        self.served = 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        self.passes += 1
        for b in self.batches:
            self.served += 1
            yield b


class Bomb(nn.Module):
    """Wraps a model; from the chosen (epoch, step) of training on, its logits are inf."""

    def __init__(self, inner, epoch, step, steps_per_epoch):
        super().__init__()
        self.inner = inner
        self.trigger = (epoch - 1) * steps_per_epoch + step
        self.calls = 0

    def forward(self, x):
        out = self.inner(x)
        if self.training:
            self.calls += 1
            if self.calls >= self.trigger:
                out = out * math.inf
        return out


class MemoryLimit:
    """Fake device memory: at most ``limit`` models may run a forward on the same batch, else CUDA OOM."""

    def __init__(self, limit):
        self.limit = limit
        self.batch = None
        self.count = 0


class Hungry(nn.Module):
    def __init__(self, inner, memory):
        super().__init__()
        self.inner = inner
        self.memory = memory

    def forward(self, x):
        m = self.memory
        if x is not m.batch:
            m.batch, m.count = x, 0
        m.count += 1
        if m.count > m.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB (fake)")
        return self.inner(x)

    def __deepcopy__(self, memo):  # share the fake device between copies
        return Hungry(copy.deepcopy(self.inner, memo), self.memory)


def test_cohort_trains_all_models_on_one_loader_pass_per_epoch():
    train, val = CountingLoader(make_data(12)), CountingLoader(make_data(4, seed=1))
    models = [small_net(seed=s) for s in range(3)]
    events = []
    config = RetrainConfig(epochs=3, lr=0.1, weight_decay=0.0)
    results = train_cohort(models, train, val, config, "cpu", ids=["a", "b", "c"], eval_every_epoch=True,
                           on_event=events.append)
    assert train.passes == 3 and train.served == 36  # each batch loaded once for all three models
    assert [r.id for r in results] == ["a", "b", "c"] and all(r.ok for r in results)
    for r in results:
        assert len(r.curve) == 3 and r.top1 == r.curve[-1] and r.top1 > 60  # chance is 33 %
        assert 0 < r.loss < 1.2 and r.top5 == 100.0 and r.train_s > 0 and r.cohort_size == 3
        assert math.isnan(r.bn_top1)
    kinds = [type(e) for e in events]
    assert kinds[:3] == [MemberStarted] * 3 and kinds.count(EpochEnded) == 3 and kinds[-3:] == [MemberFinished] * 3
    epoch = [e for e in events if isinstance(e, EpochEnded)][0]
    assert epoch.img_per_s > 0 and set(epoch.val_top1) == {"a", "b", "c"} and epoch.k_live == 3


def test_cohort_member_trains_exactly_as_it_would_alone():
    data = make_data(8)
    base = small_net(seed=3)
    alone, together = copy.deepcopy(base), copy.deepcopy(base)
    config = RetrainConfig(epochs=2, lr=0.05)
    r_alone = train_cohort([alone], data, data[:2], config, "cpu")[0]
    r_together = train_cohort([small_net(seed=4), together, small_net(seed=5)], data, data[:2], config, "cpu")[1]
    for p, q in zip(alone.parameters(), together.parameters()):
        assert torch.equal(p, q)
    assert r_alone.top1 == r_together.top1 and r_alone.loss == r_together.loss


@pytest.mark.parametrize("workers", [1, 2])
def test_cohort_member_trains_exactly_as_it_would_alone_with_cpu_workers(workers):
    data = make_data(6)
    base = small_net(seed=3)
    alone, together = copy.deepcopy(base), copy.deepcopy(base)
    config = RetrainConfig(epochs=2, lr=0.05)
    r_alone = train_cohort([alone], data, data[:2], config, "cpu", cpu_workers=1)[0]
    others = [small_net(seed=s) for s in range(4, 8)]
    r_together = train_cohort(others[:2] + [together] + others[2:], data, data[:2], config, "cpu",
                              cpu_workers=workers, bn_images=0, eval_every_epoch=True)[2]
    for p, q in zip(alone.parameters(), together.parameters()):
        assert torch.equal(p, q)
    assert r_alone.top1 == r_together.top1 and r_alone.loss == r_together.loss
    assert torch.get_num_threads() == 1  # restored (the test module runs single-threaded)


def test_a_member_computes_the_same_alone_and_in_a_cohort_on_several_cores():
    """oneDNN may sum a convolution in another order with another thread count: a member steps on one intra-op
    thread whatever the cohort size, so its numbers are bit-identical alone and in a cohort."""
    from nps.pipeline.network.models import build_model

    torch.manual_seed(0)
    base = build_model("resnet20", num_classes=3, in_channels=3)
    data = make_data(4, batch=16)
    data = [(torch.nn.functional.interpolate(x, size=16), y) for x, y in data]
    config = RetrainConfig(epochs=1, lr=0.05)
    torch.set_num_threads(2)
    try:
        alone = copy.deepcopy(base)
        r_alone = train_cohort([alone], data, data[:2], config, "cpu", amp="off")[0]
        cohort = [copy.deepcopy(base) for _ in range(3)]
        r_cohort = train_cohort(cohort, data, data[:2], config, "cpu", amp="off")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    for r, model in zip(r_cohort, cohort):
        assert (r.top1, r.loss) == (r_alone.top1, r_alone.loss)
        for p, q in zip(alone.parameters(), model.parameters()):
            assert torch.equal(p, q)


class EpochLoader(CountingLoader):
    """Records the epochs the engine asks for (the nps loaders' set_epoch)."""

    def __init__(self, batches):
        super().__init__(batches)
        self.epochs = []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)


def test_each_pass_is_told_its_epoch_and_scratch_draws_from_the_row_seed():
    train = EpochLoader(make_data(4))
    base = small_net(seed=1)
    config = RetrainConfig(method="scratch", epochs=2, warmup_epochs=0)
    torch.manual_seed(123)
    first = train_cohort([copy.deepcopy(base), copy.deepcopy(base)], train, make_data(1), config, "cpu", bn_images=32,
                         seeds=[7, 8], keep_models=True)
    assert train.epochs == [0, 0, 1]  # adaptive BN reads epoch 0's first images, then epochs 0 and 1
    torch.manual_seed(456)  # the global generator does not matter
    second = train_cohort([copy.deepcopy(base)], EpochLoader(make_data(4)), make_data(1), config, "cpu",
                          bn_images=32, seeds=[8], keep_models=True)
    assert torch.equal(first[1].model[0].weight, second[0].model[0].weight)
    assert not torch.equal(first[0].model[0].weight, first[1].model[0].weight)
    with pytest.raises(ValueError, match="2 seeds"):
        train_cohort([small_net()], make_data(1), make_data(1), config, "cpu", seeds=[1, 2])


def test_cpu_workers_restore_the_thread_count():
    torch.set_num_threads(2)
    try:
        train_cohort([small_net(), small_net()], make_data(2), make_data(1), RetrainConfig(epochs=1), "cpu",
                     cpu_workers="auto")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("workers", [1, 2])
def test_nan_loss_stops_only_that_model(workers):
    data = make_data(6)
    config = RetrainConfig(epochs=3, lr=0.05)
    models = [small_net(seed=1), Bomb(small_net(seed=2), epoch=2, step=4, steps_per_epoch=6), small_net(seed=3)]
    events = []
    results = train_cohort(models, data, data[:2], config, "cpu", eval_every_epoch=True, on_event=events.append,
                           cpu_workers=workers)
    assert [r.status for r in results] == [RowStatus.DONE, RowStatus.FAILED, RowStatus.DONE]
    bad = results[1]
    assert bad.error == "loss became nan/inf at epoch 2 step 4"
    assert bad.curve and len(bad.curve) == 1 and bad.epochs_done == 1  # epoch 1 finished before the failure
    assert 0 < bad.train_s < results[0].train_s
    assert [e.result.id for e in events if isinstance(e, MemberFinished) and not e.result.ok] == [1]
    last = [e for e in events if isinstance(e, EpochEnded)][-1]
    assert list(last.train_loss) == [0, 2] and last.k_live == 2


def test_divergent_weights_fail_with_inf_loss_at_first_step():
    model = small_net(seed=1)
    with torch.no_grad():
        model[-1].weight.fill_(3e38)  # logits overflow float32
    results = train_cohort([model, small_net(seed=2)], make_data(3), make_data(1), RetrainConfig(epochs=1), "cpu")
    assert results[0].status == RowStatus.FAILED and results[0].error == "loss became nan/inf at epoch 1 step 1"
    assert results[1].ok


class FreshTensors:
    """Like a real loader: every pass hands out new tensor objects."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return ((x.clone(), y.clone()) for x, y in self.batches)


def test_oom_halves_the_cohort_and_keeps_finished_results():
    memory = MemoryLimit(limit=2)
    data = FreshTensors(make_data(4))
    config = RetrainConfig(epochs=1, lr=0.05)
    originals = [Hungry(small_net(seed=s), memory) for s in range(5)]
    # one member diverges at step 1, before the OOM of step 1's third forward: its failure must be kept
    with torch.no_grad():
        originals[0].inner[-1].weight.fill_(3e38)
    before = [copy.deepcopy(m.inner.state_dict()) for m in originals]
    events = []
    results = run_cohorts(originals, data, FreshTensors(make_data(1)), config, "cpu", k=5, on_event=events.append)
    assert [r.status for r in results] == [RowStatus.FAILED] + [RowStatus.DONE] * 4
    assert results[0].error.startswith("loss became nan/inf")
    ooms = [e for e in events if isinstance(e, CohortHalved)]
    assert len(ooms) == 1 and ooms[0].k == 5 and ooms[0].retry_k == 2
    cohorts = [list(e.ids) for e in events if isinstance(e, CohortStarted)]
    assert cohorts == [[0, 1, 2, 3, 4], [1, 2], [3, 4]]
    assert list(ooms[0].ids) == [1, 2, 3, 4]
    assert all(r.cohort_size == 2 for r in results[1:])
    for m, sd in zip(originals, before):  # the originals are untouched (retries start from them)
        for key, value in m.inner.state_dict().items():
            assert torch.equal(value, sd[key])


def test_oom_on_a_single_model_marks_it_failed():
    memory = MemoryLimit(limit=0)
    results = run_cohorts([Hungry(small_net(), memory)] * 2, make_data(2), make_data(1), RetrainConfig(epochs=1),
                          "cpu", k=2)
    assert [r.status for r in results] == [RowStatus.FAILED, RowStatus.FAILED]
    assert "does not fit even alone" in results[0].error


@pytest.mark.parametrize("workers", [1, 2])
def test_train_cohort_raises_cohort_oom_with_positions(workers):
    memory = MemoryLimit(limit=1)
    with pytest.raises(CohortOutOfMemory) as info:
        train_cohort([Hungry(small_net(), memory) for _ in range(3)], make_data(2), make_data(1),
                     RetrainConfig(epochs=1), "cpu", cpu_workers=workers)
    assert info.value.unfinished == [0, 1, 2] and info.value.finished == {}


def test_run_cohorts_accepts_factories_and_keeps_order():
    calls = []

    def factory(seed):
        def make():
            calls.append(seed)
            return small_net(seed=seed)
        return make

    results = run_cohorts([factory(s) for s in range(5)], make_data(3), make_data(1), RetrainConfig(epochs=1),
                          "cpu", k=2, ids=[10, 11, 12, 13, 14], keep_models=True)
    assert [r.id for r in results] == [10, 11, 12, 13, 14] and calls == [0, 1, 2, 3, 4]
    assert [r.cohort_size for r in results] == [2, 2, 2, 2, 1]
    assert all(isinstance(r.model, nn.Module) and next(r.model.parameters()).device.type == "cpu" for r in results)


def test_adaptive_bn_score_and_scratch():
    data = make_data(6)
    base = small_net(seed=7)
    # train the base a little so its weights are worth something
    train_cohort([base], data, data[:1], RetrainConfig(epochs=2, lr=0.1), "cpu")
    with torch.no_grad():
        base[1].running_mean.fill_(5.0)  # stale statistics, as after pruning
    scratch = copy.deepcopy(base)
    r = train_cohort([copy.deepcopy(base)], data, data[:2], RetrainConfig(epochs=0), "cpu", bn_images=64)[0]
    assert r.ok and r.bn_top1 == r.top1 and r.bn_top1 > 60  # epochs=0: the score itself is the result
    rs = train_cohort([scratch], data, data[:2], RetrainConfig(method="scratch", epochs=1, warmup_epochs=0), "cpu",
                      bn_images=64, keep_models=True)[0]
    assert rs.bn_top1 == pytest.approx(r.bn_top1)  # scored before re-initialisation
    assert not torch.equal(rs.model[0].weight, base[0].weight)


def test_loader_without_len_needs_steps_per_epoch():
    data = make_data(3)
    gen_loader = type("Gen", (), {"__iter__": lambda self: iter(data)})()
    with pytest.raises(NpsError, match="steps_per_epoch"):
        train_cohort([small_net()], gen_loader, data[:1], RetrainConfig(epochs=1), "cpu")
    assert train_cohort([small_net()], gen_loader, data[:1], RetrainConfig(epochs=1), "cpu", steps_per_epoch=3)[0].ok


def test_channels_last_and_bf16_autocast_on_cpu_run():
    r = train_cohort([small_net()], make_data(2), make_data(1), RetrainConfig(epochs=1), "cpu", channels_last=True,
                     amp="bf16")[0]
    assert r.ok and not math.isnan(r.loss)


def test_choose_cohort_size():
    models = [small_net(width=w) for w in (4, 8, 16)]
    assert choose_cohort_size(models, "cpu", (32, 3, 8, 8)) == 3
    assert choose_cohort_size(models * 5, "cpu", (32, 3, 8, 8)) == 8
    assert choose_cohort_size(models * 5, "cpu", (32, 3, 8, 8), max_k=4) == 4
    per = estimate_train_bytes(models[2], (32, 3, 8, 8))
    assert per > 32 * 16 * 8 * 8 * 4  # at least the conv output of the batch
    assert estimate_train_bytes(models[2], (64, 3, 8, 8)) > per
    free = int(per * 6 / 0.85) + 1
    assert choose_cohort_size(models * 5, "cpu", (32, 3, 8, 8), free_bytes=free) == 6
    assert choose_cohort_size(models, "cpu", (32, 3, 8, 8), free_bytes=1) == 1


def test_resolve_cpu_workers():
    from nps.pipeline.training.devices import resolve_cpu_workers
    cpu = torch.device("cpu")
    assert resolve_cpu_workers(3, cpu, 8) == 3 and resolve_cpu_workers(16, cpu, 8) == 8
    assert resolve_cpu_workers("auto", cpu, 8) == torch.get_num_threads()
    assert resolve_cpu_workers(4, torch.device("meta"), 8) == 1
    with pytest.raises(NpsError):
        resolve_cpu_workers(0, cpu, 8)


def test_resolve_amp():
    cpu = torch.device("cpu")
    from nps.pipeline.training.devices import cpu_has_native_bf16
    assert resolve_amp("auto", cpu) is (torch.bfloat16 if cpu_has_native_bf16() else None)
    assert resolve_amp("off", cpu) is None and resolve_amp(None, cpu) is None
    assert resolve_amp("auto", torch.device("meta")) is None
    from nps.pipeline.network.models import build_model

    mobilenet, resnet = build_model("mobilenet_v2", 10, device="meta"), build_model("resnet20", 10, device="meta")
    assert resolve_amp("auto", cpu, [mobilenet]) is None  # depthwise convs: fp32 (tools/bench_amp.py)
    assert resolve_amp("auto", cpu, [resnet]) is resolve_amp("auto", cpu)
    assert resolve_amp("bf16", cpu, [mobilenet]) is torch.bfloat16
    assert resolve_amp("bf16", cpu) is torch.bfloat16 and resolve_amp("fp16", cpu) is torch.float16
    with pytest.raises(NpsError):
        resolve_amp("int8", cpu)


def test_result_is_plain_data():
    r = Result(id=3, status=RowStatus.DONE, top1=1.0)
    assert r.ok and r.curve == [] and r.model is None


def test_pruned_resnets_through_the_engine_into_the_store(tmp_path):
    """How the run driver wires things: real pruned subnetworks, run_cohorts events → results.h5 rows."""
    import numpy as np

    from nps.pipeline.network.layer_table import build_layer_table
    from nps.pipeline.network.models import build_model
    from nps.pipeline.network.prune import prune_model
    from nps.pipeline.results.store import DONE, FAILED, ResultsStore, open_readonly

    table = build_layer_table("resnet20", "all", 8, 3, 3)
    rng = np.random.default_rng(0)
    recipe = rng.uniform(0.3, 0.6, size=(3, len(table.channels)))
    keep = table.keep(recipe)
    base = build_model("resnet20", num_classes=3, in_channels=3)
    subnets = [prune_model(base, table, k) for k in keep]
    with torch.no_grad():  # the third one diverges at once
        subnets[2].fc.weight.fill_(3e38)
    n = len(subnets)
    rows = dict(recipe=recipe, keep=keep, flops=table.flops_of(keep), params=table.params_of(keep),
                c_flops=table.c_flops(keep), c_params=table.c_params(keep), mcb=table.mcb(keep),
                std=recipe.std(axis=1), seed=np.arange(n))
    store = ResultsStore.create(tmp_path / "r.h5", table, "cfg", {"base_top1": 90.0})
    store.add_space("std-0.1", rows, epochs=2)

    def on_event(e):
        if isinstance(e, MemberStarted):
            store.mark_running("std-0.1", [e.id])
        elif isinstance(e, MemberFinished) and e.result.ok:
            r = e.result
            store.record("std-0.1", [r.id], [r])  # the engine's result is the row's result, as the run stores it
        elif isinstance(e, MemberFinished):
            store.record("std-0.1", [e.result.id], [e.result])

    data = make_data(4, batch=16)
    results = run_cohorts(subnets, data, data[:1], RetrainConfig(epochs=2), "cpu", k=2, ids=list(range(n)),
                          eval_every_epoch=True, bn_images=32, on_event=on_event)
    store.close()
    assert [r.status for r in results] == [RowStatus.DONE, RowStatus.DONE, RowStatus.FAILED]
    with open_readonly(tmp_path / "r.h5") as reader:
        cols = reader.read("std-0.1")
        assert cols["status"].tolist() == [DONE, DONE, FAILED]
        assert np.allclose(cols["top1"][:2], [r.top1 for r in results[:2]])
        assert not np.isnan(cols["curve"][:2]).any() and not np.isnan(cols["bn_top1"]).any()
        assert reader.errors("std-0.1")[2] == "loss became nan/inf at epoch 1 step 1"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", ["auto", "fp16", "off"])
def test_cuda_streams_autocast_and_scaler(amp):
    data = make_data(6)
    models = [small_net(seed=s) for s in range(3)]
    with torch.no_grad():
        models[1][-1].weight.fill_(3e38)
    results = train_cohort(models, data, data[:2], RetrainConfig(epochs=2, lr=0.1), "cuda", amp=amp,
                           eval_every_epoch=True, check_every=2)
    assert [r.status for r in results] == [RowStatus.DONE, RowStatus.FAILED, RowStatus.DONE]
    assert results[1].error.startswith("loss became nan/inf at epoch 1 step")
    assert all(r.top1 > 50 and len(r.curve) == 2 for r in (results[0], results[2]))
    k = choose_cohort_size([small_net()] * 100, "cuda", (32, 3, 8, 8))
    assert 1 <= k <= 100
